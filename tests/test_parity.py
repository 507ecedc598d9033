"""Runtime images against PyTorch's, computed here independently (transformers tokenizer, torch modules)."""

import numpy as np
import pytest
import torch
from conftest import TEXT_ENCODERS
from edgegen.export.families.gan import GanFamily
from edgegen.runtime import Pipeline

SHORT = "cat"
LONG = "a very small yellow star on a dark green background with a big red heart and a tiny blue moon"
FAMILIES: dict = {}  # kind -> its GanFamily, loaded once for all the parametrized cases


def torch_pixels(family: GanFamily, prompts, seeds):
    tok = family.hf_tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=family.config.max_length,
        return_tensors="pt",
    )
    noise = np.stack(
        [np.random.default_rng(s).standard_normal(family.config.noise_dim, dtype=np.float32) for s in seeds]
    )
    with torch.no_grad():
        states = family.text_encoder(tok["input_ids"], tok["attention_mask"])
        image = family.generator(torch.from_numpy(noise), states, tok["attention_mask"])
    return np.rint(np.clip((image.numpy() + 1) * 127.5, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("kind", TEXT_ENCODERS)
@pytest.mark.parametrize(
    "prompts,seeds", [([SHORT], [7]), ([LONG], [8]), ([SHORT, LONG, "a red apple"], [1, 2, 3])]
)
def test_runtime_matches_pytorch(kind, prompts, seeds, tiny_checkpoints, tiny_bundles):
    family = FAMILIES.get(kind) or FAMILIES.setdefault(kind, GanFamily(tiny_checkpoints[kind]))
    want = torch_pixels(family, prompts, seeds)
    assert want.std() > 5, "reference images are flat; the check would be too weak"
    for mode in ("fused", "split"):
        pipe = Pipeline.from_bundle(tiny_bundles[kind], backend="ort-cpu", mode=mode)
        got = pipe(prompts, seed=seeds, output_type="uint8")
        assert got.shape == want.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff <= 1, f"{kind} {mode}: max pixel difference {diff}"


def test_cached_path_equals_fused(bert_bundle):
    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu")
    first = pipe(["a red apple", "cat"], seed=[4, 5], output_type="uint8")
    assert pipe.last_call.path == "fused"
    again = pipe(["a red apple", "cat"], seed=[4, 5], output_type="uint8")
    assert pipe.last_call.path == "cached"
    assert np.abs(first.astype(int) - again.astype(int)).max() <= 1

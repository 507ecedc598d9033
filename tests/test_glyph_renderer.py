"""The glyph renderer (emoji64's generator): draws what the training data draws, exports and runs in every
precision."""

import numpy as np
import pytest
import torch
from edgegen.export import export_checkpoint
from edgegen.export.generator import ConditionalGenerator, GeneratorConfig
from edgegen.runtime import Bundle, Pipeline
from gpu_emulation import needs_trt_rtx


def glyph_config(**kw):
    settings = dict(
        image_size=16,
        noise_dim=4,
        text_dim=8,
        channels=[],
        concepts=[4, 2, 3],
        renderer="glyph",
        glyph_side=6,
        glyph_boxes=[6, 10],
        jitter=2,
    )
    return GeneratorConfig(**{**settings, **kw})


def draw(glyph, colour, box, shift, size=16):
    """Reference: the glyph pasted at its own size (box == glyph side), composited as training/dataset.py
    does."""
    rgb = np.empty((3, size, size), np.float32)
    rgb[:] = np.asarray(colour, np.float32)[:, None, None]
    x0, y0 = (size - box) // 2 + shift[0], (size - box) // 2 + shift[1]
    win = rgb[:, y0 : y0 + box, x0 : x0 + box]
    win[:] = glyph[:3] + win * (1 - glyph[3:])
    return rgb * 2 - 1


def test_glyph_drawn_exactly_at_its_own_size_and_shifted_by_the_noise():
    gen = ConditionalGenerator(glyph_config()).eval()
    rng = np.random.default_rng(0)
    glyphs = rng.uniform(0, 1, (4, 4, 6, 6)).astype(np.float32)
    glyphs[:, :3] *= glyphs[:, 3:]  # premultiplied
    with torch.no_grad():
        gen.memories[0].values.copy_(torch.from_numpy(glyphs.reshape(4, -1)))
        gen.memories[1].values.copy_(torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]]))
        gen.memories[2].values.copy_(
            torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
        )  # not said, small, large
        noise = torch.tensor([[1.0, -1.4, 0.5, 0.0]])  # shift round(1.5)=2, round(-2.1)=-2
        labels = [torch.tensor([2]), torch.tensor([1]), torch.tensor([1])]
        got = gen(noise, torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.long), concept_labels=labels)[
            0
        ].numpy()
    np.testing.assert_allclose(got, draw(glyphs[2], [0.9, 0.8, 0.7], 6, (2, -2)), atol=1e-5)
    # size not said: the sign of noise[2] picks the box (large: 10 px, so the glyph covers more pixels)
    with torch.no_grad():

        def coverage(z2):
            noise = torch.tensor([[0.0, 0.0, z2, 0.0]])
            out = gen(
                noise,
                torch.zeros(1, 3, 8),
                torch.ones(1, 3, dtype=torch.long),
                concept_labels=[torch.tensor([2]), torch.tensor([1]), torch.tensor([0])],
            )[0].numpy()
            return (np.abs(out - (np.array([0.9, 0.8, 0.7])[:, None, None] * 2 - 1)) > 1e-4).any(0).sum()

        assert coverage(-0.3) == 36 and coverage(0.3) > 64


def test_config_rejects_what_it_cannot_draw():
    with pytest.raises(ValueError, match="concepts"):
        glyph_config(concepts=[4, 2])
    with pytest.raises(ValueError, match="fit"):
        glyph_config(glyph_boxes=[6, 14])
    with pytest.raises(ValueError, match="renderer"):
        GeneratorConfig(renderer="vector")


@pytest.fixture(scope="module")
def glyph_bundle(tmp_path_factory):
    from edgegen.export.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("glyph")
    ckpt = make_tiny_checkpoint(
        root / "ckpt", text_encoder="bert", renderer="glyph", concept_heads=2, known_subject=True
    )
    return ckpt, export_checkpoint(ckpt, root / "bundle", precisions="fp32,fp16,int8", progress=False)


def test_glyph_generator_exports_in_every_precision_and_matches_pytorch(glyph_bundle):
    from edgegen.export.families.gan import load_generator
    from transformers import AutoModel, AutoTokenizer

    ckpt, path = glyph_bundle
    bundle = Bundle.open(path)
    assert bundle.precisions == ["fp32", "fp16", "int8"]
    for p in ("fp16", "int8"):
        assert bundle.report()["precisions"][p]["gate"]["ok"], p
    prompts, seeds = ["a red apple", "a small cat on a blue background"], [0, 7]
    got = Pipeline.from_bundle(path, backend="ort-cpu", precision="fp32")(
        prompts, seed=seeds, output_type="uint8"
    )
    # PyTorch: the same tokens, noise and weights
    tok = AutoTokenizer.from_pretrained(ckpt / "text_encoder")
    enc = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    text = AutoModel.from_pretrained(ckpt / "text_encoder").eval()
    gen = load_generator(ckpt / "generator")
    from edgegen.runtime.pipeline import noise_for_seeds

    noise = torch.from_numpy(noise_for_seeds(seeds, (16,)))
    with torch.no_grad():
        states = text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        want = gen(noise, states, enc["attention_mask"]).numpy()
    want = np.rint(np.clip((want + 1) * 127.5, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    for p in ("fp16", "int8"):
        out = Pipeline.from_bundle(path, backend="ort-cpu", precision=p)(
            prompts, seed=seeds, output_type="uint8"
        )
        # int8: the tiny random glyph memories' static activation ranges cost it 28.3 dB here (gate 25 dB), a
        # mean of 7.2 levels (onnxruntime 1.31.1, 2026-12-02; the same test kept under 3 levels on 11-24)
        assert np.abs(out.astype(int) - got.astype(int)).mean() < (3.0 if p == "fp16" else 8.0), p


def test_last_call_reports_what_the_concept_memories_read(glyph_bundle):
    """The generator and fused graphs output each memory's probabilities; the pipeline reports them per
    image (the subject's scaled by the known-subject head), on the fused path and on the cached path alike,
    as PyTorch computes them, however many calls later it is asked for."""
    from edgegen.export.families.gan import load_generator
    from edgegen.export.generator import GeneratorWithReading
    from transformers import AutoModel, AutoTokenizer

    ckpt, path = glyph_bundle
    assert set(Bundle.open(path).manifest["reading"]) == {"subject", "background", "size"}
    prompts = ["a red apple", "a small cat on a blue background"]
    tok = AutoTokenizer.from_pretrained(ckpt / "text_encoder")
    enc = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    text = AutoModel.from_pretrained(ckpt / "text_encoder").eval()
    with torch.no_grad():
        states = text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        _, *probs = GeneratorWithReading(load_generator(ckpt / "generator"))(
            torch.zeros(2, 16), states, enc["attention_mask"]
        )
    assert float(probs[0].sum(-1).max()) < 0.99  # the known-subject head scales the subject's
    pipe = Pipeline.from_bundle(path, backend="ort-cpu", precision="fp32")
    calls = []
    for _ in range(2):
        pipe(prompts, seed=[0, 1], output_type="uint8")
        calls.append(pipe.last_call)
    pipe(["a tiny blue rocket", "a large dog"], seed=[2, 3], output_type="uint8")  # reuses the output buffers
    for info, expected_path in zip(calls, ("fused", "cached")):
        assert info.path == expected_path
        read = info.read  # built on first use, after the next call: from its own call's probabilities
        assert len(read) == 2
        for image, rows in zip(read, zip(*probs)):
            for (concept, got), want in zip(image.items(), rows):
                assert got["name"] == str(int(want.argmax())), concept
                assert abs(got["p"] - float(want.max())) < 1e-3
                assert [p for _, p in got["top"]] == sorted((p for _, p in got["top"]), reverse=True)


@pytest.mark.tensorrt
@needs_trt_rtx
def test_tensorrt_rtx_builds_engines_for_the_glyph_generator(glyph_bundle, tmp_path, monkeypatch):
    """TensorRT for RTX parses and builds the glyph renderer's graph (Round, Sign, Clip, batched MatMul) in
    the GPU forms, ahead of time for compute capability 8.9 on this CPU-only machine."""
    import shutil

    from edgegen.runtime.cli import main

    monkeypatch.setenv("EDGEGEN_CACHE", str(tmp_path / "cache"))
    bundle = shutil.copytree(glyph_bundle[1], tmp_path / "bundle")
    assert (
        main(["engines", str(bundle), "--flavour", "trt-rtx", "--compute-capability", "8.9", "--quiet"]) == 0
    )
    engines = Bundle.open(bundle).manifest["engines"]
    assert {(e["component"], e["form"]) for e in engines} >= {
        ("generator", "fp16"),
        ("generator", "int8-qdq"),
    }

"""Image quality on the device itself, with the judge that ships in the default bundle (no torch).

adherence: the fraction of generated images whose emoji AND background the judge reads as the prompt
asked, over the shipped eval prompts (seen phrasings, held-out ones and, where the model ships them, the
binding prompts, separately); diversity: mean
pairwise L1 (0..1) between images of one prompt under different seeds; frechet: Fréchet distance
between the judge's features of generated images and of real renders.
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from .backends import backend_loads, backend_spec, make_session
from .pipeline import UnknownSubjectWarning

EVAL_SEEDS = (0, 1, 2, 3)  # every eval prompt is generated with each of these seeds (as training/evaluate.py)


def has_judge(bundle) -> bool:
    return "judge" in bundle.components and "quality" in bundle.manifest


def _judge_inputs(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), with symmetric square roots by eigh."""

    def sqrt_psd(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root1 = sqrt_psd(sigma1)
    cross = sqrt_psd(root1 @ sigma2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(cross))


def judge_backend(backend: str) -> str:
    """The judge is an fp32 ONNX file (no engine): a backend that runs no ONNX file scores with the first
    of its row's ``judge_on`` that loads (the last one is the fallback that always runs)."""
    spec = backend_spec(backend)
    if spec.provider:
        return backend
    *preferred, fallback = spec.judge_on
    return next((b for b in preferred if backend_loads(b)[0]), fallback)


def evaluate(pipe, limit: int | None = None) -> dict:
    """Generate every eval prompt with each of EVAL_SEEDS through ``pipe`` and score with the bundle's judge
    (fp32, same backend): the definitions of training/evaluate.py, so the figures compare."""
    bundle = pipe.bundle
    q = bundle.manifest["quality"]
    prompts = json.loads(bundle.path(q["eval_prompts"]).read_text())[:limit]
    judge = make_session(bundle.onnx_path("judge", "fp32"), judge_backend(pipe.backend))
    outputs = [o.name for o in bundle.components["judge"].outputs]
    per_call = max(1, pipe.max_batch // len(EVAL_SEEDS))
    correct = {"seen": [], "heldout": [], "heldout_templates": [], "heldout_synonyms": []}
    features, spreads = [], []
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start : start + per_call]
        with warnings.catch_warnings():  # held-out synonyms are meant to be hard: no warning per prompt
            warnings.simplefilter("ignore", UnknownSubjectWarning)
            pixels = pipe(
                [p["prompt"] for p in chunk for _ in EVAL_SEEDS],
                seed=list(EVAL_SEEDS) * len(chunk),
                output_type="uint8",
            )
        got = dict(zip(outputs, judge.run(None, {"image": _judge_inputs(pixels)})))
        emoji, background = got["emoji_logits"].argmax(1), got["background_logits"].argmax(1)
        features.append(got["features"].astype(np.float64))
        for i, p in enumerate(chunk):
            rows = slice(i * len(EVAL_SEEDS), (i + 1) * len(EVAL_SEEDS))
            right = list((emoji[rows] == p["emoji"]) & (background[rows] == p["background"]))
            correct.setdefault(p["split"], []).extend(right)
            if p.get("novelty"):  # by what is new in them: heldout_templates / _synonyms, binding_templates
                correct.setdefault(f"{p['split']}_{p['novelty']}s", []).extend(right)
            imgs = pixels[rows].astype(np.float32) / 255.0
            spreads += [
                np.abs(imgs[a] - imgs[b]).mean() for a in range(len(imgs)) for b in range(a + 1, len(imgs))
            ]
    feats = np.concatenate(features)
    with np.load(bundle.path(q["real_features"]), allow_pickle=False) as real:
        fd = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), real["mu"], real["sigma"])
    return {
        "adherence": {k: float(np.mean(v)) for k, v in correct.items() if v},
        "prompts": {k: len(v) // len(EVAL_SEEDS) for k, v in correct.items() if v},
        "seeds": list(EVAL_SEEDS),
        "diversity": float(np.mean(spreads)),
        "frechet_judge_distance": fd,
    }

"""Image quality on the device itself, with the judge that ships in the default bundle (no torch).

adherence: the fraction of generated images whose emoji AND background the judge reads as the prompt
asked, over the shipped eval prompts (seen phrasings and held-out ones separately); diversity: mean
pairwise L1 (0..1) between images of one prompt under different seeds; frechet: Fréchet distance
between the judge's features of generated images and of real renders.
"""
from __future__ import annotations

import json

import numpy as np

from .backends import make_session

EVAL_SEED = 1000          # eval prompt i is generated with seed EVAL_SEED + i
DIVERSITY_PROMPTS = 32    # the first N eval prompts ...
DIVERSITY_SEEDS = 4       # ... each with this many seeds


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


def evaluate(pipe, limit: int | None = None) -> dict:
    """Generate the eval prompts with ``pipe`` and score them with the bundle's judge (fp32, same backend)."""
    bundle = pipe.bundle
    q = bundle.manifest["quality"]
    prompts = json.loads(bundle.path(q["eval_prompts"]).read_text())[:limit]
    judge = make_session(bundle.onnx_path("judge", "fp32"), pipe.backend)
    outputs = [o.name for o in bundle.components["judge"].outputs]

    def score(pixels):
        got = dict(zip(outputs, judge.run(None, {"image": _judge_inputs(pixels)})))
        return got["emoji_logits"].argmax(1), got["background_logits"].argmax(1), got["features"]

    correct = {"seen": [], "heldout": []}
    features = []
    step = pipe.max_batch
    for start in range(0, len(prompts), step):
        chunk = prompts[start:start + step]
        pixels = pipe([p["prompt"] for p in chunk], seed=[EVAL_SEED + start + i for i in range(len(chunk))],
                      output_type="np")
        emoji, background, feats = score(pixels)
        features.append(feats.astype(np.float64))
        for p, e, b in zip(chunk, emoji, background):
            correct[p["split"]].append(bool(e == p["emoji"] and b == p["background"]))
    feats = np.concatenate(features)
    with np.load(bundle.path(q["real_features"]), allow_pickle=False) as real:
        fd = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), real["mu"], real["sigma"])
    spreads = []
    for p in prompts[:DIVERSITY_PROMPTS]:
        imgs = pipe(p["prompt"], seed=[EVAL_SEED + k for k in range(DIVERSITY_SEEDS)], output_type="np")
        imgs = imgs.astype(np.float32) / 255.0
        spreads += [np.abs(imgs[i] - imgs[j]).mean() for i in range(len(imgs)) for j in range(i + 1, len(imgs))]
    return {"adherence": {k: (float(np.mean(v)) if v else None) for k, v in correct.items()},
            "prompts": {k: len(v) for k, v in correct.items()}, "diversity": float(np.mean(spreads)),
            "frechet_judge_distance": fd, "eval_seed": EVAL_SEED}

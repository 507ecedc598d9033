"""Evaluate a generator with the judge: adherence (seen / held-out phrasings / binding), seed diversity,
Fréchet judge distance.

    python -m training.evaluate [--model export/emoji64] [--seeds 0 1 2 3]

Noise follows the runtime: image i uses numpy default_rng(seed_i).standard_normal(noise_dim, float32),
and images are quantised to uint8 before judging, as the runtime would deliver them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from edgegen.runtime.pipeline import noise_for_seeds
from scipy import linalg

from .dataset import binding_captions, eval_captions, random_labels, render_batch, to_tensor

EVAL_SEEDS = [0, 1, 2, 3]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as in the FID reference code
        eps = np.eye(len(mu1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean.real))


def stats(features: np.ndarray):
    f = features.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


@torch.no_grad()
def generate(generator, states, mask, seeds: list[int], batch: int = 256) -> np.ndarray:
    """uint8 (P, S, 64, 64, 3): every prompt with every seed."""
    p, s = len(states), len(seeds)
    noise = noise_for_seeds(seeds, (generator.config.noise_dim,))
    z = torch.from_numpy(np.tile(noise, (p, 1)))
    st = torch.as_tensor(states).float().repeat_interleave(s, 0)
    mk = torch.as_tensor(mask).long().repeat_interleave(s, 0)
    out = []
    for i in range(0, len(z), batch):
        img = generator(z[i : i + batch], st[i : i + batch], mk[i : i + batch]).numpy()
        out.append(np.rint(np.clip((img + 1.0) * 127.5, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1))
    return np.concatenate(out).reshape(p, s, *out[0].shape[1:])


@torch.no_grad()
def judge_images(judge, images: np.ndarray, batch: int = 512):
    e, b, f = [], [], []
    flat = images.reshape(-1, *images.shape[-3:])
    for i in range(0, len(flat), batch):
        le, lb, feat = judge(to_tensor(flat[i : i + batch]))
        e.append(le.argmax(1).numpy()), b.append(lb.argmax(1).numpy()), f.append(feat.numpy())
    return np.concatenate(e), np.concatenate(b), np.concatenate(f)


def evaluate(generator, judge, states, mask, captions, real_mu, real_sigma, seeds=EVAL_SEEDS) -> dict:
    generator.eval()
    images = generate(generator, states, mask, seeds)
    pred_e, pred_b, feats = judge_images(judge, images)
    s = len(seeds)
    want_e = np.repeat([c.emoji for c in captions], s)
    want_b = np.repeat([c.background for c in captions], s)
    split = np.repeat([c.split for c in captions], s)
    novelty = np.repeat([c.novelty for c in captions], s)
    ok_e, ok_b = pred_e == want_e, pred_b == want_b
    result = {"seeds": list(seeds), "n_prompts": len(captions)}
    for name in ("seen", "heldout", "binding"):
        m = split == name
        if m.any():
            result[f"adherence_{name}"] = float((ok_e & ok_b)[m].mean())
            result[f"emoji_acc_{name}"] = float(ok_e[m].mean())
            result[f"background_acc_{name}"] = float(ok_b[m].mean())
    # the parts of a split by what is new in them: heldout_templates, heldout_synonyms, binding_templates
    for name, new in sorted({(a, b) for a, b in zip(split, novelty) if b}):
        m = (split == name) & (novelty == new)
        result[f"adherence_{name}_{new}s"] = float((ok_e & ok_b)[m].mean())
        result[f"emoji_acc_{name}_{new}s"] = float(ok_e[m].mean())
        result[f"background_acc_{name}_{new}s"] = float(ok_b[m].mean())
    a = images.astype(np.float32) / 255.0
    pairs = [np.abs(a[:, i] - a[:, j]).mean() for i in range(s) for j in range(i + 1, s)]
    result["diversity"] = float(np.mean(pairs)) if pairs else 0.0
    mu, sigma = stats(feats)
    result["frechet_judge_distance"] = frechet_distance(mu, sigma, real_mu, real_sigma)
    result["frechet_judge_distance_real_reference"] = real_reference_fd(
        judge, len(feats), real_mu, real_sigma
    )
    return result


def real_reference_fd(judge, n: int, real_mu, real_sigma, seed: int = 777) -> float:
    """FD of ``n`` fresh real renders: the floor a perfect generator would reach at this sample size."""
    rng = np.random.default_rng(seed)
    _, _, f = judge_images(judge, render_batch(rng, *random_labels(rng, n)).images)
    mu, sigma = stats(f)
    return frechet_distance(mu, sigma, real_mu, real_sigma)


def main():
    from edgegen.export.families.gan import load_generator
    from edgegen.export.judge import load_judge

    from .text_states import encode, load_minilm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("export/emoji64"))
    p.add_argument("--seeds", type=int, nargs="+", default=EVAL_SEEDS)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    generator, judge = load_generator(a.model / "generator"), load_judge(a.model / "judge")
    captions = eval_captions() + binding_captions()
    encoder, tokenizer = load_minilm()
    states, mask = encode(encoder, tokenizer, [c.text for c in captions], generator.config.max_length)
    real = np.load(a.model / "real_features.npz")
    print(
        json.dumps(
            evaluate(generator, judge, states, mask, captions, real["mu"], real["sigma"], a.seeds), indent=2
        )
    )


if __name__ == "__main__":
    main()

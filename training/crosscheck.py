"""Score a generator with a second judge that training never saw.

    python -m training.crosscheck [--model export/emoji64] [--judge-dir ~/.cache/edgegen-emoji64/judge-seed1]

A generator trained with a judge's cross-entropy can earn that judge's adherence with features it likes
rather than with the emoji (the conv runs in training/README.md did). The same judge recipe with another
seed (seed 1, ~9 min at one thread, trained once and cached) is an independent second opinion; this prints
adherence under both (the 320 eval prompts and the 240 binding prompts x seeds 0-3). `training.train`
records the second judge's figures in metrics.json too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from edgegen.export.families.gan import load_generator
from edgegen.export.judge import load_judge

from .dataset import binding_captions, eval_captions
from .evaluate import evaluate
from .judge import train_judge
from .text_states import cached_states

CACHE = Path.home() / ".cache" / "edgegen-emoji64"
SECOND_JUDGE_SEED = 1


def second_judge(root: Path = CACHE / f"judge-seed{SECOND_JUDGE_SEED}", log=print) -> Path:
    """The directory holding the second judge (``judge/`` and ``real_features.npz``), trained if absent."""
    if not (root / "judge" / "model.safetensors").is_file():
        train_judge(root, 1000, 300, seed=SECOND_JUDGE_SEED, log=log)
    return root


def score(generator, root: Path, states, mask, evals) -> dict:
    """Adherence, accuracies and Fréchet distance of ``generator`` under the judge in ``root``."""
    real = np.load(root / "real_features.npz")
    r = evaluate(generator, load_judge(root / "judge").eval(), states, mask, evals, real["mu"], real["sigma"])
    return {
        k: round(v, 4)
        for k, v in r.items()
        if k.startswith(("adherence", "emoji_acc", "background_acc", "frechet"))
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("export/emoji64"))
    p.add_argument("--judge-dir", type=Path, default=CACHE / f"judge-seed{SECOND_JUDGE_SEED}")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    root = second_judge(a.judge_dir)
    gen = load_generator(a.model / "generator")
    evals = eval_captions() + binding_captions()
    states, mask = cached_states([c.text for c in evals], gen.config.max_length, CACHE, print)
    for name, judge_root in (("shipped judge", a.model), (f"second judge (seed {SECOND_JUDGE_SEED})", root)):
        print(name, json.dumps(score(gen, judge_root, states, mask, evals)), flush=True)


if __name__ == "__main__":
    main()

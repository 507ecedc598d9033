"""Score the shipped generator with a second judge that training never saw.

    python -m training.crosscheck [--model export/emoji64] [--judge-dir ~/.cache/edgegen-emoji64/judge-seed1]

The generator was trained with the shipped judge's cross-entropy, so that judge's adherence can be
inflated by features it likes rather than by the emoji (see the model card). This trains the same judge
recipe with another seed (seed 1, ~9 min at one thread, once) and prints adherence under both.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from edgegen.export.families.gan import load_generator
from edgegen.export.judge import load_judge

from .dataset import eval_captions
from .evaluate import evaluate
from .judge import train_judge
from .text_states import cached_states

CACHE = Path.home() / ".cache" / "edgegen-emoji64"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("export/emoji64"))
    p.add_argument("--judge-dir", type=Path, default=CACHE / "judge-seed1")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if not (a.judge_dir / "judge" / "model.safetensors").is_file():
        train_judge(a.judge_dir, 1000, 300, seed=1, log=print)
    gen = load_generator(a.model / "generator")
    evals = eval_captions()
    states, mask = cached_states([c.text for c in evals], gen.config.max_length, CACHE, print)
    for name, root in (("shipped judge (trained against)", a.model), ("second judge (seed 1, never trained against)", a.judge_dir)):
        real = np.load(root / "real_features.npz")
        r = evaluate(gen, load_judge(root / "judge").eval(), states, mask, evals, real["mu"], real["sigma"])
        print(name, json.dumps({k: round(v, 3) for k, v in r.items()
                                if k.startswith(("adherence", "emoji_acc", "frechet"))}), flush=True)


if __name__ == "__main__":
    main()

"""The README's example grid: prompts rendered by the shipped default model through the lean runtime.

    python -m training.examples [--out docs/examples] [--bundle BUNDLE]

Writes one PNG per prompt (4 seeds side by side, upscaled 2x with nearest neighbour so pixels stay
honest) and ``examples.md``, the Markdown table the README embeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# Seen phrasings, held-out templates, held-out synonyms ("kitten", "cheeseburger", "spacecraft" never
# trained) and binding: a colour word in the subject's name against another background (issue 21's cases).
PROMPTS = [
    ("a rocket on a blue background", "seen"),
    ("a large robot face on a yellow background", "seen"),
    ("small slice of pizza emoji, black background", "seen"),
    ("a red backdrop, big snowman in the middle", "held-out template"),
    ("a picture of a small tiger against a green backdrop", "held-out template"),
    ("an emoji of a kitten on pink", "held-out synonym"),
    ("a cheeseburger on a white background", "held-out synonym"),
    ("spacecraft on purple", "held-out synonym"),
    ("small red apple, green background", "binding"),
    ("green broccoli on a red background", "binding"),
    ("red cherries on a black background", "binding"),
]
SEEDS = [0, 1, 2, 3]


def main(argv=None):
    from edgegen.runtime import Pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/examples"))
    p.add_argument("--bundle", help="default: the shipped model's bundle (exported once into the cache)")
    p.add_argument("--precision", default="fp32")
    a = p.parse_args(argv)
    if a.bundle is None:
        from edgegen.export import default_bundle

        a.bundle = default_bundle()
    pipe = Pipeline.from_bundle(a.bundle, backend="ort-cpu", precision=a.precision)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = ["| prompt | phrasing | seeds 0-3 |", "|---|---|---|"]
    from PIL import Image

    for i, (prompt, kind) in enumerate(PROMPTS):
        images = pipe([prompt] * len(SEEDS), seed=SEEDS, output_type="uint8")
        strip = np.concatenate(list(images), axis=1).repeat(2, 0).repeat(2, 1)
        name = f"{i:02d}.png"
        Image.fromarray(strip).save(a.out / name)
        rows.append(f"| {prompt} | {kind} | ![{prompt}]({a.out.as_posix()}/{name}) |")
    (a.out / "examples.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

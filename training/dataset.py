"""Renders of (emoji, background, size, jitter) and the captions that describe them.

Everything is deterministic given a seed: glyphs are rendered once with Pillow (Noto Color Emoji only
renders at 109 px, so we render at 109 and resize down) and cached as numpy arrays; a sample is then
an alpha composite onto a flat background at an integer offset, which is cheap enough to do per batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from .emoji_set import EMOJI

FONT_PATH = Path(os.environ.get("EDGEGEN_EMOJI_FONT", "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"))
IMAGE_SIZE = 64
JITTER = 3  # max |offset| in px: the only variation a caption does not explain (the noise's job)

# Distinct, mid-saturation colours: none equals a dominant emoji colour exactly, so glyphs stay visible.
BACKGROUNDS = [
    ("red", (214, 48, 49)),
    ("orange", (240, 140, 30)),
    ("yellow", (245, 215, 60)),
    ("green", (46, 160, 67)),
    ("blue", (40, 100, 220)),
    ("purple", (128, 60, 170)),
    ("pink", (245, 150, 200)),
    ("white", (250, 250, 250)),
    ("black", (15, 15, 15)),
    ("gray", (128, 128, 128)),
]
BG_NAMES = [n for n, _ in BACKGROUNDS]
SIZES = {"small": 32, "large": 58}  # glyph box side in px: 50% vs 90% of the 64 px canvas
SIZE_NAMES = list(SIZES)
SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}

# Caption templates. {a_name} = name with "a"/"an"; {size} is one of SIZE_WORDS. Templates without
# {size} leave the size unspecified (the generator may pick either).
TRAIN_TEMPLATES = [
    "{a_size_name} on a {color} background",
    "{name}, {color} background",
    "{a_color} background with {a_size_name}",
    "{size} {name} emoji, {color} background",
    "an emoji of {a_name} on {color}",
    "{name} on {color}",
    "{a_size_name} over a {color} background",
    "an image of {a_name}, {color} background",
    "{size} {name} sticker on {color}",
    "{a_name} drawn on {a_color} background",
    "emoji: {name}; background: {color}",
    "{a_color} square with {a_size_name} on it",
]
HELDOUT_TEMPLATES = [
    "a picture of {a_size_name} against a {color} backdrop",
    "{color} backdrop, {size} {name} in the middle",
    "{a_name} icon with a {color} background",
]


def article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(template: str, name: str, color: str, size_word: str) -> str:
    return template.format(
        name=name,
        color=color,
        a_color=article(color),
        size=size_word,
        a_name=article(name),
        a_size_name=article(f"{size_word} {name}"),
    )


def template_has_size(template: str) -> bool:
    return "size" in template


def font_available() -> bool:
    return FONT_PATH.is_file()


@cache
def glyphs(side: int) -> tuple[np.ndarray, np.ndarray]:
    """All emoji at ``side`` px: premultiplied RGB (N, side, side, 3) and alpha (N, side, side, 1), float32
    0..1."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(FONT_PATH), 109)
    rgb, alpha = [], []
    for e in EMOJI:
        im = Image.new(
            "RGBA", (136, 136), (0, 0, 0, 0)
        )  # the font's glyph box is 136x128: centre it vertically
        ImageDraw.Draw(im).text((0, 4), e.char, font=font, embedded_color=True)
        arr = (
            np.asarray(im.resize((side, side), Image.LANCZOS), dtype=np.float32) / 255.0
        )  # Pillow premultiplies for RGBA
        a = arr[..., 3:]
        rgb.append(arr[..., :3] * a)
        alpha.append(a)
    return np.stack(rgb), np.stack(alpha)


def render(emoji_index: int, background: int, size: str, jitter: tuple[int, int] = (0, 0)) -> np.ndarray:
    """One 64x64 RGB uint8 image: the emoji at ``size``, centred then shifted by ``jitter`` (dx, dy) px."""
    side = SIZES[size]
    rgb, alpha = glyphs(side)
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    canvas[:] = np.asarray(BACKGROUNDS[background][1], np.float32) / 255.0
    x0 = (IMAGE_SIZE - side) // 2 + int(jitter[0])
    y0 = (IMAGE_SIZE - side) // 2 + int(jitter[1])
    window = canvas[y0 : y0 + side, x0 : x0 + side]
    window[:] = rgb[emoji_index] + window * (1.0 - alpha[emoji_index])
    return np.rint(canvas * 255.0).astype(np.uint8)


@dataclass
class Batch:
    emoji: np.ndarray  # (B,) int
    background: np.ndarray  # (B,) int
    size: np.ndarray  # (B,) int index into SIZE_NAMES
    images: np.ndarray  # (B, 64, 64, 3) uint8


def random_labels(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        rng.integers(len(EMOJI), size=n),
        rng.integers(len(BACKGROUNDS), size=n),
        rng.integers(len(SIZES), size=n),
    )


def render_batch(rng: np.random.Generator, emoji, background, size) -> Batch:
    """Renders with random jitter drawn from ``rng`` (so a seed fixes the whole batch)."""
    jit = rng.integers(-JITTER, JITTER + 1, size=(len(emoji), 2))
    images = np.stack([render(e, b, SIZE_NAMES[s], j) for e, b, s, j in zip(emoji, background, size, jit)])
    return Batch(np.asarray(emoji), np.asarray(background), np.asarray(size), images)


def to_tensor(images: np.ndarray):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the generator's and judge's range."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --- captions -------------------------------------------------------------------------------------


@dataclass
class Caption:
    text: str
    emoji: int
    background: int
    size: int | None  # None: the caption does not say
    split: str  # "train" (training templates and names), "seen" (eval, same) or "heldout"
    novelty: str = ""  # for "heldout": "template" (a held-out template) or "synonym" (a held-out name)


def kind(c: Caption) -> str:
    """What an evaluation caption tests: "seen", "template" or "synonym" (held out), or "binding"."""
    return "binding" if c.split == "binding" else c.novelty or c.split


def training_captions(per_pair: int = 6, seed: int = 0) -> list[Caption]:
    """``per_pair`` captions for every (emoji, background) pair, from training templates and names only."""
    rng = np.random.default_rng(seed)
    out = []
    for e in EMOJI:
        for b, (color, _) in enumerate(BACKGROUNDS):
            seen = set()
            for _ in range(per_pair):
                c = _sample_caption(rng, e.train_names, TRAIN_TEMPLATES, e.id, b, color, "train")
                if c.text not in seen:  # duplicates would only cost encoder time
                    seen.add(c.text)
                    out.append(c)
    return out


def _sample_caption(rng, names, templates, e, b, color, split, novelty="") -> Caption:
    template = templates[rng.integers(len(templates))]
    name = names[rng.integers(len(names))]
    size = int(rng.integers(len(SIZES))) if template_has_size(template) else None
    word = SIZE_WORDS[SIZE_NAMES[size]][rng.integers(2)] if size is not None else ""
    return Caption(caption(template, name, color, word), e, b, size, split, novelty)


def eval_captions(n_seen: int = 160, n_heldout: int = 160, seed: int = 1234) -> list[Caption]:
    """The fixed evaluation prompts. "seen": training templates and names (new combinations);
    "heldout": half held-out templates with training names, half held-out synonyms with training templates."""
    rng = np.random.default_rng(seed)
    with_heldout_names = [e for e in EMOJI if e.heldout_names]
    out = []
    for _i in range(n_seen):
        e, b = EMOJI[rng.integers(len(EMOJI))], int(rng.integers(len(BACKGROUNDS)))
        out.append(_sample_caption(rng, e.train_names, TRAIN_TEMPLATES, e.id, b, BG_NAMES[b], "seen"))
    for i in range(n_heldout):
        b = int(rng.integers(len(BACKGROUNDS)))
        if i % 2 == 0:
            e = EMOJI[rng.integers(len(EMOJI))]
            out.append(
                _sample_caption(
                    rng, e.train_names, HELDOUT_TEMPLATES, e.id, b, BG_NAMES[b], "heldout", "template"
                )
            )
        else:
            e = with_heldout_names[rng.integers(len(with_heldout_names))]
            out.append(
                _sample_caption(
                    rng, e.heldout_names, TRAIN_TEMPLATES, e.id, b, BG_NAMES[b], "heldout", "synonym"
                )
            )
    return out


# --- binding: which colour word goes with what ----------------------------------------------------
# A prompt read as a bag of words cannot tell "a green apple on a red background" from "a red apple on
# a green background". These subjects' everyday names carry a colour word (the colour they are drawn
# in); a binding prompt puts one against a background of another colour, in either order, sometimes
# with a size word and a colour word that names neither (a distractor: "..., not blue").
COLOURED_SUBJECTS = {
    "tomato": ["red tomato", "ripe red tomato"],
    "green apple": ["green apple", "crisp green apple"],
    "sunflower": ["yellow flower", "yellow sunflower"],
    "swan": ["white swan"],
    "broccoli": ["green broccoli", "green vegetable"],
    "cherries": ["red cherries"],
    "strawberry": ["red strawberry"],
    "banana": ["yellow banana"],
    "blueberries": ["blueberries"],
    "leafy green": ["leafy green"],
    "green salad": ["green salad"],
    "red gift envelope": ["red gift envelope"],
    "hot pepper": ["red hot pepper", "red chili"],
    "avocado": ["green avocado"],
    "kiwifruit": ["green kiwifruit"],
    "fire engine": ["red fire engine"],
    "taxi": ["yellow taxi"],
    "snowman": ["white snowman"],
    "frog face": ["green frog"],
    "evergreen tree": ["green pine tree"],
    "lady beetle": ["red ladybug"],
    "ghost": ["white ghost"],
    "panda face": ["black and white panda"],
    "zebra face": ["black and white zebra"],
    "penguin": ["black and white penguin"],
    "cheese wedge": ["yellow cheese"],
    "fox face": ["orange fox"],
    "tiger": ["orange tiger"],
    "jack-o-lantern": ["orange pumpkin"],
    "crab": ["red crab"],
    "lobster": ["red lobster"],
    "grapes": ["purple grapes"],
    "olive": ["green olive"],
    "honeybee": ["yellow bee"],
    "fire": ["orange fire"],
}
# {subject} / {a_subject}: the subject phrase; {size} a size word; {distractor} a colour named by neither.
BINDING_TRAIN_TEMPLATES = [
    "{a_subject} on a {color} background",
    "{color} background, {size} {subject}",
    "{subject} in front of {color}",
    "a {color} backdrop behind {a_size_subject}",
    "{subject} that is {size}, background that is {color}",
    "{a_color} background with {a_subject}, not {distractor}",
    "{size} {subject}; the background is {color}, not {distractor}",
    "on {color}: {a_size_subject}",
]
BINDING_HELDOUT_TEMPLATES = [
    "{color} background behind {a_size_subject}",
    "{a_subject} against {a_color} backdrop, no {distractor}",
    "a {size} {subject} in front of a {color} background",
]
# Colour adjectives training puts on any subject's name (the model cannot recolour an emoji, so it must
# learn to read them as part of the subject, never as the background).
SUBJECT_COLOURS = BG_NAMES + ["brown", "golden", "dark", "bright"]


def binding_caption(template: str, subject: str, color: str, size_word: str, distractor: str) -> str:
    return template.format(
        subject=subject,
        a_subject=article(subject),
        a_size_subject=article(f"{size_word} {subject}"),
        color=color,
        a_color=article(color),
        size=size_word,
        distractor=distractor,
    )


def _binding_sample(rng, template, subject, e, b, split, novelty="") -> Caption:
    """A binding caption of ``template`` with a random size word and a distractor colour that names
    neither the background nor a colour in the subject's phrase."""
    size = int(rng.integers(len(SIZES))) if template_has_size(template) else None
    word = SIZE_WORDS[SIZE_NAMES[size]][rng.integers(2)] if size is not None else ""
    free = [c for c in BG_NAMES if c != BG_NAMES[b] and c not in subject.split()]
    text = binding_caption(template, subject, BG_NAMES[b], word, free[rng.integers(len(free))])
    return Caption(text, e, b, size, split, novelty)


def binding_captions(n: int = 240, seed: int = 4321) -> list[Caption]:
    """The binding evaluation set: ``n`` prompts (split "binding"), each a COLOURED_SUBJECTS phrase on a
    background of another colour. Two thirds use training's binding templates (novelty ""), one third
    templates training never sees (novelty "template"). None of their texts is a training caption
    (``binding_training_captions`` drops them)."""
    rng = np.random.default_rng(seed)
    by_name = {e.name: e for e in EMOJI}
    items = [(by_name[name], phrase) for name, phrases in COLOURED_SUBJECTS.items() for phrase in phrases]
    out, seen = [], set()
    while len(out) < n:
        e, subject = items[len(out) % len(items)]
        others = [i for i, c in enumerate(BG_NAMES) if c not in subject.split()]
        b = others[rng.integers(len(others))]
        heldout = len(out) % 3 == 2
        templates = BINDING_HELDOUT_TEMPLATES if heldout else BINDING_TRAIN_TEMPLATES
        c = _binding_sample(
            rng, templates[rng.integers(len(templates))], subject, e.id, b, "binding", "template" * heldout
        )
        if c.text not in seen:
            seen.add(c.text)
            out.append(c)
    return out


def binding_training_captions(per_pair: int = 2, seed: int = 0) -> list[Caption]:
    """``per_pair`` binding captions for every (emoji, background) pair: a training name, often with a
    colour adjective (sometimes the background's own colour), in BINDING_TRAIN_TEMPLATES. The binding
    evaluation prompts are never among them."""
    rng = np.random.default_rng(seed + 1)
    held = {c.text for c in binding_captions()}
    out = []
    for e in EMOJI:
        for b in range(len(BACKGROUNDS)):
            for _ in range(per_pair):
                name = e.train_names[rng.integers(len(e.train_names))]
                if rng.random() < 0.7:
                    name = f"{SUBJECT_COLOURS[rng.integers(len(SUBJECT_COLOURS))]} {name}"
                template = BINDING_TRAIN_TEMPLATES[rng.integers(len(BINDING_TRAIN_TEMPLATES))]
                c = _binding_sample(rng, template, name, e.id, b, "train")
                if c.text not in held:
                    out.append(c)
    return out

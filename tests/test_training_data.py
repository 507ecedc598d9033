"""emoji64's training data: renders are deterministic and captions describe exactly what is rendered."""

import re

import numpy as np
import pytest

from training.dataset import (
    BACKGROUNDS,
    BG_NAMES,
    HELDOUT_TEMPLATES,
    SIZE_WORDS,
    eval_captions,
    font_available,
    random_labels,
    render,
    render_batch,
    training_captions,
)
from training.emoji_set import EMOJI

if not font_available():
    pytest.skip(
        "Noto Color Emoji not installed (apt-get install fonts-noto-color-emoji)", allow_module_level=True
    )


def test_emoji_set():
    assert len(EMOJI) >= 300
    assert len({e.char for e in EMOJI}) == len(EMOJI) and len({e.name for e in EMOJI}) == len(EMOJI)
    assert all(len(e.char) == 1 for e in EMOJI)


def test_render_is_deterministic_given_seed():
    def batch(seed):
        rng = np.random.default_rng(seed)
        return render_batch(rng, *random_labels(rng, 16)).images

    a, b, c = batch(3), batch(3), batch(4)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_every_emoji_renders_visibly():
    for e in EMOJI:
        img = render(e.id, BG_NAMES.index("gray"), "small")
        assert (np.abs(img.astype(int) - 128).sum(-1) > 30).mean() > 0.05, e.name


def test_background_is_the_named_rgb():
    for b, (_, rgb) in enumerate(BACKGROUNDS):
        img = render(0, b, "large", (3, 3))
        assert (img[0, 0] == rgb).all() and (img[-1, 0] == rgb).all()


def foreground_area(img, b):
    return (np.abs(img.astype(int) - np.array(BACKGROUNDS[b][1])).sum(-1) > 24).mean()


def test_small_and_large_differ_in_foreground_area():
    rng = np.random.default_rng(0)
    for e in rng.choice(len(EMOJI), 20, replace=False):
        b = BG_NAMES.index("gray")
        small, large = foreground_area(render(e, b, "small"), b), foreground_area(render(e, b, "large"), b)
        assert large > 2.0 * small, EMOJI[e].name


def words(text):
    return set(re.findall(r"[a-z]+", text))


@pytest.mark.parametrize("captions", [training_captions(2, seed=1), eval_captions()], ids=["train", "eval"])
def test_captions_match_controls(captions):
    for c in captions:
        e = EMOJI[c.emoji]
        names = [n for n in e.train_names + e.heldout_names if re.search(rf"\b{re.escape(n)}\b", c.text)]
        assert names, f"{c.text!r} names no form of {e.name!r}"
        rest = c.text
        for n in sorted(
            names, key=len, reverse=True
        ):  # colour and size words inside the emoji's own name ("blueberries") do not count
            rest = re.sub(rf"\b{re.escape(n)}\b", " ", rest)
        assert words(rest) & set(BG_NAMES) == {BG_NAMES[c.background]}, c.text
        said = {s for s, ws in enumerate(SIZE_WORDS.values()) if words(rest) & set(ws)}
        assert said == (set() if c.size is None else {c.size}), c.text


def test_heldout_phrasing_never_trains():
    train = training_captions(6, seed=0)
    patterns = [re.compile(re.sub(r"\\{[a-z_]+\\}", ".+", re.escape(t)) + "$") for t in HELDOUT_TEMPLATES]
    heldout_names = {n for e in EMOJI for n in e.heldout_names}
    for c in train:
        assert not any(p.match(c.text) for p in patterns), c.text
        assert any(re.search(rf"\b{re.escape(n)}\b", c.text) for n in EMOJI[c.emoji].train_names), c.text
    assert heldout_names and {c.split for c in eval_captions()} == {"seen", "heldout"}


def test_binding_set_puts_coloured_subjects_on_other_colours_in_both_orders():
    from training.dataset import COLOURED_SUBJECTS, binding_captions

    binding = binding_captions()
    assert len(binding) >= 200 and {c.split for c in binding} == {"binding"}
    assert len({c.text for c in binding}) == len(binding)
    subject_first = 0
    for c in binding:
        e = EMOJI[c.emoji]
        phrase = next(p for p in COLOURED_SUBJECTS[e.name] if p in c.text)
        colour = BG_NAMES[c.background]
        assert colour not in words(phrase), c.text  # the subject's colour word is never the background's
        rest = c.text.replace(phrase, " ")
        assert colour in words(rest), c.text
        subject_first += c.text.index(phrase) < c.text.index(colour)
    assert 0.2 < subject_first / len(binding) < 0.8  # both orders, in good measure
    assert {c.novelty for c in binding} == {"", "template"}


def test_binding_prompts_and_heldout_binding_templates_never_train():
    from training.dataset import BINDING_HELDOUT_TEMPLATES, binding_captions, binding_training_captions

    train = {c.text for c in training_captions(6, seed=0) + binding_training_captions(2, seed=0)}
    assert not train & {c.text for c in binding_captions()}
    patterns = [
        re.compile(re.sub(r"\\{[a-z_]+\\}", ".+", re.escape(t)) + "$") for t in BINDING_HELDOUT_TEMPLATES
    ]
    assert not [t for t in train if any(p.match(t) for p in patterns)]


def test_binding_training_captions_name_their_background_outside_the_subject():
    from training.dataset import binding_training_captions

    captions = binding_training_captions(1, seed=3)
    assert len(captions) > 0.9 * len(EMOJI) * len(BACKGROUNDS)
    for c in captions[::7]:
        colour = BG_NAMES[c.background]
        names = [n for n in EMOJI[c.emoji].train_names if re.search(rf"\b{re.escape(n)}\b", c.text)]
        assert names, c.text
        # the background's colour word follows "background"/"backdrop"/"on"/"front of"/"is"
        assert re.search(rf"({colour} (background|backdrop)|(on|of|is) {colour}\b)", c.text), c.text

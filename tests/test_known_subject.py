"""The subject memory's known-subject head (training/known.py, export/generator.py)."""

import re

import numpy as np
import torch
from edgegen.export.generator import ConceptMemory

from training.emoji_set import EMOJI
from training.known import GENERIC, unknown_captions, unknown_names


def test_unknown_names_are_no_known_subject_and_split_by_name():
    train, held = unknown_names()
    assert len(train) > 500 and len(held) > 100 and not set(train) & set(held)
    known = {w for e in EMOJI for n in e.train_names + e.heldout_names for w in n.split()}
    for name in train + held:
        assert not (set(re.findall(r"[a-z]+", name)) - GENERIC) & known, name
    assert "dragon" in train + held and "tiger face" not in train + held  # a tiger is known
    assert unknown_names() == (train, held)


def test_unknown_captions_name_each_subject_and_are_reproducible():
    texts = unknown_captions(["dragon", "castle"], ["a {name} on a {color} background"], 3, seed=0)
    assert len(texts) == 6 and all("dragon" in t for t in texts[:3]) and all("castle" in t for t in texts[3:])
    assert texts == unknown_captions(["dragon", "castle"], ["a {name} on a {color} background"], 3, seed=0)


def test_reported_probabilities_are_the_softmax_times_the_known_head():
    torch.manual_seed(0)
    plain, known = ConceptMemory(8, 5, 4, heads=1), ConceptMemory(8, 5, 4, heads=1, known=True)
    states, mask = torch.randn(3, 6, 8), torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    read = plain.read(states, mask)
    logits = plain.logits(read)
    assert torch.allclose(plain.reported(read, logits), logits.softmax(-1))
    sure = torch.sigmoid(known.known(ConceptMemory.known_features(read, logits)))
    assert torch.allclose(known.reported(read, logits), logits.softmax(-1) * sure)
    assert (known.reported(read, logits).sum(-1) < 1).all()


def test_known_features_stay_finite_in_float16_for_a_one_hot_softmax():
    logits = torch.tensor([[30.0, -30.0, -30.0]], dtype=torch.float16)
    features = ConceptMemory.known_features(torch.zeros(1, 4, dtype=torch.float16), logits)
    assert np.isfinite(features.float().numpy()).all() and abs(float(features[0, -1])) < 1e-2

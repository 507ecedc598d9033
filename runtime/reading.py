"""What a gan model read from each prompt (its concept memories' probabilities, which the exported graphs
output where the manifest has ``reading``), and the warning for a subject it does not know."""

from __future__ import annotations

import re

import numpy as np

# Below this probability for its most likely subject, the model is guessing. The shipped emoji64's subject
# p is the lookup's softmax times its known-subject head (training/known.py): no seen, held-out-template or
# binding prompt reads below it, 0.95 of prompts naming subjects it never saw do, and about half of the
# held-out synonyms it reads wrong. A prompt can still read high around a word it never saw (the head
# judges the whole prompt: "an astronaut riding a horse" -> rocket, 0.93), so unknown words warn too.
SUBJECT_THRESHOLD = 0.5
TOP = 3  # alternatives listed per concept
WORD = re.compile(r"[a-z][a-z'-]*")


def concepts(reading: dict) -> dict[str, dict]:
    """The manifest reading's concept entries ({name: {"output", "labels"}}; not its vocabulary list)."""
    return {name: spec for name, spec in reading.items() if isinstance(spec, dict) and "output" in spec}


def copy_probabilities(concepts: dict, outs: dict, batch: int) -> dict[str, np.ndarray]:
    """The probability rows of a call's images, copied: the graph's output buffers are the next call's."""
    return {spec["output"]: outs[spec["output"]][:batch].copy() for spec in concepts.values()}


def top(row: np.ndarray, labels: list[str]) -> list[list]:
    """The TOP most likely [name, p] of one probability row, most likely first."""
    order = np.argsort(-row, kind="stable")[:TOP]
    return [[labels[i], round(float(row[i]), 4)] for i in order]


def read_outputs(concepts: dict, probs: dict, batch: int) -> list[dict]:
    """Per image, {concept: {"name", "p", "top": [[name, p], ...]}} from the graph's probability outputs."""
    per_image = [{} for _ in range(batch)]
    for concept, spec in concepts.items():
        for image, row in zip(per_image, np.asarray(probs[spec["output"]][:batch], dtype=np.float64)):
            best = top(row, spec["labels"])
            image[concept] = {"name": best[0][0], "p": best[0][1], "top": best}
    return per_image


def unknown_words(prompt: str, vocabulary: frozenset[str]) -> list[str]:
    """The prompt's words the model never saw in training (names, colours, sizes, caption words)."""
    return [w for w in WORD.findall(prompt.lower()) if w not in vocabulary]


def unknown_subject_note(
    model: str, prompt: str, subject: np.ndarray, labels: list[str], vocabulary: frozenset[str]
) -> str | None:
    """A warning when the subject's probability (``subject``: the image's row of subject probabilities) is
    below SUBJECT_THRESHOLD or the prompt has words the model never read, naming them and the nearest
    subjects it knows; None when neither. Cheap when it is None: it runs on every call."""
    words = unknown_words(prompt, vocabulary) if vocabulary else []
    if not words and float(subject.max()) >= SUBJECT_THRESHOLD:
        return None
    best = top(np.asarray(subject, dtype=np.float64), labels)
    nearest = ", ".join(f"{name!r} (p={p:.2f})" for name, p in best)
    drew = f"drew {best[0][0]!r} (p={best[0][1]:.2f})"
    said = f"knows no {' '.join(words)!r}" if words else f"is unsure what {prompt!r} asks for"
    return f"{model} {said}; {drew}; nearest it knows: {nearest}"

"""What a gan model read from each prompt (its concept memories' probabilities, which the exported graphs
output where the manifest has ``reading``), and the warning for a subject it does not know."""

from __future__ import annotations

import re

import numpy as np

# Below this probability (the lookup's unsharpened softmax) for its most likely subject, the model is
# guessing. Measured on the mean-only model before the token-level one (training/README.md): no seen,
# held-out-template or binding prompt reads below it; a third of the held-out synonyms it gets wrong do. The
# softmax is over known subjects only, so a word it never saw can still read high (the shipped model: "an
# astronaut" -> rocket, 1.00): unknown words warn too.
SUBJECT_THRESHOLD = 0.5
TOP = 3  # alternatives listed per concept


def read_outputs(reading: dict, outs: dict, batch: int) -> list[dict]:
    """Per image, {concept: {"name", "p", "top": [[name, p], ...]}} from the graph's probability outputs."""
    per_image = [{} for _ in range(batch)]
    for concept, spec in reading.items():
        if not isinstance(spec, dict) or "output" not in spec:
            continue  # e.g. the vocabulary list
        probs = np.asarray(outs[spec["output"]][:batch], dtype=np.float64)
        labels = spec["labels"]
        for image, row in zip(per_image, probs):
            order = np.argsort(-row, kind="stable")[:TOP]
            top = [[labels[i], round(float(row[i]), 4)] for i in order]
            image[concept] = {"name": top[0][0], "p": top[0][1], "top": top}
    return per_image


def unknown_words(prompt: str, vocabulary: frozenset[str]) -> list[str]:
    """The prompt's words the model never saw in training (names, colours, sizes, caption words)."""
    return [w for w in re.findall(r"[a-z][a-z'-]*", prompt.lower()) if w not in vocabulary]


def unknown_subject_note(model: str, prompt: str, read: dict, vocabulary: frozenset[str]) -> str | None:
    """A warning when the subject's probability is below SUBJECT_THRESHOLD or the prompt has words the
    model never read, naming them and the nearest subjects it knows; None when neither."""
    subject = read.get("subject")
    words = unknown_words(prompt, vocabulary) if vocabulary else []
    if subject is None or (subject["p"] >= SUBJECT_THRESHOLD and not words):
        return None
    nearest = ", ".join(f"{name!r} (p={p:.2f})" for name, p in subject["top"])
    drew = f"drew {subject['name']!r} (p={subject['p']:.2f})"
    said = f"knows no {' '.join(words)!r}" if words else f"is unsure what {prompt!r} asks for"
    return f"{model} {said}; {drew}; nearest it knows: {nearest}"

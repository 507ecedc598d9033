"""What the model read (runtime/reading.py): per image names and probabilities, and the warning for a
subject it does not know."""

import numpy as np
from edgegen.runtime.reading import (
    SUBJECT_THRESHOLD,
    concepts,
    read_outputs,
    unknown_subject_note,
    unknown_words,
)

MANIFEST_READING = {
    "subject": {"output": "subject_probs", "labels": ["rocket", "satellite", "cat", "dog"]},
    "background": {"output": "background_probs", "labels": ["red", "blue"]},
    "vocabulary": ["a", "on", "blue", "background", "rocket", "satellite", "cat", "dog", "red"],
}
READING = concepts(MANIFEST_READING)  # as GanPipeline holds them
VOCABULARY = frozenset(MANIFEST_READING["vocabulary"])


def outputs(subject_rows, background_rows):
    return {
        "subject_probs": np.array(subject_rows, np.float32),
        "background_probs": np.array(background_rows, np.float32),
    }


def test_the_manifest_reading_s_concepts_leave_out_its_vocabulary():
    assert list(READING) == ["subject", "background"]


def test_read_outputs_names_the_most_likely_concepts_in_order():
    read = read_outputs(READING, outputs([[0.1, 0.2, 0.6, 0.1], [0.31, 0.3, 0.2, 0.19]], [[0, 1], [1, 0]]), 2)
    assert read[0]["subject"]["name"] == "cat" and read[0]["background"]["name"] == "blue"
    assert [n for n, _ in read[1]["subject"]["top"]] == ["rocket", "satellite", "cat"]
    assert abs(read[1]["subject"]["p"] - 0.31) < 1e-6


LABELS = READING["subject"]["labels"]


def row(*p):
    return np.array(p, np.float32)


def test_unknown_subject_warns_with_the_unknown_words_and_the_nearest_known():
    prompt = "an astronaut on a blue background"
    assert unknown_words(prompt, VOCABULARY) == ["an", "astronaut"]
    note = unknown_subject_note("emoji64", prompt, row(0.31, 0.3, 0.2, 0.19), LABELS, VOCABULARY | {"an"})
    assert note.startswith("emoji64 knows no 'astronaut'; drew 'rocket' (p=0.31)")
    assert "'satellite' (p=0.30)" in note


def test_a_clear_subject_gives_no_warning_and_a_blurred_one_does():
    assert unknown_subject_note("m", "a rocket", row(0.9, 0.05, 0.03, 0.02), LABELS, VOCABULARY) is None
    p = SUBJECT_THRESHOLD - 0.01
    note = unknown_subject_note("m", "a rocket", row(0.2, 0.2, 0.6 - p, p), LABELS, frozenset())
    assert "is unsure what 'a rocket' asks for" in note  # no vocabulary: the prompt
    assert "drew 'dog' (p=0.49)" in note  # the most likely subject, not the first


def test_a_word_it_never_read_warns_even_when_the_subject_reads_high():
    note = unknown_subject_note(
        "emoji64", "an astronaut", row(0.97, 0.01, 0.01, 0.01), LABELS, VOCABULARY | {"an"}
    )
    assert note.startswith("emoji64 knows no 'astronaut'; drew 'rocket' (p=0.97)")

"""A call's stateless host steps, each in C where the optional module is built, else in numpy.

``hostpath`` is the compiled ``_hostpath`` module (runtime/_hostpath.c), or None where the install could not
build it (no C compiler) or where ``EDGEGEN_PURE_PYTHON=1`` is set at run time; each function below then runs
its numpy twin, with the same values (tested against each other). Callers never ask which one runs: setting
``native.hostpath = None`` (tests do) switches every step at once. `edgegen doctor` says which runs.

Why C at all: right after an engine run has evicted the CPU caches, every Python or numpy operation costs
5-16x what it costs warm (`python -m benchmarks.host_steps`); the C steps touch far less memory.
"""

from __future__ import annotations

import os
import re

import numpy as np

PURE_PYTHON = os.environ.get("EDGEGEN_PURE_PYTHON", "") not in ("", "0")
# A plain prompt: ASCII words (letters, digits) one space apart (see tokenize.PromptTokenizer).
PLAIN = re.compile(r"[A-Za-z0-9]+(?: [A-Za-z0-9]+)*")


def _load():
    if PURE_PYTHON:
        return None
    try:
        from . import _hostpath
    except ImportError:
        return None
    return _hostpath


hostpath = _load()


def fill_noise(seeds: list[int], out: np.ndarray) -> np.ndarray:
    """``out[i]`` gets ``np.random.default_rng(seeds[i]).standard_normal`` values; ``out`` is C-contiguous
    float32 (a bound buffer). C redoes numpy's seeding, then calls numpy's own sampler (libnpyrandom)."""
    if hostpath is not None:
        hostpath.noise(seeds, out)  # checks out's layout itself
        return out
    for i, s in enumerate(seeds):  # drawn straight into the buffer: no temporary, no copy
        np.random.default_rng(s).standard_normal(dtype=np.float32, out=out[i])
    return out


def words(prompt: str, first: dict, later: dict, head: list, tail: list, max_length: int) -> list[int] | None:
    """A plain prompt's token ids from a word cache: head, each word's ids (``first`` for the first word,
    ``later`` after it), tail. None when the prompt is not plain, a word is not cached, or the ids would pass
    ``max_length`` (truncation follows the tokenizers library's rules, so it tokenizes those)."""
    if hostpath is not None:
        return hostpath.words(prompt, first, later, head, tail, max_length)
    if not PLAIN.fullmatch(prompt):
        return None
    ids = list(head)
    for k, word in enumerate(prompt.split(" ")):
        known = (later if k else first).get(word)
        if known is None:
            return None
        ids += known
    ids += tail
    return ids if len(ids) <= max_length else None


def write_tokens(rows: list[list[int]], ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int) -> None:
    """``rows`` right-padded to ``length`` into ``ids`` and ``mask`` ((B, length) int64 or int32)."""
    if hostpath is not None:
        hostpath.tokens(rows, ids, mask, length, pad_id)  # checks the buffers' layout itself
        return
    ids.fill(pad_id)
    mask.fill(0)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1


def copy(array: np.ndarray) -> np.ndarray:
    """A new array equal to ``array`` (C-contiguous): a call's images out of a bound output buffer."""
    return hostpath.copy(array) if hostpath is not None else array.copy()


def copy_rows(array: np.ndarray, row: int, count: int) -> np.ndarray:
    """A new array equal to ``array[row, :count]``: a prompt's text states for the text cache."""
    return hostpath.copy_rows(array, row, count) if hostpath is not None else array[row, :count].copy()


def states_into(rows: list[np.ndarray], states: np.ndarray, mask: np.ndarray) -> None:
    """Cached text states ``rows[i]`` ((n_i, width) float32) into ``states[i, :n_i]``, zeros after; the
    mask's row i gets n_i ones, then zeros."""
    if hostpath is not None:
        hostpath.states_into(rows, states, mask)
        return
    states[...] = 0.0
    mask[...] = 0
    for i, row in enumerate(rows):
        states[i, : len(row)] = row
        mask[i, : len(row)] = 1


def to_pixels(image: np.ndarray) -> np.ndarray:
    """NCHW float in [-1, 1] -> a new NHWC uint8 array: (x + 1) * 127.5, clipped, rounded half to even
    (numpy's float32 steps; the fused graphs' post-processing does the same)."""
    pixels = hostpath.pixels(image) if hostpath is not None else None  # None: not float32 NCHW C-contiguous
    if pixels is not None:
        return pixels
    image = np.asarray(image, np.float32)
    return np.rint(np.clip((image + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8).transpose(0, 2, 3, 1)

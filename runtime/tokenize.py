"""Prompt -> right-padded token ids, with the bundle's tokenizer.json (tokenizers library)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from .errors import BadBundleError


@dataclass
class Tokens:
    input_ids: np.ndarray       # (B, L) int64
    attention_mask: np.ndarray  # (B, L) int64
    truncated: list[bool]       # per prompt: did it lose tokens to max_length?


@dataclass
class Encoded:
    """Token ids before padding; ``length`` is the row length they pad to."""
    rows: list[list[int]]
    lengths: list[int]  # per prompt: its real tokens
    truncated: list[bool]
    length: int
    pad_id: int

    def pad(self, ids: np.ndarray | None = None, mask: np.ndarray | None = None) -> Tokens:
        """Right-padded (B, length) arrays: written into ``ids`` / ``mask`` when given (a pipeline's bound
        input buffers, so nothing is allocated or copied on the way), new arrays otherwise."""
        shape = (len(self.rows), self.length)
        ids = np.empty(shape, np.int64) if ids is None else ids
        mask = np.empty(shape, np.int64) if mask is None else mask
        ids.fill(self.pad_id)
        mask.fill(0)
        for i, (row, n) in enumerate(zip(self.rows, self.lengths)):
            ids[i, :n] = row
            mask[i, :n] = 1
        return Tokens(ids, mask, self.truncated)


class PromptTokenizer:
    """Pads on the right, truncates at ``max_length`` and reports truncation instead of hiding it.

    ``pad_to_longest`` False: every row is ``max_length`` long (fixed-shape graphs). True: rows are as long
    as the batch's longest prompt, for graphs with a dynamic sequence axis: "a cat" then costs 4 token
    positions, not 32. Padding is masked, so the images are the same either way (within float rounding).
    """

    def __init__(self, path, max_length: int, pad_id: int, pad_to_longest: bool = False):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise BadBundleError(f"tokenizer {path}", f"cannot be read: {e}", "re-export the bundle") from None
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self.pad_to_longest = pad_to_longest
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_length)

    @classmethod
    def from_settings(cls, path, settings: dict) -> "PromptTokenizer":
        return cls(path, settings["max_length"], settings["pad_id"])

    @classmethod
    def of_bundle(cls, bundle, pad_to_longest: bool = False) -> "PromptTokenizer":
        settings = bundle.tokenizer_settings
        tok = cls.from_settings(bundle.path(settings["file"]), settings)
        tok.pad_to_longest = pad_to_longest
        return tok

    def length_for(self, lengths: list[int]) -> int:
        """Row length for a batch of prompts with these token counts: the longest; ``max_length`` on
        fixed-shape graphs, and when a prompt has no token at all (GPT-2's tokenizer on ""): an all-padding
        row's output depends on how much padding it has, so it gets the length the model was exported at."""
        if not self.pad_to_longest or min(lengths) == 0:
            return self.max_length
        return min(self.max_length, max(lengths))

    def encode(self, prompts: list[str]) -> Encoded:
        # one prompt alone: encode_batch would hand it to the Rust thread pool, which costs more than it does
        encodings = [self._tok.encode(prompts[0])] if len(prompts) == 1 else self._tok.encode_batch(prompts)
        rows = [e.ids for e in encodings]
        lengths = [len(r) for r in rows]
        return Encoded(rows, lengths, [bool(e.overflowing) for e in encodings], self.length_for(lengths), self.pad_id)

    def __call__(self, prompts: list[str]) -> Tokens:
        return self.encode(prompts).pad()

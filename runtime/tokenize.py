"""Prompt -> fixed-length token ids, with the bundle's tokenizer.json (tokenizers library)."""
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


class PromptTokenizer:
    """Pads every prompt to ``max_length`` (static shapes) and reports truncation instead of hiding it."""

    def __init__(self, path, max_length: int, pad_id: int, pad_token: str):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise BadBundleError(f"tokenizer {path}", f"cannot be read: {e}", "re-export the bundle") from None
        self.max_length = int(max_length)
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_length)
        self._tok.enable_padding(length=self.max_length, pad_id=int(pad_id), pad_token=pad_token)

    @classmethod
    def from_settings(cls, path, settings: dict) -> "PromptTokenizer":
        return cls(path, settings["max_length"], settings["pad_id"], settings["pad_token"])

    def __call__(self, prompts: list[str]) -> Tokens:
        encodings = self._tok.encode_batch(prompts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return Tokens(ids, mask, [bool(e.overflowing) for e in encodings])

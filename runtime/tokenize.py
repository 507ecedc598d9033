"""Prompt -> right-padded token ids, with the bundle's tokenizer.json (tokenizers library)."""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from . import native
from .errors import BadBundleError
from .native import PLAIN


@dataclass
class Tokens:
    input_ids: np.ndarray  # (B, L) int64
    attention_mask: np.ndarray  # (B, L) int64
    truncated: list[bool]  # per prompt: did it lose tokens to max_length?


@dataclass
class Encoded:
    """Token ids before padding; ``length`` is the row length they pad to."""

    rows: list[list[int]]
    lengths: list[int]  # per prompt: its real tokens
    truncated: list[bool]
    length: int
    pad_id: int

    def pad(self) -> Tokens:
        """Right-padded (B, length) arrays, new ones."""
        ids = np.empty((len(self.rows), self.length), np.int64)
        mask = np.empty_like(ids)
        self.write(ids, mask)
        return Tokens(ids, mask, self.truncated)

    def write(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """The rows, right-padded, into ``ids`` and ``mask`` (B, length): a pipeline's bound input buffers, so
        nothing is allocated or copied on the way."""
        native.write_tokens(self.rows, ids, mask, self.length, self.pad_id)


# A plain prompt (native.PLAIN): ASCII words (letters, digits) one space apart. Every pre-tokenizer the
# families use splits text at spaces, so a plain prompt's ids are its special tokens around its words' ids,
# each word's ids depending only on the word and on whether it comes first (GPT-2 marks a word's leading
# space).
PROBE = "a Ab 1 a1 1a ab12 A"  # checks at load that the bundle's pre-tokenizer does split at spaces
WORD_CACHE_SIZE = 8192


class PromptTokenizer:
    """Pads on the right, truncates at ``max_length`` and reports truncation instead of hiding it.

    ``pad_to_longest`` False: every row is ``max_length`` long (fixed-shape graphs). True: rows are as long
    as the batch's longest prompt, for graphs with a dynamic sequence axis: "a cat" then costs 4 token
    positions, not 32. Padding is masked, so the images are the same either way (within float rounding).

    Plain prompts (see PLAIN) are put together from a cache of word ids that the tokenizers library's own
    output fills: right after an engine run has evicted the CPU caches, a call of the library costs about
    twice what the dict lookups do (`python -m benchmarks.host_steps`). Any other prompt, a word not seen
    yet, or a prompt that would be truncated goes through the library. ``by_words`` False: always the
    library (it starts False where the bundle's pre-tokenizer does not split at spaces).
    """

    def __init__(self, path, max_length: int, pad_id: int, pad_to_longest: bool = False):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise BadBundleError(
                f"tokenizer {path}", f"cannot be read: {e}", "re-export the bundle"
            ) from None
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self.pad_to_longest = pad_to_longest
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_length)
        # word -> its ids, for the first word of a prompt and for the words after it (GPT-2 marks a leading
        # space)
        self._first: dict[str, list[int]] = {}
        self._later: dict[str, list[int]] = {}
        self._ends: tuple[list[int], list[int]] | None = None  # special ids before and after the words
        self.by_words = self._splits_at_spaces()

    def _splits_at_spaces(self) -> bool:
        """Whether plain prompts may be tokenized word by word: no added token could occur in one, and the
        pre-tokenizer puts no space inside a piece (tokenizers with no pre-tokenizer may merge across
        words)."""
        if any(
            re.fullmatch(r"[A-Za-z0-9 ]+", t.content) for t in self._tok.get_added_tokens_decoder().values()
        ):
            return False
        if self._tok.pre_tokenizer is None:
            return False
        text = self._tok.normalizer.normalize_str(PROBE) if self._tok.normalizer is not None else PROBE
        pieces = self._tok.pre_tokenizer.pre_tokenize_str(text)
        return all(" " not in text[a:b].lstrip(" ") for _, (a, b) in pieces)

    @classmethod
    def from_settings(cls, path, settings: dict) -> PromptTokenizer:
        return cls(path, settings["max_length"], settings["pad_id"])

    @classmethod
    def of_bundle(cls, bundle, pad_to_longest: bool = False) -> PromptTokenizer:
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
        rows = list(map(self._from_words, prompts))
        truncated = [False] * len(prompts)
        if None in rows:
            missed = [i for i, r in enumerate(rows) if r is None]
            texts = [prompts[i] for i in missed]
            # one prompt alone: encode_batch would hand it to the Rust thread pool, which costs more than it
            # does
            encodings = [self._tok.encode(texts[0])] if len(texts) == 1 else self._tok.encode_batch(texts)
            for i, e in zip(missed, encodings):
                rows[i], truncated[i] = e.ids, bool(e.overflowing)
                if not truncated[i] and self.by_words and PLAIN.fullmatch(prompts[i]):
                    self._learn(prompts[i], e)
        lengths = list(map(len, rows))
        return Encoded(rows, lengths, truncated, self.length_for(lengths), self.pad_id)

    def _from_words(self, prompt: str) -> list[int] | None:
        """A plain prompt's ids from the word cache; None when the library has to tokenize it."""
        if not self.by_words or self._ends is None:
            return None
        return native.words(prompt, self._first, self._later, *self._ends, self.max_length)

    def _learn(self, prompt: str, encoding) -> None:
        """Cache each word's ids from the library's encoding of a plain prompt, if every token lies within
        one word (after a leading space, which GPT-2-style tokens carry) and the special tokens are at the
        ends only, as they were in the prompts learned from before."""
        words = prompt.split(" ")
        starts = [0]
        for w in words[:-1]:
            starts.append(starts[-1] + len(w) + 1)
        per_word: list[list[int]] = [[] for _ in words]
        head, tail = [], []
        for token, (a, b), special in zip(encoding.ids, encoding.offsets, encoding.special_tokens_mask):
            if special:
                (tail if any(per_word) else head).append(token)
                continue
            if tail:
                return  # a special token between words
            a += prompt[a : a + 1] == " "
            word = bisect_right(starts, a) - 1
            if a >= b or word != bisect_right(starts, b - 1) - 1:
                return  # a token across words, or of no character: this prompt teaches nothing
            per_word[word].append(token)
        if not all(per_word) or (self._ends is not None and self._ends != (head, tail)):
            return
        if len(self._first) + len(self._later) >= WORD_CACHE_SIZE:
            self._first.clear()
            self._later.clear()
        self._ends = (head, tail)
        for k, (word, ids) in enumerate(zip(words, per_word)):
            (self._later if k else self._first)[word] = ids

    def __call__(self, prompts: list[str]) -> Tokens:
        return self.encode(prompts).pad()

"""Recent prompts' text states, so a repeated prompt skips the text encoder (both families)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import native
from .errors import BadInputError


@dataclass(slots=True)
class TextEntry:
    states: (
        np.ndarray
    )  # (length, width): the prompt's text states, at its own token count where the graph allows
    length: int  # its real tokens (rows of states past it, if any, are padding's)
    truncated: bool  # did the prompt lose tokens to the tokenizer's max_length?


class TextCache:
    """Least recently used first out; ``size`` 0 keeps nothing. Not locked: the pipeline's lock serialises
    calls, and with them every use of its cache."""

    def __init__(self, size: int):
        self._entries: OrderedDict[str, TextEntry] = OrderedDict()
        self.size = size

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadInputError(
                "cache_size", f"expected an integer >= 0, got {value!r}", "0 turns the cache off"
            )
        self._size = value
        self._trim()

    def holds(self, prompts: list[str]) -> bool:
        """Whether every prompt's states are cached."""
        return self._size > 0 and all(map(self._entries.__contains__, prompts))

    def take(self, prompts: list[str]) -> list[TextEntry]:
        """The prompts' entries (all cached), each now the most recently used."""
        for p in prompts:
            self._entries.move_to_end(p)
        return [self._entries[p] for p in prompts]

    def remember(
        self, prompts: list[str], states: np.ndarray, lengths: list[int], truncated: list[bool]
    ) -> None:
        """Keep ``states[i, :lengths[i]]`` (copied out of the graph's output buffer) for each new prompt."""
        if self._size == 0:
            return
        for i, p in enumerate(prompts):
            if p in self._entries:
                self._entries.move_to_end(p)
                continue
            self._entries[p] = TextEntry(
                native.copy_rows(states, i, lengths[i]), lengths[i], bool(truncated[i])
            )
        self._trim()

    def _trim(self) -> None:
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def get(self, prompt: str) -> TextEntry | None:
        """A prompt's entry, without touching the order (for inspection and tests)."""
        return self._entries.get(prompt)

    def prompts(self) -> list[str]:
        """Cached prompts, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

"""Progress on long export steps: one line per step on stderr, a bar where a step has parts."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from tqdm import tqdm


class Steps:
    def __init__(self, names: list[str], enabled: bool = True):
        self.names, self.enabled = names, enabled

    @contextmanager
    def step(self, name: str, total: int | None = None):
        index = self.names.index(name) + 1
        label = f"[{index}/{len(self.names)}] {name}"
        start = time.perf_counter()
        bar = tqdm(
            total=total, desc=label, disable=not self.enabled or total is None, leave=False, file=sys.stderr
        )
        try:
            yield bar
        finally:
            bar.close()
        if self.enabled:
            print(f"{label} ... done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)

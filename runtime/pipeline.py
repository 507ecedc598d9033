"""Pipeline: the runtime's public entry point. ``Pipeline.from_bundle`` picks the family's class."""
from __future__ import annotations

import os
import secrets
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .backends import candidates, engine_forms, open_graph, require_backend, skip_note
from .bundle import Bundle
from .errors import BackendUnavailableError, BadInputError, EngineMismatchError
from .native import hostpath
from .precision import choose_precision, form_for

SEED_LIMIT = 2**64


class TruncationWarning(UserWarning):
    """A prompt was longer than the bundle's token limit and lost its tail."""


@dataclass(slots=True)
class CallInfo:
    """What the last call did: seeds used, which prompts were truncated, which path served it, and how
    long each stage took (ns; a monotonic clock read twice per stage costs well under a microsecond)."""
    seeds: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    path: str = ""
    sequence: int = 0  # token positions the text graphs ran at (0: the family has no such axis)
    warnings: list[str] = field(default_factory=list)
    stages: dict[str, int] = field(default_factory=dict)
    engine_stages: tuple[str, ...] = ()  # the stages that are engine (session) runs
    total_ns: int = 0  # the whole call: the argument checks ("checks", with any wait for the pipeline's
    # lock), then the stages; not the conversion to PIL images

    def lap(self, stage: str, since: int) -> int:
        now = time.perf_counter_ns()
        self.stages[stage] = self.stages.get(stage, 0) + now - since
        return now

    @property
    def engine_ns(self) -> int:
        return sum(self.stages.get(s, 0) for s in self.engine_stages)


class Pipeline:
    """Base class. Subclasses implement ``_generate`` for one model family.

    A pipeline owns reusable buffers, so calls are serialised by a lock: calling one
    pipeline from many threads is safe and gives the same images as serial calls.
    """

    family = ""
    _families: dict[str, type] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.family:
            Pipeline._families[cls.family] = cls

    def __init__(self, bundle: Bundle, backend: str, precision: str, notes: list[str], form: str | None = None):
        self.bundle = bundle
        self.backend = backend
        self.precision = precision
        # which file of that precision runs: the backend's form, unless validation asks for the other one
        self.form = form or form_for(precision, backend)
        self.notes = notes  # what `auto` skipped and why
        self._last_call = CallInfo()
        self._record = None  # the last call's record where a native call served it (see last_call)
        self._native = None  # a family's whole call in native code: callable(prompt, seed, num_images,
        # output_type, start) -> (pixels, record), or None where Python must serve the call
        self.max_batch = int(bundle.generation["max_batch"])
        self._lock = threading.Lock()
        self._graphs: dict = {}

    def graph(self, component: str):
        """The component's runnable graph on this pipeline's backend and form, opened once."""
        g = self._graphs.get(component)
        if g is None:
            g = self._graphs[component] = open_graph(self.bundle, component, self.form, self.backend)
        return g

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, backend: str = "auto", precision: str = "auto",
                    **options) -> "Pipeline":
        bundle = Bundle.open(path)  # verified before any session exists
        family = Pipeline.for_family(bundle)
        notes: list[str] = []  # what `auto` skipped and why
        for name in candidates(backend, bundle):
            try:
                require_backend(name)
                forms = engine_forms(bundle, name)  # TensorRT: the engines this machine can use
                chosen = choose_precision(bundle, precision, name, forms)
                return family(bundle, name, chosen, notes, **options)  # opens its graphs: really loads
            except (BackendUnavailableError, EngineMismatchError) as e:
                if backend != "auto":
                    raise  # asked for by name: an error, never a silent fallback
                notes.append(skip_note(name, e))
        raise BackendUnavailableError("backend auto", "no backend loads on this machine", "; ".join(notes))

    @staticmethod
    def for_family(bundle: Bundle) -> type:
        family_cls = Pipeline._families.get(bundle.family)
        if family_cls is None:
            raise BadInputError(f"bundle {bundle.root}", f"family {bundle.family!r} has no runtime here",
                                f"this edgegen runs {sorted(Pipeline._families)}")
        return family_cls

    def __call__(self, prompt, seed=None, num_images: int = 1, output_type: str = "pil", **kw):
        start = time.perf_counter_ns()  # end to end: the argument checks count too (all but the PIL conversion)
        done = self._native(prompt, seed, num_images, output_type, start) if self._native is not None and not kw else None
        if done is not None:
            pixels, self._record = done
        else:
            pixels = self._call(prompt, seed, num_images, output_type, start, kw)
        if output_type == "np":
            return pixels
        from PIL import Image
        return [Image.fromarray(p) for p in pixels]

    def _call(self, prompt, seed, num_images, output_type, start, kw) -> np.ndarray:
        prompts = normalize_prompts(prompt)
        num_images = check_count(num_images)
        total = len(prompts) * num_images
        if total > self.max_batch:
            raise BadInputError("num_images", f"{len(prompts)} prompt(s) x {num_images} image(s) = {total} "
                                f"exceeds this bundle's maximum batch of {self.max_batch}",
                                "split the request into smaller calls")
        if output_type not in ("pil", "np"):
            raise BadInputError("output_type", f"unknown value {output_type!r}", "use 'pil' or 'np'")
        if num_images > 1:
            prompts = [p for p in prompts for _ in range(num_images)]
        seeds = expand_seeds(seed, total)
        with self._lock:
            checked = time.perf_counter_ns()
            pixels, info = self._generate(prompts, seeds, **kw)
            info.stages = {"checks": checked - start, **info.stages}
            info.total_ns = time.perf_counter_ns() - start
            self._last_call, self._record = info, None
        for message in info.warnings:
            warnings.warn(message, TruncationWarning, stacklevel=3)
        return pixels

    @property
    def last_call(self) -> CallInfo:
        """What the last call did. A native call leaves a bare record, made into its CallInfo when first read."""
        if self._record is not None:
            self._last_call, self._record = self._info_of(self._record), None
        return self._last_call

    def _info_of(self, record) -> CallInfo:
        raise NotImplementedError

    def _generate(self, prompts: list[str], seeds: list[int], **kw) -> tuple[np.ndarray, CallInfo]:
        raise NotImplementedError


def normalize_prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise BadInputError("prompt", f"expected a string or a non-empty list of strings, got {type(prompt).__name__}",
                            "pass pipe('a cat') or pipe(['a cat', 'a dog'])")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise BadInputError("prompt", f"item {i} is a {type(p).__name__}, not a string", "every prompt must be a str")
        try:
            p.isascii() or p.encode("utf-8")  # ASCII cannot hold a lone surrogate: no bytes object to build
        except UnicodeEncodeError as e:
            raise BadInputError("prompt", f"item {i} is not valid Unicode text ({e.reason} at position {e.start})",
                                "decode input bytes with errors='replace' before passing them") from None
    return list(prompts)


def check_count(num_images) -> int:
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise BadInputError("num_images", f"expected a positive integer, got {num_images!r}", "use 1 or more")
    return int(num_images)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise BadInputError("seed", f"expected an integer, got {type(seed).__name__} {seed!r}",
                            "seeds are integers in [0, 2**64)")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise BadInputError("seed", f"out of range: {seed}", "seeds are integers in [0, 2**64)")
    return int(seed)


def expand_seeds(seed, total: int) -> list[int]:
    """One seed per image. A single seed s gives s, s+1, ...; a list must have one per image."""
    if seed is None:
        seed = secrets.randbelow(SEED_LIMIT - total)
    if isinstance(seed, (list, tuple, np.ndarray)):
        seeds = [check_seed(s) for s in seed]
        if len(seeds) != total:
            raise BadInputError("seed", f"{len(seeds)} seeds for {total} images",
                                "give one seed per image (prompts x num_images), or a single seed")
        return seeds
    first = check_seed(seed)
    if first + total > SEED_LIMIT:
        raise BadInputError("seed", f"{first} + {total} images runs past 2**64", "use a smaller seed")
    return [first + i for i in range(total)]


class SeedNoise:
    """Standard normal noise, each image's slice the values of ``np.random.default_rng(seed)`` alone.

    Drawn natively where edgegen's host path is built (``_hostpath.noise``: numpy's seeding redone in C,
    then numpy's own sampler, with no SeedSequence, PCG64 and Generator objects built per seed: right after
    an engine run has evicted the CPU caches, building them is the costly part of a draw), else by numpy.
    ``native=False`` forces numpy (tests and `benchmarks.host_steps` compare the two).
    """

    def __init__(self, native: bool = True):
        self.native = native and hostpath is not None

    def fill(self, seeds: list[int], out: np.ndarray) -> np.ndarray:
        """``out[i]`` gets seed ``seeds[i]``'s noise; ``out`` is C-contiguous float32 (a bound buffer)."""
        if self.native:
            hostpath.noise(seeds, out)  # checks out's layout itself
            return out
        for i, s in enumerate(seeds):  # drawn straight into the (bound) buffer: no temporary, no copy
            np.random.default_rng(s).standard_normal(dtype=np.float32, out=out[i])
        return out


def noise_for_seeds(seeds: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """(len(seeds), *shape) float32 standard normal noise, each image's slice drawn from its own seed alone."""
    seeds = [int(s) for s in seeds]
    return SeedNoise().fill(seeds, np.empty((len(seeds), *shape), np.float32))


def to_pixels(image: np.ndarray, native: bool = True) -> np.ndarray:
    """NCHW float32 in [-1, 1] -> NHWC uint8; the same arithmetic as the fused graph's post-processing."""
    pixels = hostpath.pixels(image) if native and hostpath is not None else None
    if pixels is not None:
        return pixels
    return np.rint(np.clip((image + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8).transpose(0, 2, 3, 1)

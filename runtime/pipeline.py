"""Pipeline: the runtime's public entry point. ``Pipeline.from_bundle`` picks the family's class.

A call reads top-down: ``_check`` the arguments, then the family's ``_generate`` (text states from the cache
or the text encoder, noise, the graphs' runs, pixels), then ``_to_output``. One path for every backend.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import native
from .backends import candidates, engine_forms, open_graph, require_backend, skip_note
from .bundle import Bundle
from .errors import BackendUnavailableError, BadInputError, EngineMismatchError
from .lora import LoraMerge, read_loras
from .precision import choose_precision, form_for
from .text_cache import TextCache

SEED_LIMIT = 2**64
# output_type as diffusers means it ("pil": PIL images; "np": float32 NHWC in [0, 1]), and "uint8": the pixels
# as the graphs make them, uint8 NHWC, with no conversion
OUTPUT_TYPES = ("pil", "np", "uint8")
CALL_ARGUMENTS = ("prompt", "seed", "num_images_per_prompt", "output_type")


class TruncationWarning(UserWarning):
    """A prompt was longer than the bundle's token limit and lost its tail."""


class UnknownSubjectWarning(UserWarning):
    """The model read no subject it knows in a prompt with confidence: it drew its nearest guess."""


@dataclass(slots=True)
class CallInfo:
    """What the last call did: seeds used, which prompts were truncated, which path served it, and how
    long each stage took (ns; a monotonic clock read twice per stage costs well under a microsecond)."""

    seeds: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    path: str = ""
    sequence: int = 0  # token positions the text graphs ran at (0: the family has no such axis)
    warnings: list[str] = field(default_factory=list)
    # what the model read, built from ``reader`` on first use of ``read`` (most calls never look; building
    # it for every call cost ~100 us of a ~1.4 ms int8 call); and the warnings for subjects it does not know
    reader: Callable[[], list[dict]] | None = None
    _read: list[dict] | None = None
    unknown: list[str] = field(default_factory=list)
    stages: dict[str, int] = field(default_factory=dict)
    engine_stages: tuple[str, ...] = ()  # the stages that are engine (session) runs
    total_ns: int = 0  # the whole call: the argument checks ("checks", with any wait for the pipeline's
    # lock), then the stages; not the conversion to the output type

    def stage(self, name: str) -> StageTimer:
        """``with info.stage("noise"): ...`` adds the block's time to ``stages["noise"]``."""
        return StageTimer(self.stages, name)

    @property
    def read(self) -> list[dict]:
        """Per image, what the model read from its prompt, where the bundle says (gan: {concept: {"name",
        "p", "top": [[name, p], ...]}}); [] where it does not."""
        if self._read is None:
            self._read = self.reader() if self.reader is not None else []
        return self._read

    @property
    def engine_ns(self) -> int:
        return sum(self.stages.get(s, 0) for s in self.engine_stages)


class StageTimer:
    """Adds the time spent inside a ``with`` block to ``stages[name]`` (a stage may run more than once)."""

    __slots__ = ("stages", "name", "start")

    def __init__(self, stages: dict[str, int], name: str):
        self.stages, self.name = stages, name

    def __enter__(self) -> StageTimer:
        self.start = time.perf_counter_ns()
        return self

    def __exit__(self, *exc) -> None:
        self.stages[self.name] = self.stages.get(self.name, 0) + time.perf_counter_ns() - self.start


class Pipeline:
    """Base class. Subclasses implement ``_generate`` for one model family and list the keyword options
    it takes in ``options`` (diffusers' names where diffusers has one).

    A pipeline owns reusable buffers, so calls are serialised by a lock: calling one
    pipeline from many threads is safe and gives the same images as serial calls.
    """

    family = ""
    options: tuple[str, ...] = ()
    _families: dict[str, type] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.family:
            Pipeline._families[cls.family] = cls

    def __init__(
        self,
        bundle: Bundle,
        backend: str,
        precision: str,
        notes: list[str],
        form: str | None = None,
        cache_size: int = 128,
        lora=None,
    ):
        self.bundle = bundle
        self.backend = backend
        self.precision = precision
        # which file of that precision runs: the backend's form, unless validation asks for the other one
        self.form = form or form_for(precision, backend)
        self.notes = notes  # what `auto` skipped and why
        self.last_call = CallInfo()
        self.max_batch = int(bundle.generation["max_batch"])
        self.text_cache = TextCache(cache_size)  # recent prompts' text states
        self._lock = threading.Lock()
        self._graphs: dict = {}
        # lora=[(file, scale), ...] (or those files already read): merged into this form's weights now,
        # applied as each graph opens (ONNX Runtime: initializers replaced; TensorRT: refittable engines
        # refitted)
        self.lora = LoraMerge(bundle, self.form, lora) if lora else None

    def graph(self, component: str):
        """The component's runnable graph on this pipeline's backend and form, opened once."""
        g = self._graphs.get(component)
        if g is None:
            overrides = self.lora.overrides(component) if self.lora else None
            g = self._graphs[component] = open_graph(
                self.bundle, component, self.form, self.backend, overrides=overrides
            )
        return g

    @property
    def cache_size(self) -> int:
        """How many prompts' text states are kept (0: none); may be changed at any time."""
        return self.text_cache.size

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        with self._lock:
            self.text_cache.size = value

    def clear_cache(self) -> None:
        with self._lock:
            self.text_cache.clear()

    def stand_in_inputs(self) -> dict:
        """What this bundle's calls need besides a prompt, as stand-ins for timing (``edgegen bench``): none
        unless a family says otherwise."""
        return {}

    @classmethod
    def from_bundle(
        cls, path: str | os.PathLike, backend: str = "auto", precision: str = "auto", **options
    ) -> Pipeline:
        bundle = Bundle.open(path)  # verified before any session exists
        family = Pipeline.for_family(bundle)
        notes: list[str] = []  # what `auto` skipped and why
        if options.get("lora"):  # read once, however many backends `auto` tries
            options["lora"] = read_loras(bundle, options["lora"])
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
            raise BadInputError(
                f"bundle {bundle.root}",
                f"family {bundle.family!r} has no runtime here",
                f"this edgegen runs {sorted(Pipeline._families)}",
            )
        return family_cls

    def __call__(
        self, prompt, seed=None, num_images_per_prompt: int = 1, output_type: str = "pil", **options
    ):
        start = (
            time.perf_counter_ns()
        )  # end to end: the argument checks count too (not the output conversion)
        prompts, seeds = self._check(prompt, seed, num_images_per_prompt, output_type, options)
        with self._lock:
            checked = time.perf_counter_ns()
            pixels, info = self._generate(prompts, seeds, **options)
            info.stages = {"checks": checked - start, **info.stages}
            info.total_ns = time.perf_counter_ns() - start
            self.last_call = info
        for message in info.warnings:
            warnings.warn(message, TruncationWarning, stacklevel=2)
        for message in info.unknown:
            warnings.warn(message, UnknownSubjectWarning, stacklevel=2)
        return _to_output(pixels, output_type)

    def _check(
        self, prompt, seed, num_images_per_prompt, output_type, options
    ) -> tuple[list[str], list[int]]:
        """The call's prompts (each repeated num_images_per_prompt times) and one seed per image."""
        unknown = [k for k in options if k not in self.options]
        if unknown:
            raise BadInputError(
                unknown[0],
                f"unknown keyword for a {self.family} pipeline",
                f"it accepts {', '.join(CALL_ARGUMENTS + self.options)}",
            )
        prompts = normalize_prompts(prompt)
        count = check_count(num_images_per_prompt, "num_images_per_prompt")
        total = len(prompts) * count
        if total > self.max_batch:
            raise BadInputError(
                "num_images_per_prompt",
                f"{len(prompts)} prompt(s) x {count} image(s) = {total} "
                f"exceeds this bundle's maximum batch of {self.max_batch}",
                "split the request into smaller calls",
            )
        if output_type not in OUTPUT_TYPES:
            raise BadInputError(
                "output_type", f"unknown value {output_type!r}", f"use one of {', '.join(OUTPUT_TYPES)}"
            )
        if count > 1:
            prompts = [p for p in prompts for _ in range(count)]
        return prompts, expand_seeds(seed, total)

    def _generate(self, prompts: list[str], seeds: list[int], **options) -> tuple[np.ndarray, CallInfo]:
        raise NotImplementedError

    def _report_truncation(self, prompts: list[str], truncated: list[bool], info: CallInfo) -> None:
        info.truncated = list(truncated)
        for p, cut in zip(prompts, truncated):
            if cut:
                info.warnings.append(f"prompt truncated to {self.tokenizer.max_length} tokens: {p[:60]!r}...")


def _to_output(pixels: np.ndarray, output_type: str):
    if output_type == "uint8":
        return pixels
    if output_type == "np":
        return pixels.astype(np.float32) / 255.0
    from PIL import Image

    return [Image.fromarray(p) for p in pixels]


def normalize_prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise BadInputError(
            "prompt",
            f"expected a string or a non-empty list of strings, got {type(prompt).__name__}",
            "pass pipe('a cat') or pipe(['a cat', 'a dog'])",
        )
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise BadInputError(
                "prompt", f"item {i} is a {type(p).__name__}, not a string", "every prompt must be a str"
            )
        try:
            p.isascii() or p.encode("utf-8")  # ASCII cannot hold a lone surrogate: no bytes object to build
        except UnicodeEncodeError as e:
            raise BadInputError(
                "prompt",
                f"item {i} is not valid Unicode text ({e.reason} at position {e.start})",
                "decode input bytes with errors='replace' before passing them",
            ) from None
    return list(prompts)


def check_count(count, name: str = "num_images_per_prompt") -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise BadInputError(name, f"expected a positive integer, got {count!r}", "use 1 or more")
    return int(count)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise BadInputError(
            "seed",
            f"expected an integer, got {type(seed).__name__} {seed!r}",
            "seeds are integers in [0, 2**64)",
        )
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
            raise BadInputError(
                "seed",
                f"{len(seeds)} seeds for {total} images",
                "give one seed per image (prompts x num_images_per_prompt), or a single seed",
            )
        return seeds
    first = check_seed(seed)
    if first + total > SEED_LIMIT:
        raise BadInputError("seed", f"{first} + {total} images runs past 2**64", "use a smaller seed")
    return [first + i for i in range(total)]


def noise_for_seeds(seeds: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """(len(seeds), *shape) float32 standard normal noise, each image's slice drawn from its own seed
    alone."""
    return native.fill_noise([int(s) for s in seeds], np.empty((len(seeds), *shape), np.float32))

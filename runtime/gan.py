"""Runtime for the gan family: token ids + noise -> pixels in one forward pass."""
from __future__ import annotations

import functools
import secrets
import time
from collections import OrderedDict

import numpy as np

from .backends import OrtGraph
from .errors import BadBundleError, BadInputError
from .native import hostpath
from .pipeline import CallInfo, Pipeline, SeedNoise, to_pixels
from .tokenize import PromptTokenizer

MODES = ("auto", "fused", "split")
ENGINE_STAGES = ("fused", "text_encoder", "generator")  # the stages that are session runs
NATIVE_STAGES = {"fused": ("tokenize", "noise", "fused", "output"), "cached": ("cache", "noise", "generator", "output")}


class GanPipeline(Pipeline):
    """Serves a call with the fused graph (one session run); prompts whose text states are cached
    skip the text encoder and run the generator alone.

    ``mode``: ``auto`` (as above), ``fused`` (always the fused graph, no cache) or ``split``
    (text encoder then generator, each its own run; for stage timing).
    """

    family = "gan"

    def __init__(self, bundle, backend, precision, notes, cache_size: int = 128, mode: str = "auto",
                 form: str | None = None):
        super().__init__(bundle, backend, precision, notes, form)
        if mode not in MODES:
            raise BadInputError("mode", f"unknown mode {mode!r}", f"choose one of {', '.join(MODES)}")
        self.tokenizer = PromptTokenizer.of_bundle(bundle)
        self.mode = mode
        shape = bundle.generation.get("noise_shape")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise BadBundleError(f"bundle {bundle.root}", f"generation.noise_shape is not a list of sizes: {shape!r}",
                                 "re-export the bundle")
        self.noise_shape = tuple(shape)
        self.seed_noise = SeedNoise()
        self._cache_size = int(cache_size)
        # prompt -> (its text states at its own length (n, width), n, truncated)
        self._cache: OrderedDict[str, tuple[np.ndarray, int, bool]] = OrderedDict()
        main = self.graph("generator" if mode == "split" else "fused")  # fail at load, not at first call
        # ONNX Runtime on the CPU: each call runs at its longest prompt's length, not at max_length
        tok = self.tokenizer
        tok.pad_to_longest = main.dynamic_sequence
        # the native whole call (_hostpath.gan_call) runs ONNX Runtime CPU sessions itself (the GPU graphs move
        # buffers around theirs) and reads prompts through the word cache
        if hostpath is not None and mode != "split" and isinstance(main, OrtGraph) and tok.by_words:
            gen = self.graph("generator") if mode == "auto" else None  # the cached path's, now (it shares the weights)
            self._native_state = (self._lock, self.max_batch, self._cache if mode == "auto" else None, self.cache_size,
                                  tok, tok._first, tok._later, tok.max_length, tok.pad_to_longest, tok.pad_id,
                                  main.bound, main.session.run_with_iobinding,
                                  *((gen.bound, gen.session.run_with_iobinding) if gen else (None, None)), secrets.randbelow)
            self._native = functools.partial(hostpath.gan_call, self._native_state)

    def _generate(self, prompts, seeds, noise=None):
        batch = len(prompts)
        info = CallInfo(seeds=seeds, engine_stages=ENGINE_STAGES)
        t = time.perf_counter_ns()
        if noise is not None:
            noise = self._check_noise(noise, batch)
            info.seeds = []
        use_cache = self.mode == "auto" and self.cache_size > 0 and all(map(self._cache.__contains__, prompts))
        if self.mode == "fused" or (self.mode == "auto" and not use_cache):
            info.path = "fused"
            g = self.graph("fused")
            encoded = self._encode(prompts, info)
            info.sequence = length = encoded.length
            ins = g.inputs(batch, length)
            encoded.write(ins["input_ids"], ins["attention_mask"])
            t = info.lap("tokenize", t)
            self._fill_noise(ins["noise"], seeds, noise)
            t = info.lap("noise", t)
            outs = g.run(batch, sequence=length)
            t = info.lap("fused", t)
            if self.mode == "auto":
                self._remember(prompts, outs["text_states"], encoded)
            pixels = hostpath.copy(outs["pixels"]) if hostpath is not None else outs["pixels"].copy()
            info.lap("output", t)
            return pixels, info
        gen = self.graph("generator")
        if use_cache:
            info.path = "cached"
            entries = []
            for p in prompts:
                self._cache.move_to_end(p)
                entries.append(self._cache[p])
            info.sequence = length = self.tokenizer.length_for([n for _, n, _ in entries])
            ins = gen.inputs(batch, length)
            states, mask = ins["text_states"], ins["attention_mask"]
            if hostpath is not None:
                hostpath.states_into([row for row, _, _ in entries], states, mask)
            else:
                states[...] = 0.0
                mask[...] = 0
                for i, (row, n, _) in enumerate(entries):
                    states[i, :n] = row
                    mask[i, :n] = 1
            self._report_truncation(prompts, [cut for _, _, cut in entries], info)
            t = info.lap("cache", t)
        else:
            info.path = "split"
            enc = self.graph("text_encoder")
            encoded = self._encode(prompts, info)
            info.sequence = length = encoded.length
            ins = gen.inputs(batch, length)
            enc_ins = enc.inputs(batch, length)
            encoded.write(enc_ins["input_ids"], enc_ins["attention_mask"])
            t = info.lap("tokenize", t)
            enc.run(batch, fetch=False, sequence=length)  # on a GPU backend the text states stay on the device
            gen.take(batch, "text_states", enc, "text_states", sequence=length)
            t = info.lap("text_encoder", t)
            ins["attention_mask"][...] = enc_ins["attention_mask"]
        self._fill_noise(ins["noise"], seeds, noise)
        t = info.lap("noise", t)
        image = gen.run(batch, sequence=length)["image"]
        t = info.lap("generator", t)
        pixels = to_pixels(image)
        info.lap("output", t)
        return pixels, info

    @property
    def cache_size(self) -> int:
        """How many prompts' text states the cache keeps (fixed when the pipeline is made: the native call holds it)."""
        return self._cache_size

    def _info_of(self, record) -> CallInfo:
        """The CallInfo of a call `_hostpath.gan_call` served (nothing truncated)."""
        path, seeds, length, checks, *times, total = record
        return CallInfo(seeds=seeds, truncated=[False] * len(seeds), path=path, sequence=length,
                        stages={"checks": checks, **dict(zip(NATIVE_STAGES[path], times))}, engine_stages=ENGINE_STAGES,
                        total_ns=total)

    def _encode(self, prompts, info):
        encoded = self.tokenizer.encode(prompts)
        self._report_truncation(prompts, encoded.truncated, info)
        return encoded

    def _report_truncation(self, prompts, truncated, info):
        info.truncated = list(truncated)
        for p, cut in zip(prompts, truncated):
            if cut:
                info.warnings.append(f"prompt truncated to {self.tokenizer.max_length} tokens: {p[:60]!r}...")

    def _fill_noise(self, buf, seeds, noise):
        if noise is None:
            self.seed_noise.fill(seeds, buf)
        else:
            buf[...] = noise

    def _check_noise(self, noise, batch):
        if not isinstance(noise, np.ndarray) or not np.issubdtype(noise.dtype, np.floating):
            raise BadInputError("noise", f"expected a float numpy array, got {type(noise).__name__}"
                                f"{'' if not isinstance(noise, np.ndarray) else ' of ' + str(noise.dtype)}",
                                f"pass np.float32 of shape {(batch, *self.noise_shape)}")
        if noise.shape != (batch, *self.noise_shape):
            raise BadInputError("noise", f"shape {noise.shape} does not match the request",
                                f"expected {(batch, *self.noise_shape)} (images, noise dims)")
        if not np.all(np.isfinite(noise)):
            raise BadInputError("noise", "contains NaN or Inf", "pass finite values")
        return noise.astype(np.float32, copy=False)

    def _remember(self, prompts, states, encoded):
        for i, p in enumerate(prompts):
            if p in self._cache:
                self._cache.move_to_end(p)
                continue
            n = encoded.lengths[i]
            row = hostpath.copy_rows(states, i, n) if hostpath is not None else states[i, :n].copy()
            self._cache[p] = (row, n, encoded.truncated[i])
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

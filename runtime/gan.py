"""Runtime for the gan family: token ids + noise -> pixels in one forward pass."""

from __future__ import annotations

import functools

import numpy as np

from . import native, reading
from .errors import BadBundleError, BadInputError
from .pipeline import CallInfo, Pipeline
from .tokenize import PromptTokenizer

MODES = ("auto", "fused", "split")
ENGINE_STAGES = ("fused", "text_encoder", "generator")  # the stages that are session runs


class GanPipeline(Pipeline):
    """Serves a call with the fused graph (one session run); prompts whose text states are cached
    skip the text encoder and run the generator alone.

    ``mode``: ``auto`` (as above), ``fused`` (always the fused graph, no cache) or ``split``
    (text encoder then generator, each its own run; for stage timing). Call option: ``noise=``, an
    explicit (images, *noise_shape) float array instead of the seeds' noise.
    """

    family = "gan"
    options = ("noise",)

    def __init__(
        self,
        bundle,
        backend,
        precision,
        notes,
        cache_size: int = 128,
        mode: str = "auto",
        form: str | None = None,
        lora=None,
    ):
        super().__init__(bundle, backend, precision, notes, form, cache_size, lora)
        if mode not in MODES:
            raise BadInputError("mode", f"unknown mode {mode!r}", f"choose one of {', '.join(MODES)}")
        self.tokenizer = PromptTokenizer.of_bundle(bundle)
        self.mode = mode
        shape = bundle.generation.get("noise_shape")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise BadBundleError(
                f"bundle {bundle.root}",
                f"generation.noise_shape is not a list of sizes: {shape!r}",
                "re-export the bundle",
            )
        self.noise_shape = tuple(shape)
        main = self.graph("generator" if mode == "split" else "fused")  # fail at load, not at first call
        # ONNX Runtime on the CPU: each call runs at its longest prompt's length, not at max_length
        self.tokenizer.pad_to_longest = main.dynamic_sequence
        # what the model reads ({concept: {"output", "labels"}}) and the words it knows: used every call
        self.reading = self._reading(bundle)
        self.vocabulary = frozenset((bundle.manifest.get("reading") or {}).get("vocabulary", []))
        self.model_name = str(bundle.manifest.get("provenance", {}).get("checkpoint", "the model")).split(
            "-checkpoint"
        )[0]

    @staticmethod
    def _reading(bundle) -> dict:
        """The manifest's ``reading`` concepts where both graphs that make images output them; {} for bundles
        exported before it existed (they load and generate as before, without saying what they read)."""
        concepts = reading.concepts(bundle.manifest.get("reading") or {})
        wanted = {spec["output"] for spec in concepts.values()}
        for name in ("fused", "generator"):
            comp = bundle.components.get(name)
            if comp is None or not wanted <= {o.name for o in comp.outputs}:
                return {}
        return concepts

    def _generate(self, prompts, seeds, noise=None):
        info = CallInfo(seeds=seeds, engine_stages=ENGINE_STAGES)
        if noise is not None:
            noise = self._check_noise(noise, len(prompts))
            info.seeds = []
        if self.mode == "auto" and self.text_cache.holds(prompts):
            return self._run_cached(prompts, seeds, noise, info)
        if self.mode == "split":
            return self._run_split(prompts, seeds, noise, info)
        return self._run_fused(prompts, seeds, noise, info)

    def _run_fused(self, prompts, seeds, noise, info):
        """One run of the fused graph: token ids + noise -> pixels (and the text states, for the cache)."""
        info.path = "fused"
        batch = len(prompts)
        with info.stage("tokenize"):  # with the graph's opening, on a first call
            g = self.graph("fused")
            encoded = self._encode(prompts, info)
            ins = g.inputs(batch, encoded.length)
            encoded.write(ins["input_ids"], ins["attention_mask"])
        with info.stage("noise"):
            self._fill_noise(ins["noise"], seeds, noise)
        with info.stage("fused"):
            outs = g.run(batch, sequence=encoded.length)
        with info.stage("output"):
            if self.mode == "auto":
                self.text_cache.remember(prompts, outs["text_states"], encoded.lengths, encoded.truncated)
            pixels = native.copy(outs["pixels"])
            self._report_reading(prompts, outs, info)
        return pixels, info

    def _run_cached(self, prompts, seeds, noise, info):
        """Every prompt's text states cached: the generator alone."""
        info.path = "cached"
        batch = len(prompts)
        with info.stage("cache"):
            gen = self.graph("generator")
            entries = self.text_cache.take(prompts)
            info.sequence = length = self.tokenizer.length_for([e.length for e in entries])
            ins = gen.inputs(batch, length)
            native.states_into([e.states for e in entries], ins["text_states"], ins["attention_mask"])
            self._report_truncation(prompts, [e.truncated for e in entries], info)
        return self._run_generator(gen, ins, prompts, length, seeds, noise, info)

    def _run_split(self, prompts, seeds, noise, info):
        """The text encoder, then the generator: each its own run (stage timing)."""
        info.path = "split"
        batch = len(prompts)
        with info.stage("tokenize"):
            enc, gen = self.graph("text_encoder"), self.graph("generator")
            encoded = self._encode(prompts, info)
            length = encoded.length
            ins, enc_ins = gen.inputs(batch, length), enc.inputs(batch, length)
            encoded.write(enc_ins["input_ids"], enc_ins["attention_mask"])
        with info.stage("text_encoder"):
            enc.run(
                batch, fetch=False, sequence=length
            )  # on a GPU backend the text states stay on the device
            gen.take(batch, "text_states", enc, "text_states", sequence=length)
            ins["attention_mask"][...] = enc_ins["attention_mask"]
        return self._run_generator(gen, ins, prompts, length, seeds, noise, info)

    def _run_generator(self, gen, ins, prompts, length, seeds, noise, info):
        """Noise into the generator's inputs ``ins`` (taken once per call: on a GPU graph, taking them again
        would upload every host array, over the text states fed on the device), then its run."""
        with info.stage("noise"):
            self._fill_noise(ins["noise"], seeds, noise)
        with info.stage("generator"):
            outs = gen.run(len(prompts), sequence=length)
        with info.stage("output"):
            pixels = native.to_pixels(outs["image"])
            self._report_reading(prompts, outs, info)
        return pixels, info

    def _report_reading(self, prompts, outs, info):
        """What the model read for each image (``info.read``, built when asked for), and a warning per prompt
        whose subject it does not know."""
        if not self.reading:
            return
        batch = len(prompts)
        probs = reading.copy_probabilities(self.reading, outs, batch)
        info.reader = functools.partial(reading.read_outputs, self.reading, probs, batch)
        subject = self.reading.get("subject")
        if subject is None:
            return
        notes = {}  # one note per distinct prompt, in order
        for prompt, row in zip(prompts, probs[subject["output"]]):
            if prompt not in notes:
                notes[prompt] = reading.unknown_subject_note(
                    self.model_name, prompt, row, subject["labels"], self.vocabulary
                )
        info.unknown = [n for n in notes.values() if n]

    def _encode(self, prompts, info):
        encoded = self.tokenizer.encode(prompts)
        info.sequence = encoded.length
        self._report_truncation(prompts, encoded.truncated, info)
        return encoded

    def _fill_noise(self, buf, seeds, noise):
        if noise is None:
            native.fill_noise(seeds, buf)
        else:
            buf[...] = noise

    def _check_noise(self, noise, batch):
        if not isinstance(noise, np.ndarray) or not np.issubdtype(noise.dtype, np.floating):
            raise BadInputError(
                "noise",
                f"expected a float numpy array, got {type(noise).__name__}"
                f"{'' if not isinstance(noise, np.ndarray) else ' of ' + str(noise.dtype)}",
                f"pass np.float32 of shape {(batch, *self.noise_shape)}",
            )
        if noise.shape != (batch, *self.noise_shape):
            raise BadInputError(
                "noise",
                f"shape {noise.shape} does not match the request",
                f"expected {(batch, *self.noise_shape)} (images, noise dims)",
            )
        if not np.all(np.isfinite(noise)):
            raise BadInputError("noise", "contains NaN or Inf", "pass finite values")
        return noise.astype(np.float32, copy=False)

"""Runtime for the diffusion family: text encoder, UNet steps with a numpy scheduler, VAE decoder.

A call runs one of two paths:
- ``fused``: one graph from token ids + noise to pixels, for the step counts the bundle unrolled
  (its default scheduler, no classifier-free guidance, text-to-image);
- ``loop``: text encoder, then one UNet run per step with the scheduler in numpy, then the VAE decoder;
  any step count, any of the four schedulers, guidance, image-to-image.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from .errors import BadBundleError, BadInputError
from .pipeline import CallInfo, Pipeline
from .schedulers import NAMES, guidance_embedding, make_scheduler
from .tokenize import PromptTokenizer

MODES = ("auto", "fused", "loop")
DEFAULT_STRENGTH = 0.5


def fused_name(steps: int) -> str:
    """The fused graph that unrolls ``steps`` steps: ``fused`` for one, ``fused_k2``, ``fused_k4``..."""
    return "fused" if steps == 1 else f"fused_k{steps}"


class NoiseStreams:
    """One numpy PCG64 stream per image, seeded by that image's seed alone; ``draw`` takes the next
    standard-normal array from each. The first draw equals the gan family's noise for the same seed."""

    def __init__(self, seeds: list[int]):
        self.rngs = [np.random.default_rng(s) for s in seeds]

    def draw(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.stack([r.standard_normal(shape, dtype=np.float32) for r in self.rngs])


def to_pixels(image: np.ndarray) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC, with diffusers' arithmetic (the fused graphs do the same)."""
    return np.rint(np.clip(image / 2 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


class DiffusionPipeline(Pipeline):
    """``pipe(prompt, seed=, num_steps=, guidance_scale=, latents=, image=, strength=, scheduler=,
    negative_prompt=)``. ``mode``: ``auto`` (fused graph when one fits the call, else the loop),
    ``fused`` (refuse calls no fused graph serves) or ``loop`` (always per step).

    Text states of recent prompts are cached (``cache_size``); a call whose prompts are all cached
    skips the text encoder and runs the loop."""

    family = "diffusion"

    def __init__(self, bundle, backend, precision, notes, mode: str = "auto", cache_size: int = 128,
                 form: str | None = None):
        super().__init__(bundle, backend, precision, notes, form)
        if mode not in MODES:
            raise BadInputError("mode", f"unknown mode {mode!r}", f"choose one of {', '.join(MODES)}")
        self.mode = mode
        gen = bundle.generation
        try:
            self.latent_shape = tuple(int(d) for d in gen["latent_shape"])
            self.image_size = int(gen["image_size"])
            self.default_steps = int(gen["num_steps"])
            self.default_guidance = float(gen["guidance_scale"])
            self.scheduler_name = gen["scheduler"]["name"]
            self.scheduler_config = dict(gen["scheduler"]["config"])
            self.fused = {int(k): str(v) for k, v in gen["fused"].items()}
            self.time_cond_dim = int(gen["time_cond_dim"]) if gen.get("time_cond_dim") else None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BadBundleError(f"bundle {bundle.root}", f"generation settings of a diffusion bundle are incomplete ({e!r})",
                                 "re-export the bundle") from None
        self.tokenizer = PromptTokenizer.of_bundle(bundle)
        self._schedulers = {}
        self.scheduler(self.scheduler_name)  # a config this runtime cannot run fails at load
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[np.ndarray, bool]] = OrderedDict()
        # fail at load, not at the first call
        self.graph("unet" if mode == "loop" or not self.fused else self.fused[min(self.fused)])

    def scheduler(self, name: str):
        if name not in NAMES:
            raise BadInputError("scheduler", f"unknown scheduler {name!r}", f"choose one of {', '.join(NAMES)}")
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self.scheduler_config)
        return self._schedulers[name]

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # ------------------------------------------------------------ one call

    def _generate(self, prompts, seeds, num_steps=None, guidance_scale=None, latents=None, image=None,
                  strength=None, scheduler=None, negative_prompt=None):
        batch = len(prompts)
        info = CallInfo(seeds=seeds, engine_stages=("fused", "text_encoder", "vae_encoder", "vae_decoder"))
        t = time.perf_counter_ns()
        name = self.scheduler_name if scheduler is None else scheduler
        sched = self.scheduler(name)
        guidance = self.default_guidance if guidance_scale is None else _number("guidance_scale", guidance_scale, 0.0)
        if image is not None:
            strength = DEFAULT_STRENGTH if strength is None else _number("strength", strength, 0.0, 1.0)
            if num_steps is None:  # the full schedule; int(num_steps * strength) of its steps run
                num_steps = max(self.default_steps, int(np.ceil(1.0 / max(strength, 1e-6) - 1e-9)))
        elif strength is not None:
            raise BadInputError("strength", "given without image=", "strength applies to image-to-image only")
        steps = self.default_steps if num_steps is None else num_steps
        plan = sched.plan(steps, strength if image is not None else 1.0)
        cfg = guidance > 1.0 and self.time_cond_dim is None  # LCM-distilled UNets take guidance as an input
        negatives = self._negatives(negative_prompt, batch) if cfg else []
        streams = NoiseStreams(seeds)
        noise = streams.draw(self.latent_shape)  # always drawn, so later draws do not depend on latents=
        if latents is not None:
            noise = self._check_latents(latents, batch)
        pixels_in = self._images(image, batch) if image is not None else None
        t = info.lap("noise", t)
        cond = None
        if self.time_cond_dim:
            cond = guidance_embedding(np.full(batch, guidance - 1.0, np.float32), self.time_cond_dim)
        use_cache = self.mode != "fused" and self.cache_size > 0 and all(p in self._cache for p in prompts + negatives)
        fused = self.fused.get(len(plan)) if (image is None and not cfg and name == self.scheduler_name
                                              and plan.begin == 0) else None
        if self.mode == "fused" and fused is None:
            raise BadInputError("mode fused", f"no fused graph serves this call ({len(plan)} steps, scheduler {name}, "
                                f"guidance {guidance}, image {'yes' if image is not None else 'no'})",
                                f"fused graphs run {sorted(self.fused)} steps with {self.scheduler_name}, no guidance, "
                                "text-to-image; use mode='loop' or 'auto'")
        if fused is not None and self.mode != "loop" and not use_cache:
            return self._run_fused(fused, prompts, noise, plan, streams, cond, info, t)
        info.path = "loop"
        states = self._text_states(negatives + prompts, info, t, use_cache)
        info.truncated = info.truncated[-batch:]  # the prompts', not the negative prompts'
        t = time.perf_counter_ns()
        if pixels_in is not None:
            enc = self.graph("vae_encoder")
            ins = enc.inputs(batch)
            ins["image"][...] = pixels_in
            ins["encoder_noise"][...] = streams.draw(self.latent_shape)
            t = info.lap("noise", t)
            x = plan.add_noise(enc.run(batch)["latents"], noise)
            t = info.lap("vae_encoder", t)
        else:
            x = noise * plan.init_sigma
        unet = self.graph("unet")
        rows = 2 * batch if cfg else batch
        ins = unet.inputs(rows)
        ins["text_states"][...] = states
        if cond is not None:
            ins["timestep_cond"][...] = cond
        stages = []
        for i, step_t in enumerate(plan.timesteps):
            scaled = plan.scale_input(i, x)
            ins["sample"][:batch] = scaled
            if cfg:
                ins["sample"][batch:] = scaled
            ins["timestep"][...] = step_t
            t = info.lap("scheduler", t)
            out = unet.run(rows)["model_output"]
            stages.append(f"unet_{i + 1}")
            t = info.lap(stages[-1], t)
            if cfg:  # rows are [negative..., positive...], as diffusers orders them
                uncond, text = out[:batch], out[batch:]
                out = uncond + guidance * (text - uncond)
            x = plan.step(i, x, out, streams.draw(self.latent_shape) if plan.needs_noise(i) else None)
        t = info.lap("scheduler", t)
        dec = self.graph("vae_decoder")
        dec.inputs(batch)["latents"][...] = x
        image_out = dec.run(batch)["image"]
        t = info.lap("vae_decoder", t)
        pixels = to_pixels(image_out)
        info.lap("output", t)
        info.engine_stages = info.engine_stages + tuple(stages)
        return pixels, info

    def _run_fused(self, name, prompts, noise, plan, streams, cond, info, t):
        batch = len(prompts)
        info.path = name
        g = self.graph(name)
        ins = g.inputs(batch)
        ins["noise"][...] = noise
        for i in range(len(plan)):
            if plan.needs_noise(i):
                ins[f"noise_{i + 1}"][...] = streams.draw(self.latent_shape)
        if cond is not None:
            ins["timestep_cond"][...] = cond
        t = info.lap("noise", t)
        tokens = self.tokenizer(prompts)
        ins["input_ids"][...] = tokens.input_ids
        self._report_truncation(prompts, tokens.truncated, info)
        t = info.lap("tokenize", t)
        outs = g.run(batch)
        t = info.lap("fused", t)
        self._remember(prompts, outs["text_states"], tokens.truncated)
        pixels = outs["pixels"].copy()
        info.lap("output", t)
        return pixels, info

    # ------------------------------------------------------------ text

    def _text_states(self, prompts, info, t, use_cache) -> np.ndarray:
        """(len(prompts), L, D) text states, from the cache or one text-encoder run."""
        if use_cache:
            for p in prompts:
                self._cache.move_to_end(p)
            states = np.stack([self._cache[p][0] for p in prompts])
            self._report_truncation(prompts, [self._cache[p][1] for p in prompts], info)
            info.lap("cache", t)
            return states
        enc = self.graph("text_encoder")
        ins = enc.inputs(len(prompts))
        tokens = self.tokenizer(prompts)
        ins["input_ids"][...] = tokens.input_ids
        self._report_truncation(prompts, tokens.truncated, info)
        t = info.lap("tokenize", t)
        states = enc.run(len(prompts))["text_states"].copy()
        info.lap("text_encoder", t)
        self._remember(prompts, states, tokens.truncated)
        return states

    def _negatives(self, negative_prompt, batch) -> list[str]:
        if negative_prompt is None:
            return [""] * batch
        items = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(items, (list, tuple)) or len(items) != batch or not all(isinstance(p, str) for p in items):
            raise BadInputError("negative_prompt", f"expected a string or {batch} strings (one per image)",
                                "pass one negative prompt, or one per image")
        return list(items)

    def _report_truncation(self, prompts, truncated, info):
        info.truncated = list(truncated)
        for p, cut in zip(prompts, truncated):
            if cut:
                info.warnings.append(f"prompt truncated to {self.tokenizer.max_length} tokens: {p[:60]!r}...")

    def _remember(self, prompts, states, truncated):
        if self.cache_size <= 0:
            return
        for i, p in enumerate(prompts):
            if p in self._cache:
                self._cache.move_to_end(p)
                continue
            self._cache[p] = (states[i].copy(), bool(truncated[i]))
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    # ------------------------------------------------------------ inputs

    def _check_latents(self, latents, batch) -> np.ndarray:
        want = (batch, *self.latent_shape)
        if not isinstance(latents, np.ndarray) or not np.issubdtype(latents.dtype, np.floating):
            raise BadInputError("latents", f"expected a float numpy array, got {type(latents).__name__}"
                                f"{'' if not isinstance(latents, np.ndarray) else ' of ' + str(latents.dtype)}",
                                f"pass np.float32 of shape {want} (unit-variance noise, as diffusers' latents=)")
        if latents.shape != want:
            raise BadInputError("latents", f"shape {latents.shape} does not match the request",
                                f"expected {want} (images, latent channels, height, width)")
        if not np.all(np.isfinite(latents)):
            raise BadInputError("latents", "contains NaN or Inf", "pass finite values")
        return latents.astype(np.float32)

    def _images(self, image, batch) -> np.ndarray:
        """Image-to-image input -> (batch, 3, S, S) float32 in [-1, 1], diffusers' preprocessing
        (resized to the bundle's size with Lanczos when it differs)."""
        items = list(image) if isinstance(image, (list, tuple)) else (
            list(image) if isinstance(image, np.ndarray) and image.ndim == 4 else [image])
        if len(items) == 1:
            items = items * batch
        if len(items) != batch:
            raise BadInputError("image", f"{len(items)} images for {batch} outputs", "pass one image, or one per output image")
        return np.stack([self._image(x) for x in items])

    def _image(self, image) -> np.ndarray:
        from PIL import Image
        size = self.image_size
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise BadInputError("image", f"array of {image.dtype} {image.shape}", "pass uint8 (H, W, 3) RGB or a PIL image")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise BadInputError("image", f"expected a PIL image or a uint8 array, got {type(image).__name__}",
                                "load it with PIL.Image.open(path)")
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.LANCZOS)
        arr = np.asarray(image).astype(np.float32) / 255.0
        return (2.0 * arr - 1.0).transpose(2, 0, 1)


def _number(name: str, value, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value) \
            or value < low or (high is not None and value > high):
        limits = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise BadInputError(name, f"expected a number {limits}, got {value!r}", f"pass a float {limits}")
    return float(value)

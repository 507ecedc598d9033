"""Runtime for the diffusion family: text encoder, UNet steps with a numpy scheduler, VAE decoder.

A call runs one of two paths:
- ``fused``: one graph from token ids + noise to pixels, for the step counts the bundle unrolled
  (its default scheduler, no classifier-free guidance, text-to-image);
- ``loop``: text encoder, then one UNet run per step with the scheduler in numpy, then the VAE decoder;
  any step count, any of the four schedulers, guidance, image-to-image.

A bundle with a ControlNet (``generation.controlnet``) runs it before every UNet evaluation on both paths;
its calls need ``control_image=`` (diffusers' StableDiffusionControlNetPipeline ``image``). A bundle with an
IP-Adapter (``generation.ip_adapter``) encodes ``ip_adapter_image=`` once per image (cached) and hands the
embedding to every UNet evaluation.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import native
from .errors import BadBundleError, BadInputError
from .pipeline import CallInfo, Pipeline
from .schedulers import NAMES, guidance_embedding, make_scheduler
from .tokenize import PromptTokenizer

MODES = ("auto", "fused", "loop")
DEFAULT_STRENGTH = 0.5
# The VAE classes a bundle may hold (its manifest's generation.vae), and whether image-to-image samples the
# encoder's latent distribution (one more noise draw per image): AutoencoderTiny's encoder is deterministic.
VAE_SAMPLES_LATENTS = {"AutoencoderKL": True, "AutoencoderTiny": False}
# Input images past this many pixels are refused before decoding (they are resized to the bundle's size
# anyway; PIL's own decompression-bomb limit is 179 MP)
MAX_IMAGE_PIXELS = 64 * 2**20
# The call options that take images (PIL images, uint8 arrays or file paths): edgegen serve refuses them, as
# over HTTP a string there would name a file on the server
IMAGE_OPTIONS = ("image", "control_image", "ip_adapter_image")
# controlnet_conditioning_scale's defaults: StableDiffusionControlNetPipeline's, and with image=
# (image-to-image) StableDiffusionControlNetImg2ImgPipeline's
CONTROL_SCALE, IMG2IMG_CONTROL_SCALE = 1.0, 0.8


@dataclass(slots=True)
class Control:
    """A call's ControlNet condition: the control images as diffusers' prepare_image makes them, and the
    scale of the residuals (controlnet_conditioning_scale; 0 turns the control off)."""

    image: np.ndarray  # (batch, 3, S, S) float32 RGB in [0, 1]
    scale: float


@dataclass(slots=True)
class ImagePrompt:
    """A call's IP-Adapter input: each distinct reference image as the image encoder takes it, which of them
    each output image uses, the scale of the adapter's attention (diffusers' set_ip_adapter_scale; 0 turns it
    off) and, once encoded (``_encode_images``), each output image's embedding."""

    pixels: list[np.ndarray]  # (3, N, N) float32 CLIP pixels, one per distinct image
    rows: list[int]  # per output image, the index of its image in ``pixels``
    scale: float
    embeds: np.ndarray | None = None  # (batch, 1, D) float32


def fused_name(steps: int) -> str:
    """The fused graph that unrolls ``steps`` steps: ``fused`` for one, ``fused_k2``, ``fused_k4``..."""
    return "fused" if steps == 1 else f"fused_k{steps}"


@dataclass(slots=True)
class CallPlan:
    """A call's options resolved: what the loop or a fused graph runs."""

    plan: object  # the scheduler's plan (schedulers.py): timesteps, sigmas, steps
    scheduler: str
    guidance: float
    cfg: bool  # classifier-free guidance: negative rows run beside the prompts'
    negatives: list[str]  # the negative prompts (empty without cfg)
    control: Control | None = None  # bundles with a ControlNet
    image_prompt: ImagePrompt | None = None  # bundles with an IP-Adapter


class NoiseStreams:
    """One numpy PCG64 stream per image, seeded by that image's seed alone; ``draw`` takes the next
    standard-normal array from each. The first draw equals the gan family's noise for the same seed."""

    def __init__(self, seeds: list[int]):
        self.rngs = [np.random.default_rng(s) for s in seeds]

    def draw(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.stack([r.standard_normal(shape, dtype=np.float32) for r in self.rngs])


class DiffusionPipeline(Pipeline):
    """``pipe(prompt, seed=, num_inference_steps=, guidance_scale=, negative_prompt=, latents=, image=,
    strength=, scheduler=, control_image=, controlnet_conditioning_scale=)``, each with diffusers' meaning
    (images: PIL images, uint8 (H, W, 3) arrays or paths; one, or one per output image). ``mode``: ``auto``
    (fused graph when one fits the call, else the loop), ``fused`` (refuse calls no fused graph serves) or
    ``loop`` (always per step).

    Text states of recent prompts are cached (``cache_size``); a call whose prompts are all cached
    skips the text encoder and runs the loop."""

    family = "diffusion"
    options = (
        "num_inference_steps",
        "guidance_scale",
        "negative_prompt",
        "latents",
        "image",
        "strength",
        "scheduler",
        "control_image",
        "controlnet_conditioning_scale",
        "ip_adapter_image",
        "ip_adapter_scale",
    )
    image_cache_size = 32  # IP-Adapter image embeddings kept, by the preprocessed image's hash

    def __init__(
        self,
        bundle,
        backend,
        precision,
        notes,
        mode: str = "auto",
        cache_size: int = 128,
        form: str | None = None,
        lora=None,
    ):
        super().__init__(bundle, backend, precision, notes, form, cache_size, lora)
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
            self.vae = str(gen["vae"])
            self.residuals = [str(r) for r in gen["controlnet"]["residuals"]] if "controlnet" in gen else []
            self.ip_adapter = _ip_adapter_settings(gen["ip_adapter"]) if "ip_adapter" in gen else None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BadBundleError(
                f"bundle {bundle.root}",
                f"generation settings of a diffusion bundle are incomplete ({e!r})",
                "re-export the bundle",
            ) from None
        if self.vae not in VAE_SAMPLES_LATENTS:
            raise BadBundleError(
                f"bundle {bundle.root}",
                f"unknown VAE class {self.vae!r} in generation.vae",
                f"this runtime runs {' or '.join(VAE_SAMPLES_LATENTS)}; upgrade edgegen",
            )
        self.tokenizer = PromptTokenizer.of_bundle(bundle)
        self._image_embeds: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._schedulers = {}
        self.scheduler(self.scheduler_name)  # a config this runtime cannot run fails at load
        # fail at load, not at the first call
        self.graph("unet" if mode == "loop" or not self.fused else self.fused[min(self.fused)])

    def stand_in_inputs(self) -> dict:
        """What this bundle's calls need besides a prompt, as stand-ins for timing (``edgegen bench``): a
        mid-grey control or reference image (the cost does not depend on its values)."""
        grey = np.full((self.image_size, self.image_size, 3), 128, np.uint8)
        return {
            **({"control_image": grey} if self.residuals else {}),
            **({"ip_adapter_image": grey} if self.ip_adapter else {}),
        }

    def clear_cache(self) -> None:
        """Forget the cached text states and IP-Adapter image embeddings."""
        super().clear_cache()
        with self._lock:
            self._image_embeds.clear()

    def scheduler(self, name: str):
        if name not in NAMES:
            raise BadInputError(
                "scheduler", f"unknown scheduler {name!r}", f"choose one of {', '.join(NAMES)}"
            )
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self.scheduler_config)
        return self._schedulers[name]

    # ------------------------------------------------------------ one call

    def _generate(
        self,
        prompts,
        seeds,
        num_inference_steps=None,
        guidance_scale=None,
        latents=None,
        image=None,
        strength=None,
        scheduler=None,
        negative_prompt=None,
        control_image=None,
        controlnet_conditioning_scale=None,
        ip_adapter_image=None,
        ip_adapter_scale=None,
    ):
        batch = len(prompts)
        info = CallInfo(
            seeds=seeds,
            engine_stages=("fused", "text_encoder", "image_encoder", "vae_encoder", "vae_decoder"),
        )
        with info.stage("noise"):
            call = self._plan(
                batch, num_inference_steps, guidance_scale, image, strength, scheduler, negative_prompt
            )
            streams = NoiseStreams(seeds)
            noise = streams.draw(self.latent_shape)  # always drawn, so later draws do not depend on latents=
            if latents is not None:
                noise = self._check_latents(latents, batch)
            pixels_in = 2.0 * self._images(image, batch, "image") - 1.0 if image is not None else None
            call.control = self._control(
                control_image, controlnet_conditioning_scale, batch, image is not None
            )
            call.image_prompt = self._image_prompt(ip_adapter_image, ip_adapter_scale, batch)
            cond = None
            if self.time_cond_dim:  # LCM-distilled UNets take guidance as an input
                cond = guidance_embedding(np.full(batch, call.guidance - 1.0, np.float32), self.time_cond_dim)
        use_cache = self.mode != "fused" and self.text_cache.holds(prompts + call.negatives)
        fused = (
            self.fused.get(len(call.plan))
            if (
                image is None
                and not call.cfg
                and call.scheduler == self.scheduler_name
                and call.plan.begin == 0
            )
            else None
        )
        if self.mode == "fused" and fused is None:
            raise BadInputError(
                "mode fused",
                f"no fused graph serves this call ({len(call.plan)} steps, scheduler "
                f"{call.scheduler}, guidance {call.guidance}, image {'yes' if image is not None else 'no'})",
                f"fused graphs run {sorted(self.fused)} steps with {self.scheduler_name}, no guidance, "
                "text-to-image; use mode='loop' or 'auto'",
            )
        if call.image_prompt is not None:
            self._encode_images(call.image_prompt, info)
        if fused is not None and self.mode != "loop" and not use_cache:
            return self._run_fused(fused, prompts, noise, call, streams, cond, info)
        return self._run_loop(prompts, noise, pixels_in, call, streams, cond, use_cache, info)

    def _plan(self, batch, steps, guidance_scale, image, strength, scheduler, negative_prompt) -> CallPlan:
        """The call's options checked, with the bundle's defaults, as the steps to run."""
        name = self.scheduler_name if scheduler is None else scheduler
        sched = self.scheduler(name)
        guidance = (
            self.default_guidance
            if guidance_scale is None
            else _number("guidance_scale", guidance_scale, 0.0)
        )
        if image is not None:
            strength = DEFAULT_STRENGTH if strength is None else _number("strength", strength, 0.0, 1.0)
            if steps is None:  # the full schedule; int(num_inference_steps * strength) of its steps run
                steps = max(self.default_steps, int(np.ceil(1.0 / max(strength, 1e-6) - 1e-9)))
        elif strength is not None:
            raise BadInputError("strength", "given without image=", "strength applies to image-to-image only")
        steps = self.default_steps if steps is None else steps
        plan = sched.plan(steps, strength if image is not None else 1.0)
        cfg = guidance > 1.0 and self.time_cond_dim is None  # LCM-distilled UNets take guidance as an input
        negatives = self._negatives(negative_prompt, batch) if cfg else []
        return CallPlan(plan, name, guidance, cfg, negatives)

    def _run_fused(self, name, prompts, noise, call, streams, cond, info):
        """One run of a fused graph: token ids + noise -> pixels, every step unrolled inside."""
        batch, plan = len(prompts), call.plan
        info.path = name
        g = self.graph(name)
        ins = g.inputs(batch)
        with info.stage("noise"):
            ins["noise"][...] = noise
            for i in range(len(plan)):
                if plan.needs_noise(i):
                    ins[f"noise_{i + 1}"][...] = streams.draw(self.latent_shape)
            if cond is not None:
                ins["timestep_cond"][...] = cond
            if call.control is not None:
                ins["control_image"][...] = call.control.image
                ins["conditioning_scale"][...] = call.control.scale
            if call.image_prompt is not None:
                ins["image_embeds"][...] = call.image_prompt.embeds
                ins["ip_adapter_scale"][...] = call.image_prompt.scale
        with info.stage("tokenize"):
            tokens = self.tokenizer(prompts)
            ins["input_ids"][...] = tokens.input_ids
            self._report_truncation(prompts, tokens.truncated, info)
        with info.stage("fused"):
            outs = g.run(batch)
        with info.stage("output"):
            self._remember(prompts, outs["text_states"], tokens.truncated)
            pixels = native.copy(outs["pixels"])
        return pixels, info

    def _run_loop(self, prompts, noise, pixels_in, call, streams, cond, use_cache, info):
        """Text states, initial latents, one UNet run per step with the scheduler in numpy, the VAE
        decoder."""
        batch, plan = len(prompts), call.plan
        info.path = "loop"
        states = self._text_states(call.negatives + prompts, info, use_cache)
        info.truncated = info.truncated[-batch:]  # the prompts', not the negative prompts'
        if pixels_in is not None:
            enc = self.graph("vae_encoder")
            ins = enc.inputs(batch)
            with info.stage("noise"):
                ins["image"][...] = pixels_in
                if VAE_SAMPLES_LATENTS[self.vae]:
                    ins["encoder_noise"][...] = streams.draw(self.latent_shape)
            with info.stage("vae_encoder"):
                x = plan.add_noise(enc.run(batch)["latents"], noise)
        else:
            x = noise * plan.init_sigma
        x = self._denoise(x, states, batch, call, streams, cond, info)
        dec = self.graph("vae_decoder")
        with info.stage("vae_decoder"):
            dec.inputs(batch)["latents"][...] = x
            image_out = dec.run(batch)["image"]
        with info.stage("output"):
            pixels = native.to_pixels(image_out)
        return pixels, info

    def _denoise(self, x, states, batch, call, streams, cond, info):
        """The UNet steps; with classifier-free guidance each runs the negative and positive rows together.
        With a ControlNet, it runs on the same rows before each UNet run and hands it its residuals."""
        plan, unet = call.plan, self.graph("unet")
        rows = 2 * batch if call.cfg else batch
        ins = unet.inputs(rows)
        ins["text_states"][...] = states
        if cond is not None:
            ins["timestep_cond"][...] = cond
        if call.control is not None:
            self._start_control(call.control, states, rows)
        if call.image_prompt is not None:  # negative rows get zeros, as diffusers' uncond image embeds
            embeds = call.image_prompt.embeds
            ins["image_embeds"][...] = np.concatenate([0 * embeds, embeds]) if call.cfg else embeds
            ins["ip_adapter_scale"][...] = call.image_prompt.scale
        steps = []
        for i, step_t in enumerate(plan.timesteps):
            with info.stage("scheduler"):
                scaled = plan.scale_input(i, x)
                ins["sample"][:batch] = scaled
                if call.cfg:
                    ins["sample"][batch:] = scaled
                ins["timestep"][...] = step_t
            if call.control is not None:
                steps.append(f"controlnet_{i + 1}")
                with info.stage(steps[-1]):
                    self._run_control(unet, rows)
            steps.append(f"unet_{i + 1}")
            with info.stage(steps[-1]):
                out = unet.run(rows)["model_output"]
            with info.stage("scheduler"):
                if call.cfg:  # rows are [negative..., positive...], as diffusers orders them
                    uncond, text = out[:batch], out[batch:]
                    out = uncond + call.guidance * (text - uncond)
                x = plan.step(i, x, out, streams.draw(self.latent_shape) if plan.needs_noise(i) else None)
        info.engine_stages = info.engine_stages + tuple(steps)
        return x

    def _start_control(self, control: Control, states, rows):
        """The ControlNet's inputs that stay for every step: text states, control image, scale. With guidance
        the control image serves the negative and positive rows alike (diffusers duplicates it)."""
        ins = self.graph("controlnet").inputs(rows)
        ins["text_states"][...] = states
        ins["controlnet_cond"][...] = np.concatenate([control.image] * (rows // len(control.image)))
        ins["conditioning_scale"][...] = control.scale

    def _run_control(self, unet, rows):
        """The ControlNet on the UNet's sample and timestep; its residuals into the UNet's inputs."""
        controlnet = self.graph("controlnet")
        ins, unet_ins = controlnet.inputs(rows), unet.inputs(rows)
        ins["sample"][...] = unet_ins["sample"]
        ins["timestep"][...] = unet_ins["timestep"]
        controlnet.run(rows)
        for name in self.residuals:
            unet.take(rows, name, controlnet, name)

    # ------------------------------------------------------------ text

    def _text_states(self, prompts, info, use_cache) -> np.ndarray:
        """(len(prompts), L, D) text states, from the cache or one text-encoder run."""
        if use_cache:
            with info.stage("cache"):
                entries = self.text_cache.take(prompts)
                self._report_truncation(prompts, [e.truncated for e in entries], info)
                return np.stack([e.states for e in entries])
        enc = self.graph("text_encoder")
        ins = enc.inputs(len(prompts))
        with info.stage("tokenize"):
            tokens = self.tokenizer(prompts)
            ins["input_ids"][...] = tokens.input_ids
            self._report_truncation(prompts, tokens.truncated, info)
        with info.stage("text_encoder"):
            states = enc.run(len(prompts))["text_states"]
            self._remember(prompts, states, tokens.truncated)
            return states.copy()

    def _remember(self, prompts, states, truncated):
        """Every row of the fixed-length text states (padding included: the UNet reads them whole)."""
        self.text_cache.remember(prompts, states, [states.shape[1]] * len(prompts), truncated)

    def _negatives(self, negative_prompt, batch) -> list[str]:
        if negative_prompt is None:
            return [""] * batch
        items = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
        if (
            not isinstance(items, (list, tuple))
            or len(items) != batch
            or not all(isinstance(p, str) for p in items)
        ):
            raise BadInputError(
                "negative_prompt",
                f"expected a string or {batch} strings (one per image)",
                "pass one negative prompt, or one per image",
            )
        return list(items)

    # ------------------------------------------------------------ inputs

    def _check_latents(self, latents, batch) -> np.ndarray:
        want = (batch, *self.latent_shape)
        if not isinstance(latents, np.ndarray) or not np.issubdtype(latents.dtype, np.floating):
            raise BadInputError(
                "latents",
                f"expected a float numpy array, got {type(latents).__name__}"
                f"{'' if not isinstance(latents, np.ndarray) else ' of ' + str(latents.dtype)}",
                f"pass np.float32 of shape {want} (unit-variance noise, as diffusers' latents=)",
            )
        if latents.shape != want:
            raise BadInputError(
                "latents",
                f"shape {latents.shape} does not match the request",
                f"expected {want} (images, latent channels, height, width)",
            )
        if not np.all(np.isfinite(latents)):
            raise BadInputError("latents", "contains NaN or Inf", "pass finite values")
        return latents.astype(np.float32)

    def _control(self, control_image, scale, batch, img2img: bool) -> Control | None:
        """The call's ControlNet condition; refused where the bundle has no ControlNet, and missing where it
        has one (its graphs need a condition, as diffusers' ControlNet pipelines do)."""
        if not self.residuals:
            given = "control_image" if control_image is not None else "controlnet_conditioning_scale"
            if control_image is not None or scale is not None:
                raise BadInputError(
                    given,
                    "this bundle has no ControlNet",
                    "export a StableDiffusionControlNetPipeline, or add one with "
                    "`edgegen export CKPT --controlnet DIR`",
                )
            return None
        if control_image is None:
            raise BadInputError(
                "control_image",
                "missing: this bundle has a ControlNet, which needs a condition image",
                "pass control_image= (PIL image, uint8 (H, W, 3) array or path); "
                "controlnet_conditioning_scale=0 turns the control off",
            )
        default = IMG2IMG_CONTROL_SCALE if img2img else CONTROL_SCALE
        scale = default if scale is None else _number("controlnet_conditioning_scale", scale, 0.0)
        return Control(self._images(control_image, batch, "control_image"), scale)

    def _image_prompt(self, image, scale, batch) -> ImagePrompt | None:
        """The call's IP-Adapter input, each distinct image read and prepared once: refused where the bundle
        has no IP-Adapter, and missing where it has one (its UNet reads an image embedding, as diffusers' does
        once an adapter is loaded)."""
        if self.ip_adapter is None:
            if image is not None or scale is not None:
                raise BadInputError(
                    "ip_adapter_image" if image is not None else "ip_adapter_scale",
                    "this bundle has no IP-Adapter",
                    "add one with `edgegen export CKPT --ip-adapter DIR`",
                )
            return None
        if image is None:
            raise BadInputError(
                "ip_adapter_image",
                "missing: this bundle has an IP-Adapter, which needs a reference image",
                "pass ip_adapter_image= (PIL image, uint8 (H, W, 3) array or path); ip_adapter_scale=0 "
                "turns the adapter off",
            )
        scale = self.ip_adapter["scale"] if scale is None else _number("ip_adapter_scale", scale, 0.0)
        distinct, rows = _image_list(image, batch, "ip_adapter_image")
        pixels = [clip_pixels(_rgb(x, "ip_adapter_image"), self.ip_adapter) for x in distinct]
        return ImagePrompt(pixels, rows, scale)

    def _encode_images(self, prompt: ImagePrompt, info) -> None:
        """Each output image's embedding into ``prompt.embeds``: a distinct image's from the cache (by its
        pixels' hash) or from one image-encoder run, the only part timed as the engine stage."""
        keys = [hashlib.sha256(p.tobytes()).digest() for p in prompt.pixels]
        enc = self.graph("image_encoder")
        for key, pixels in zip(keys, prompt.pixels):
            if key not in self._image_embeds:
                enc.inputs(1)["pixel_values"][...] = pixels
                with info.stage("image_encoder"):
                    self._image_embeds[key] = enc.run(1)["image_embeds"][0].copy()
            self._image_embeds.move_to_end(key)
        prompt.embeds = np.stack([self._image_embeds[key] for key in keys])[prompt.rows]
        while len(self._image_embeds) > self.image_cache_size:
            self._image_embeds.popitem(last=False)

    def _images(self, image, batch, subject) -> np.ndarray:
        """Input images -> (batch, 3, S, S) float32 RGB in [0, 1], diffusers' VaeImageProcessor preprocessing
        before its normalisation (converted to RGB, resized to the bundle's size with Lanczos), each distinct
        image once."""
        distinct, rows = _image_list(image, batch, subject)
        return np.stack([self._image(x, subject) for x in distinct])[rows]

    def _image(self, image, subject) -> np.ndarray:
        from PIL import Image

        size = self.image_size
        image = _rgb(image, subject)
        if image.size != (size, size):
            image = image.resize((size, size), Image.LANCZOS)
        return (np.asarray(image).astype(np.float32) / 255.0).transpose(2, 0, 1)


def _image_list(image, batch: int, subject: str) -> tuple[list, list[int]]:
    """The distinct images given (one object given for several output images counts once) and, per output
    image, the index of its image among them: one image given serves them all."""
    items = (
        list(image)
        if isinstance(image, (list, tuple))
        else (list(image) if isinstance(image, np.ndarray) and image.ndim == 4 else [image])
    )
    if len(items) == 1:
        items = items * batch
    if len(items) != batch:
        raise BadInputError(
            subject, f"{len(items)} images for {batch} outputs", "pass one image, or one per output image"
        )
    index: dict[int, int] = {}  # id of an item -> its index among the distinct ones (items keeps them alive)
    rows = [index.setdefault(id(x), len(index)) for x in items]
    distinct = list({id(x): x for x in items}.values())
    return distinct, rows


def clip_pixels(image, settings: dict) -> np.ndarray:
    """An RGB PIL image as CLIPImageProcessor prepares it for the image encoder: the shortest edge resized
    to ``image_size`` (bicubic; the long edge truncated, as transformers computes it), a centred square crop,
    then (x / 255 - mean) / std; (3, N, N) float32."""
    from PIL import Image

    n, (width, height) = settings["image_size"], image.size
    short, long = sorted((width, height))
    resized = (n, int(n * long / short)) if width <= height else (int(n * long / short), n)
    image = image.resize(resized, Image.BICUBIC)
    top, left = (resized[1] - n) // 2, (resized[0] - n) // 2
    arr = np.asarray(image, dtype=np.float32)[top : top + n, left : left + n] * np.float32(1 / 255)
    arr = (arr - settings["image_mean"]) / settings["image_std"]
    return arr.transpose(2, 0, 1).astype(np.float32)


def _ip_adapter_settings(entry) -> dict:
    return {
        "image_size": int(entry["image_size"]),
        "image_mean": np.asarray(entry["image_mean"], np.float32),
        "image_std": np.asarray(entry["image_std"], np.float32),
        "scale": float(entry.get("scale", 1.0)),
    }


def _rgb(image, subject: str):
    """A PIL image, uint8 (H, W, 3) array or image file path as an RGB PIL image (other modes converted, as
    diffusers does); unreadable, wrongly shaped or huge input refused."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(image)  # reads the header only: the size is checked before decoding
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise BadInputError(subject, f"cannot read {image}: {e}", "pass a PNG or JPEG file") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise BadInputError(
                subject, f"array of {image.dtype} {image.shape}", "pass uint8 (H, W, 3) RGB or a PIL image"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise BadInputError(
            subject,
            f"expected a PIL image, a uint8 array or a path, got {type(image).__name__}",
            "load it with PIL.Image.open(path)",
        )
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BadInputError(
            subject,
            f"{width}x{height} is too large",
            f"pass at most {MAX_IMAGE_PIXELS // 2**20} megapixels (it is resized to the bundle's size)",
        )
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise BadInputError(subject, f"cannot decode the image: {e}", "pass an intact PNG or JPEG") from None


def _number(name: str, value, low: float, high: float | None = None) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not np.isfinite(value)
        or value < low
        or (high is not None and value > high)
    ):
        limits = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise BadInputError(name, f"expected a number {limits}, got {value!r}", f"pass a float {limits}")
    return float(value)

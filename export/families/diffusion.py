"""The diffusion family: a diffusers Stable-Diffusion-style pipeline directory (CLIP text encoder,
UNet2DConditionModel, AutoencoderKL or AutoencoderTiny), aimed at one- and few-step models (SD-Turbo, LCM).

Components: ``text_encoder``, ``unet`` (one denoising evaluation), ``vae_decoder``, ``vae_encoder``
(image-to-image), and fused graphs from token ids + initial noise to uint8 pixels with the scheduler
unrolled inside: ``fused`` (1 step), ``fused_k2``, ``fused_k4`` (timesteps baked in). The scheduler
arithmetic traced into them is the runtime's own (``edgegen.runtime.schedulers``).

With a ControlNet (the pipeline's ``controlnet/`` or ``controlnet=DIR``) the bundle also holds
``controlnet`` (latents, timestep, text states, control image, scale -> the UNet's residuals), the UNet
takes those residuals as inputs, and every fused graph runs the ControlNet before each UNet step (inputs
``control_image`` and ``conditioning_scale``). With an IP-Adapter (``ip_adapter=DIR``, diffusers'
load_ip_adapter layout) it holds ``image_encoder`` (CLIP pixels -> image embedding) and the UNet, fused graphs
included, gains the adapter's cross-attention with inputs ``image_embeds`` and ``ip_adapter_scale``. Without
them, every graph is as before.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from edgegen.runtime.bundle import OutputRef, TensorSpec
from edgegen.runtime.diffusion import NoiseStreams, fused_name
from edgegen.runtime.errors import BadInputError, CheckpointError
from edgegen.runtime.schedulers import DIFFUSERS_NAMES, guidance_embedding, make_scheduler
from torch import nn

from ..lora import fuse_loras
from ..text_encoders import tokenizer_settings
from . import ComponentDef, Family
from .gan import VALIDATION_PROMPTS, VALIDATION_SEEDS

FUSED_STEPS = (1, 2, 4)
LCM_DEFAULT_GUIDANCE = (
    8.5  # diffusers' LatentConsistencyModelPipeline default, for UNets with time_cond_proj_dim
)


class TextEncoder(nn.Module):
    """Token ids -> last hidden states, as Stable Diffusion pipelines condition on them (no attention
    mask)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


class Denoiser(nn.Module):
    """One UNet evaluation: (scaled) latents, timestep, text states [, guidance embedding] [, IP-Adapter image
    embedding and scale] [, ControlNet residuals: the down blocks' then the mid block's] -> model output."""

    def __init__(self, unet, time_cond: bool = False, ip_adapter: bool = False):
        super().__init__()
        self.unet, self.time_cond, self.ip_adapter = unet, time_cond, ip_adapter

    def forward(self, sample, timestep, text_states, *extra):
        extra = list(extra)
        timestep_cond = extra.pop(0) if self.time_cond else None
        added = None
        if self.ip_adapter:
            image_embeds, scale = extra.pop(0), extra.pop(0)
            set_ip_adapter_scale(self.unet, scale)
            added = {"image_embeds": [image_embeds]}
        residuals = extra
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=text_states,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added,
            down_block_additional_residuals=residuals[:-1] if residuals else None,
            mid_block_additional_residual=residuals[-1] if residuals else None,
            return_dict=False,
        )[0]


def set_ip_adapter_scale(unet, scale) -> None:
    """The scale every IP-Adapter attention processor multiplies its image attention by (diffusers'
    set_ip_adapter_scale). A tensor here, so tracing makes it a graph input: traced at a non-zero value,
    the processors' ``scale == 0`` shortcut is not taken, and scale 0 still adds nothing."""
    for processor in unet.attn_processors.values():
        if isinstance(getattr(processor, "scale", None), list):
            processor.scale = [scale]


class ImageEncoder(nn.Module):
    """CLIPVisionModelWithProjection: normalised CLIP pixels -> image embedding (what an IP-Adapter's image
    projection reads, as diffusers' encode_image gives it)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).image_embeds[:, None]


def image_encoder_component(encoder: ImageEncoder) -> ComponentDef:
    """The ``image_encoder`` component as a bundle holds it: CLIP pixels at the encoder's size -> the image
    embedding."""
    config = encoder.model.config
    n = config.image_size
    return ComponentDef(
        "image_encoder",
        encoder,
        [TensorSpec("pixel_values", "float32", ("batch", 3, n, n))],
        [TensorSpec("image_embeds", "float32", ("batch", 1, config.projection_dim))],
        {"image_embeds": 1e-3},
    )


class Control(nn.Module):
    """ControlNetModel: (scaled) latents, timestep, text states, control image ([0, 1] RGB NCHW, as diffusers
    prepares it), conditioning scale -> the down blocks' residuals then the mid block's, scaled. The scale is
    an input, so 0 turns the control off in the same graph."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, text_states, controlnet_cond, conditioning_scale):
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=text_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        return (*down, mid)


class Decoder(nn.Module):
    """Latents as the UNet sees them -> image in [-1, 1] (the VAE scaling factor applied inside).

    diffusers' pipelines divide by ``vae.config.scaling_factor`` whatever the VAE's class: 1.0 for
    AutoencoderTiny (TAESD), whose ``scale_latents``/``unscale_latents`` only serve its own ``forward``
    (a uint8 round trip of the latents) and are never called by a pipeline."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.scale = vae, float(vae.config.scaling_factor)

    def forward(self, latents):
        return self.vae.decode(latents / self.scale, return_dict=False)[0]


class Encoder(nn.Module):
    """AutoencoderKL: image in [-1, 1] + unit noise -> scaled latents, a sample of the VAE's latent
    distribution (mean + std * noise, as diffusers' image-to-image pipeline draws it)."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.scale = vae, float(vae.config.scaling_factor)

    def forward(self, image, encoder_noise):
        dist = self.vae.encode(image).latent_dist
        return (dist.mean + dist.std * encoder_noise) * self.scale


class TinyEncoder(nn.Module):
    """AutoencoderTiny: image in [-1, 1] -> scaled latents. Deterministic: its encoder gives the latents
    themselves (diffusers' retrieve_latents reads ``.latents``), so it takes no noise."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.scale = vae, float(vae.config.scaling_factor)

    def forward(self, image):
        return self.vae.encode(image).latents * self.scale


class UpsampleConv(nn.Module):
    """diffusers' Upsample2D (nearest 2x, then a 3x3 convolution), computed on the low-resolution input:
    each output phase (row, column parity) is a 2x2 convolution whose taps are sums of the 3x3 kernel's,
    so one 2x2 convolution with the four phases' kernels, then pixel shuffle, gives the same sums with
    16 instead of 36 multiply-adds per input pixel and channel pair, and no 4x-sized upsampled tensor.
    The VAE decoder spends most of its time in these layers; traced in place of the original only."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        w = conv.weight.detach()
        # phase 0 reads rows (i-1, i) with taps (w0, w1+w2); phase 1 reads (i, i+1) with (w0+w1, w2)
        rows = [
            torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2),
        ]
        cols = lambda k: [  # noqa: E731
            torch.stack([k[..., 0], k[..., 1] + k[..., 2]], -1),
            torch.stack([k[..., 0] + k[..., 1], k[..., 2]], -1),
        ]
        self.register_buffer(
            "weight", torch.cat([c for r in rows for c in cols(r)], 0)
        )  # phases 00, 01, 10, 11
        self.register_buffer("bias", conv.bias.detach().repeat(4) if conv.bias is not None else None)
        self.out = w.shape[0]

    def forward(self, x, output_size=None, *args, **kwargs):
        n, _, h, w = x.shape
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)  # (n, 4 * out, h + 1, w + 1)
        o = self.out
        phases = [
            y[:, i * o : (i + 1) * o, a : a + h, b : b + w]
            for i, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1)))
        ]
        return F.pixel_shuffle(torch.stack(phases, 2).reshape(n, 4 * o, h, w), 2)


def _plain_conv3x3(conv) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.stride == (1, 1)
        and conv.groups == 1
        and conv.dilation == (1, 1)
    )


def _nearest_2x(layer) -> bool:
    return (
        isinstance(layer, nn.Upsample)
        and layer.mode == "nearest"
        and layer.size is None
        and layer.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0))
    )


@contextlib.contextmanager
def upsamplers_as_subpixel(*models):
    """Swap every plain Upsample2D of ``models`` for UpsampleConv while the block runs; in a Sequential
    (AutoencoderTiny's decoder), a nearest-2x nn.Upsample followed by a plain 3x3 conv likewise (the
    Upsample becomes an Identity, the conv an UpsampleConv)."""
    from diffusers.models.upsampling import Upsample2D

    swapped = []

    def swap(parent, name, new):
        swapped.append((parent, name, parent._modules[name]))
        parent._modules[name] = new

    for model in models:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if (
                    isinstance(child, Upsample2D)
                    and child.use_conv
                    and not child.use_conv_transpose
                    and child.interpolate
                    and child.norm is None
                    and _plain_conv3x3(getattr(child, "conv", None))
                ):
                    swap(parent, name, UpsampleConv(child.conv))
            if isinstance(parent, nn.Sequential):
                names = list(parent._modules)
                for up, conv in zip(names, names[1:]):
                    if _nearest_2x(parent._modules[up]) and _plain_conv3x3(parent._modules[conv]):
                        swap(parent, conv, UpsampleConv(parent._modules[conv]))
                        swap(parent, up, nn.Identity())
    try:
        yield len([s for s in swapped if not isinstance(s[0]._modules[s[1]], nn.Identity)])
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def to_pixels(image):
    """[-1, 1] NCHW -> uint8 NHWC, diffusers' post-processing; the cast is the last op (TensorRT wants
    uint8 only at the edge)."""
    return ((image / 2 + 0.5).clamp(0.0, 1.0) * 255.0).round().permute(0, 2, 3, 1).to(torch.uint8)


class Fused(nn.Module):
    """Token ids + unit noise (+ per-step noise for stochastic schedulers) [+ guidance embedding] [+ control
    image and conditioning scale] -> uint8 pixels and text states, with ``plan``'s steps unrolled (timesteps
    and scheduler constants baked in)."""

    def __init__(self, text_encoder, denoiser, decoder, plan, time_cond: bool, control=None):
        super().__init__()
        self.text_encoder, self.denoiser, self.decoder, self.plan = text_encoder, denoiser, decoder, plan
        self.time_cond, self.control = time_cond, control
        self.noisy = [i for i in range(len(plan)) if plan.needs_noise(i)]

    def forward(self, input_ids, noise, *extra):
        extra = list(extra)
        control_inputs = [extra.pop(-2), extra.pop()] if self.control is not None else []
        ip = [extra.pop(-2), extra.pop()] if self.denoiser.ip_adapter else []
        cond = [extra.pop()] if self.time_cond else []
        cond += ip
        states = self.text_encoder(input_ids)
        x = noise * self.plan.init_sigma
        for i, t in enumerate(self.plan.timesteps):
            # a (1,) timestep: the UNet broadcasts it over the batch, so the batch axis stays dynamic
            sample, timestep = self.plan.scale_input(i, x), torch.tensor([float(t)])
            residuals = self.control(sample, timestep, states, *control_inputs) if control_inputs else ()
            out = self.denoiser(sample, timestep, states, *cond, *residuals)
            x = self.plan.step(i, x, out, extra[self.noisy.index(i)] if i in self.noisy else None)
        return to_pixels(self.decoder(x)), states


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


_ONNX_TYPES = {"float32": 1, "uint8": 2, "int64": 7}


def assemble_fused(
    parts: dict[str, Path], out: Path, plan, specs: dict[str, TensorSpec], time_cond: bool
) -> None:
    """The unrolled graph of ``plan`` from the exported text encoder, UNet and VAE decoder: each step is a
    copy of the UNet's nodes (one set of weights), with the scheduler arithmetic traced as small glue graphs
    from the runtime's own plan code. The result is checked against the torch ``Fused`` module at export.
    With a ControlNet (``specs["control"]``: the control image and scale inputs), each step runs a copy of
    its nodes first, wired to the UNet copy by the residuals' names."""
    import tempfile

    from onnx import helper

    from ..compose import Composer, load
    from ..onnx_export import export_component, save

    latent, k = specs["latent"], len(plan)
    noisy = [i for i in range(k) if plan.needs_noise(i)]
    rng = np.random.default_rng(0)
    sample = {
        name: rng.standard_normal((2, *latent.shape[1:]), dtype=np.float32) for name in ("noise", "x", "out")
    }
    sample["image"] = rng.uniform(-1, 1, (2, *specs["image"].shape[1:])).astype(np.float32)
    spec = lambda name, like: TensorSpec(name, like.dtype, like.shape)  # noqa: E731

    def glue(scratch, name, fn, inputs, outputs):
        path = Path(scratch) / f"{name}.onnx"
        export_component(ComponentDef(name, _Fn(fn).eval(), inputs, outputs), sample, path)
        return load(path)

    c = Composer()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".glue-") as scratch, torch.no_grad():
        c.add(load(parts["text_encoder"]), "te/", {"input_ids": "input_ids", "text_states": "text_states"})
        unet, decoder = load(parts["unet"]), load(parts["vae_decoder"])
        control, residuals = specs.get("control", []), specs.get("residuals", [])
        controlnet = load(parts["controlnet"]) if control else None
        start = glue(
            scratch,
            "start",
            lambda n: (n * plan.init_sigma, plan.scale_input(0, n * plan.init_sigma)),
            [spec("noise", latent)],
            [spec("x", latent), spec("sample", latent)],
        )
        c.add(start, "start/", {"noise": "noise", "x": "x_0", "sample": "sample_0"})
        batch = c.node(
            "Slice",
            [
                c.node("Shape", ["noise"], "fused/shape"),
                c.constant("fused/zero", np.array([0])),
                c.constant("fused/one", np.array([1])),
            ],
            "fused/batch",
        )
        for i, t in enumerate(plan.timesteps):
            timestep = c.node(
                "Expand", [c.constant(f"fused/t{i}", np.array([t], np.float32)), batch], f"timestep_{i}"
            )
            step_residuals = {r: f"cn{i}/{r}" for r in residuals}
            if controlnet is not None:
                c.add(
                    controlnet,
                    f"cn{i}/",
                    {
                        "sample": f"sample_{i}",
                        "timestep": timestep,
                        "text_states": "text_states",
                        "controlnet_cond": "control_image",
                        "conditioning_scale": "conditioning_scale",
                        **step_residuals,
                    },
                    weights="controlnet/",
                )
            c.add(
                unet,
                f"unet{i}/",
                {
                    "sample": f"sample_{i}",
                    "timestep": timestep,
                    "text_states": "text_states",
                    "timestep_cond": "timestep_cond",
                    "image_embeds": "image_embeds",
                    "ip_adapter_scale": "ip_adapter_scale",
                    "model_output": f"out_{i}",
                    **step_residuals,
                },
                weights="unet/",
            )
            last = i == k - 1
            ins = [spec("x", latent), spec("out", latent)] + ([spec("noise", latent)] if i in noisy else [])
            outs = [spec("x_next", latent)] + ([] if last else [spec("sample_next", latent)])

            def fn(x, o, n=None, i=i, last=last):
                nxt = plan.step(i, x, o, n)
                return nxt if last else (nxt, plan.scale_input(i + 1, nxt))

            wires = {
                "x": f"x_{i}",
                "out": f"out_{i}",
                "noise": f"noise_{i + 1}",
                "x_next": f"x_{i + 1}",
                "sample_next": f"sample_{i + 1}",
            }
            c.add(glue(scratch, f"step{i}", fn, ins, outs), f"step{i}/", wires)
        c.add(decoder, "dec/", {"latents": f"x_{k}", "image": "image"})
        c.add(
            glue(scratch, "pixels", to_pixels, [specs["image"]], [specs["pixels"]]),
            "px/",
            {"image": "image", "pixels": "pixels"},
        )
    info = lambda t: helper.make_tensor_value_info(t.name, _ONNX_TYPES[t.dtype], list(t.shape))  # noqa: E731
    inputs = [
        specs["ids"],
        TensorSpec("noise", "float32", latent.shape),
        *[TensorSpec(f"noise_{i + 1}", "float32", latent.shape) for i in noisy],
        *([specs["cond"]] if time_cond else []),
        *specs.get("ip", []),
        *control,
    ]
    save(c.model([info(t) for t in inputs], [info(specs["pixels"]), info(specs["states"])]), out)


# The model_index.json components export reads, and the classes it can load for each (None: any class; the
# tokenizer is checked for a fast one and the scheduler is re-implemented by name in the runtime).
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
SUPPORTED_COMPONENTS = {
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": None,
    "unet": ("UNet2DConditionModel",),
    "vae": VAE_CLASSES,
    "scheduler": None,
    "controlnet": ("ControlNetModel",),
}
# The residuals a ControlNet hands the UNet (graph values named as the UNet's keyword arguments)
DOWN_RESIDUAL = "down_block_additional_residuals_{}"
MID_RESIDUAL = "mid_block_additional_residual"


def _check_components(root: Path, index: dict) -> None:
    """Refuse a pipeline with a component export would drop (an image encoder, a safety checker...) or
    could not load (e.g. an AutoencoderKLTemporalDecoder, a MultiControlNetModel): without it a bundle
    computes something else. (An IP-Adapter's image encoder comes with ``ip_adapter=DIR`` instead.)"""
    for part, entry in index.items():
        if part.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue  # a pipeline setting (requires_safety_checker) or a component saved as None
        cls = entry[1]
        if part not in SUPPORTED_COMPONENTS:
            raise CheckpointError(
                f"diffusion checkpoint {root}",
                f"has a {part} component ({cls}), which export does not support yet",
                f"export it without that component: save the pipeline with {part}=None, "
                f"or remove the {part!r} entry from model_index.json",
            )
        classes = SUPPORTED_COMPONENTS[part]
        if classes is not None and cls not in classes:
            raise CheckpointError(
                f"diffusion checkpoint {root}",
                f"its {part} is a {cls}, which export does not support yet",
                f"use a pipeline whose {part} is a {' or '.join(classes)}",
            )


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _check_weights(path: Path, what: str) -> None:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CheckpointError(
            f"diffusion checkpoint {path.parent}",
            f"no {path.name}/config.json",
            f"a diffusers pipeline directory holds {what} in {path.name}/",
        )
    if not list(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir())
        raise CheckpointError(
            f"{what} {path}",
            f"no .safetensors weights (found {found})",
            "edgegen loads safetensors only, never pickles: save the pipeline with "
            "save_pretrained(dir, safe_serialization=True)",
        )


def _saved_class(path: Path, key: str = "_class_name"):
    """The class a save_pretrained directory holds: its config.json's ``key`` (diffusers: ``_class_name``;
    transformers: ``architectures``, a list); None where there is no readable config.json with it."""
    try:
        return json.loads((path / "config.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def vae_class(path: Path, subject: str) -> str:
    """The diffusers class a saved autoencoder directory holds (its config.json ``_class_name``), refused
    unless export supports it and the weights are safetensors."""
    name = _saved_class(path)
    if name not in VAE_CLASSES:
        found = (
            f"a {name}"
            if isinstance(name, str)
            else "no diffusers autoencoder (no readable config.json with _class_name)"
        )
        raise CheckpointError(
            subject,
            f"holds {found}",
            f"pass a directory written by {' or '.join(VAE_CLASSES)}.save_pretrained(dir)",
        )
    _check_weights(path, "the VAE")
    return name


def load_controlnet(root: Path, index: dict, path: str | Path | None, unet, vae_factor: int):
    """The pipeline's ControlNetModel, or the one saved at ``path`` (``--controlnet``, in place of the
    pipeline's own); None when there is neither. Refused unless this UNet can take its residuals and the
    runtime can run it as diffusers' StableDiffusionControlNetPipeline does."""
    import diffusers

    own = isinstance(index.get("controlnet"), list) and index["controlnet"][-1] is not None
    if path is None and not own:
        return None
    folder = root / "controlnet" if path is None else Path(path)
    subject = f"diffusion checkpoint {root}" if path is None else f"--controlnet {folder}"
    name = _saved_class(folder)
    if name != "ControlNetModel":
        raise CheckpointError(
            subject,
            f"{folder} holds {f'a {name}' if isinstance(name, str) else 'no diffusers ControlNet'}",
            "pass a directory written by ControlNetModel.save_pretrained(dir) (one ControlNet, SD 1.x/2.x)",
        )
    _check_weights(folder, "the ControlNet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = diffusers.ControlNetModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=True
        ).eval()
    cc, uc = model.config, unet.config
    if cc.global_pool_conditions or cc.conditioning_channels != 3:
        raise CheckpointError(
            subject,
            "a ControlNet with global_pool_conditions or a non-RGB condition is not supported",
            "use a ControlNet conditioned on RGB images (edges, depth, pose...)",
        )
    shared = (
        "in_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "cross_attention_dim",
    )
    differ = [k for k in shared if list(np.atleast_1d(cc[k])) != list(np.atleast_1d(uc[k]))]
    if 2 ** (len(cc.conditioning_embedding_out_channels) - 1) != vae_factor:
        differ.append(f"control image downscaling (VAE: {vae_factor}x)")
    if differ:
        raise CheckpointError(
            subject,
            f"the ControlNet does not fit this UNet and VAE (its {', '.join(differ)} differ)",
            "use a ControlNet trained for this base model",
        )
    return model


IP_ADAPTER_WEIGHTS = "ip-adapter.safetensors"


def load_ip_adapter(path: str | Path | None, unet):
    """The CLIPVisionModelWithProjection of the IP-Adapter directory ``path`` (diffusers' load_ip_adapter
    layout: ``image_encoder/`` and ``ip-adapter.safetensors``), its projection and attention weights loaded
    into ``unet`` as diffusers loads them; None without ``path``. Only the plain IP-Adapter (an
    ImageProjection of the image embedding) is supported: Plus/FaceID variants read other encoder outputs."""
    if path is None:
        return None
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    subject = f"--ip-adapter {folder}"
    encoder = folder / "image_encoder"
    architectures = _saved_class(encoder, "architectures") or []
    if "CLIPVisionModelWithProjection" not in architectures or not (folder / IP_ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(
            subject,
            f"no image_encoder/ (CLIPVisionModelWithProjection) with {IP_ADAPTER_WEIGHTS} beside it",
            "pass a directory in diffusers' load_ip_adapter layout (safetensors)",
        )
    _check_weights(encoder, "the image encoder")
    try:
        flat = load_file(folder / IP_ADAPTER_WEIGHTS)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(
            subject, f"{IP_ADAPTER_WEIGHTS} unreadable: {e}", "re-save the adapter"
        ) from None
    state = {
        part: {k[len(part) + 1 :]: v for k, v in flat.items() if k.startswith(part + ".")}
        for part in ("image_proj", "ip_adapter")
    }
    if "proj.weight" not in state["image_proj"] or not state["ip_adapter"]:
        raise CheckpointError(
            subject,
            "not a plain IP-Adapter (no image_proj.proj.weight or no ip_adapter.* weights)",
            "export supports the IP-Adapter whose image projection reads the image embedding",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            unet._load_ip_adapter_weights([state])  # diffusers' own conversion: processors and projection
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(
                subject, f"does not fit this UNet: {e}", "use an adapter for this model"
            ) from None
        model = transformers.CLIPVisionModelWithProjection.from_pretrained(
            encoder, local_files_only=True, use_safetensors=True, attn_implementation="eager"
        ).eval()
    unet.eval()
    return model


class DiffusionFamily(Family):
    name = "diffusion"
    options = (
        "image_size",
        "fused_steps",
        "num_steps",
        "guidance_scale",
        "vae",
        "controlnet",
        "ip_adapter",
        "loras",
    )

    @classmethod
    def matches(cls, checkpoint: Path) -> bool:
        return (checkpoint / "model_index.json").is_file()

    def __init__(
        self,
        checkpoint: Path,
        image_size: int | None = None,
        fused_steps=FUSED_STEPS,
        num_steps: int = 1,
        guidance_scale: float | None = None,
        vae: str | Path | None = None,
        controlnet: str | Path | None = None,
        ip_adapter: str | Path | None = None,
        loras=(),
    ):
        try:
            import diffusers
        except ImportError:
            raise BadInputError(
                f"diffusion checkpoint {checkpoint}",
                "exporting it needs diffusers, which is not installed",
                "pip install 'edgegen[export]'",
            ) from None
        import transformers

        self.checkpoint = root = Path(checkpoint)
        try:
            index = json.loads((root / "model_index.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"diffusion checkpoint {root}", f"model_index.json unreadable: {e}", "re-save the pipeline"
            ) from None
        if not isinstance(index, dict):
            raise CheckpointError(
                f"diffusion checkpoint {root}",
                "model_index.json is not a JSON object",
                "re-save the pipeline",
            )
        _check_components(root, index)
        for part, what in (("text_encoder", "the CLIP text encoder"), ("unet", "the UNet")):
            _check_weights(root / part, what)
        # --vae DIR: another saved autoencoder in place of the pipeline's own (e.g. a TAESD beside SD-Turbo)
        vae_dir = root / "vae" if vae is None else Path(vae)
        subject = f"diffusion checkpoint {root}" if vae is None else f"--vae {vae_dir}"
        self.vae_class = vae_class(vae_dir, subject)
        if not (root / "tokenizer").is_dir() or not (root / "scheduler" / "scheduler_config.json").is_file():
            raise CheckpointError(
                f"diffusion checkpoint {root}",
                "no tokenizer/ or scheduler/scheduler_config.json",
                "export a full diffusers pipeline directory (save_pretrained)",
            )
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            te = transformers.CLIPTextModel.from_pretrained(
                root / "text_encoder",
                local_files_only=True,
                use_safetensors=True,
                attn_implementation="eager",
            ).eval()
            self.hf_tokenizer = transformers.AutoTokenizer.from_pretrained(
                root / "tokenizer", local_files_only=True
            )
            self.unet = diffusers.UNet2DConditionModel.from_pretrained(
                root / "unet", local_files_only=True, use_safetensors=True
            ).eval()
            self.vae = (
                getattr(diffusers, self.vae_class)
                .from_pretrained(vae_dir, local_files_only=True, use_safetensors=True)
                .eval()
            )
        self.text_encoder = TextEncoder(te).eval()
        # LoRAs fused before anything is traced: parity and gates measure the fused model
        self.loras_fused = fuse_loras(loras, self.lora_parts()) if loras else []
        if not getattr(self.hf_tokenizer, "is_fast", True) or not hasattr(
            self.hf_tokenizer, "backend_tokenizer"
        ):
            raise CheckpointError(
                f"tokenizer {root / 'tokenizer'}",
                "has no fast tokenizer",
                "the runtime tokenizes with the `tokenizers` library; save a fast tokenizer",
            )
        self.scheduler_config = {
            k: v
            for k, v in json.loads((root / "scheduler" / "scheduler_config.json").read_text()).items()
            if not k.startswith("_")
        }
        source = json.loads((root / "scheduler" / "scheduler_config.json").read_text()).get("_class_name", "")
        self.scheduler_source = source or index.get("scheduler", [None, ""])[1]
        self.scheduler_name = DIFFUSERS_NAMES.get(self.scheduler_source, "euler")
        self.scheduler = make_scheduler(self.scheduler_name, self.scheduler_config)
        uc = self.unet.config
        self.time_cond_dim = uc.time_cond_proj_dim
        if int(self.vae.config.latent_channels) != int(uc.in_channels):
            raise CheckpointError(
                f"diffusion checkpoint {root}",
                f"VAE latent channels {self.vae.config.latent_channels} != UNet in_channels {uc.in_channels}",
                "use a VAE made for this UNet (TAESD for SD 1.x/2.x, TAESDXL for SDXL)",
            )
        if te.config.hidden_size != uc.cross_attention_dim:
            raise CheckpointError(
                f"diffusion checkpoint {root}",
                f"text encoder width {te.config.hidden_size} != "
                f"UNet cross_attention_dim {uc.cross_attention_dim}",
                "the parts come from different models",
            )
        self.max_length = int(min(self.hf_tokenizer.model_max_length, te.config.max_position_embeddings))
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = image_size or int(uc.sample_size) * self.vae_factor
        if not isinstance(size, int) or size < 8 * self.vae_factor or size % (8 * self.vae_factor):
            raise BadInputError(
                "--image-size",
                f"{size} does not suit this model",
                f"use a multiple of {8 * self.vae_factor} (the UNet downsamples the latents 8x)",
            )
        self.image_size = size
        self.latent_shape = (int(uc.in_channels), size // self.vae_factor, size // self.vae_factor)
        bad = [k for k in fused_steps if not isinstance(k, int) or not 1 <= k <= 4]
        if bad or not fused_steps:
            raise BadInputError(
                "fused_steps",
                f"{list(fused_steps)} is not a non-empty list of step counts 1..4",
                "fused graphs unroll at most 4 steps; more run in the per-step loop",
            )
        self.fused_steps = sorted(set(fused_steps))
        self.num_steps = int(num_steps)
        self.guidance_scale = float(
            guidance_scale
            if guidance_scale is not None
            else LCM_DEFAULT_GUIDANCE
            if self.time_cond_dim
            else 0.0
        )
        # --ip-adapter DIR: its image encoder, and its attention loaded into the UNet
        clip_vision = load_ip_adapter(ip_adapter, self.unet)
        self.image_encoder = ImageEncoder(clip_vision).eval() if clip_vision is not None else None
        self.denoiser = Denoiser(self.unet, bool(self.time_cond_dim), self.image_encoder is not None).eval()
        # --controlnet DIR: a saved ControlNetModel added to (or in place of) the pipeline's own
        self.controlnet = load_controlnet(root, index, controlnet, self.unet, self.vae_factor)
        self.control = Control(self.controlnet).eval() if self.controlnet is not None else None
        self.decoder = Decoder(self.vae).eval()
        self.encoder = (TinyEncoder if self.vae_class == "AutoencoderTiny" else Encoder)(self.vae).eval()
        self.encoder_noise = self.vae_class == "AutoencoderKL"  # only its latents are a sampled distribution

    def lora_parts(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder.model}

    # --- precisions and gates ---
    precisions = ("fp32", "fp16")

    def tracing(self):
        """Equivalent, faster layers in the traced graphs (parity is still measured against diffusers'
        own)."""
        return upsamplers_as_subpixel(self.unet, self.vae)

    def check_precisions(self, precisions: list[str]) -> None:
        if "int8" in precisions:
            raise BadInputError(
                "--precision int8",
                "int8 is not supported for the diffusion family",
                "export fp32 and fp16 (e.g. --precision fp32,fp16)",
            )

    # --- what goes in the manifest ---
    def tokenizer_json(self) -> str:
        return self.hf_tokenizer.backend_tokenizer.to_str()

    def tokenizer_settings(self) -> dict:
        return tokenizer_settings(self.hf_tokenizer, self.max_length)

    def generation(self, max_batch: int) -> dict:
        return {
            "image_size": self.image_size,
            "latent_shape": list(self.latent_shape),
            "max_batch": max_batch,
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": {
                "name": self.scheduler_name,
                "source": self.scheduler_source,
                "config": self.scheduler_config,
            },
            "fused": {str(k): fused_name(k) for k in self.fused_steps},
            "time_cond_dim": self.time_cond_dim,
            "vae": self.vae_class,
            **({"controlnet": self._controlnet_settings()} if self.control is not None else {}),
            **({"ip_adapter": self._ip_adapter_settings()} if self.image_encoder is not None else {}),
            "noise": "per image: numpy default_rng(seed).standard_normal(float32) draws, in order: "
            "the initial noise (latent_shape), the VAE encoder's sample noise (image-to-image, "
            "AutoencoderKL only), then one per step that adds noise",
        }

    def _controlnet_settings(self) -> dict:
        """What the runtime needs to run the ControlNet component: its inputs as diffusers prepares them."""
        return {
            "class": "ControlNetModel",
            "control_image": "RGB resized to image_size (Lanczos), [0, 1], NCHW: diffusers' prepare_image",
            "conditioning_scale": 1.0,
            "residuals": [t.name for t in self.residual_specs],
        }

    def _ip_adapter_settings(self) -> dict:
        """How the runtime prepares the reference image: CLIPImageProcessor at the encoder's size, as
        diffusers' load_ip_adapter builds it (shortest edge resized bicubic, centre crop, CLIP mean/std).
        The resampling is not recorded: the runtime's clip_pixels always resizes bicubic."""
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        return {
            "image_size": int(self.image_encoder.model.config.image_size),
            "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD),
            "scale": 1.0,
        }

    def describe(self) -> dict:
        import diffusers

        te = self.text_encoder.model.config
        conditioning = {} if self.controlnet is None else {"controlnet": _public(self.controlnet.config)}
        if self.image_encoder is not None:
            conditioning["image_encoder"] = {
                "kind": "clip_vision",
                **self.image_encoder.model.config.to_diff_dict(),
            }
        return {
            "text_encoder": {"kind": "clip", "hidden_size": te.hidden_size, "layers": te.num_hidden_layers},
            "unet": {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")},
            "vae": {
                "class": self.vae_class,
                **{k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")},
            },
            **conditioning,
            "diffusers": diffusers.__version__,
        }

    def reference_outputs(self) -> dict[str, OutputRef]:
        # a default call (num_steps, no guidance) runs the fused graph of that many steps, where there is one
        text = fused_name(1) if 1 in self.fused_steps else "text_encoder"
        named = {"text_states": OutputRef(text, "text_states")}
        if self.num_steps in self.fused_steps:
            named["pixels"] = OutputRef(fused_name(self.num_steps), "pixels")
        return named

    def validation_prompts(self) -> list[str]:
        return [p for group in VALIDATION_PROMPTS for p in group]

    # --- what gets traced ---
    def _plan(self, steps: int):
        return self.scheduler.plan(steps)

    @functools.cached_property
    @torch.no_grad()
    def residual_specs(self) -> list[TensorSpec]:
        """The ControlNet's outputs, the UNet's extra inputs: shapes from one run at the image size."""
        if self.control is None:
            return []
        S, (c, h, w) = self.image_size, self.latent_shape
        outs = self.control(
            torch.zeros(1, c, h, w),
            torch.ones(1),
            torch.zeros(1, self.max_length, self.unet.config.cross_attention_dim),
            torch.zeros(1, 3, S, S),
            torch.ones(1),
        )
        names = [DOWN_RESIDUAL.format(i) for i in range(len(outs) - 1)] + [MID_RESIDUAL]
        return [TensorSpec(n, "float32", ("batch", *o.shape[1:])) for n, o in zip(names, outs)]

    def components(self) -> list[ComponentDef]:
        L, D = self.max_length, self.text_encoder.model.config.hidden_size
        c, h, w = self.latent_shape
        S = self.image_size
        ids = TensorSpec("input_ids", "int64", ("batch", L))
        states = TensorSpec("text_states", "float32", ("batch", L, D))
        latent = lambda name: TensorSpec(name, "float32", ("batch", c, h, w))  # noqa: E731
        image = TensorSpec("image", "float32", ("batch", 3, S, S))
        pixels = TensorSpec("pixels", "uint8", ("batch", S, S, 3))
        cond = (
            [TensorSpec("timestep_cond", "float32", ("batch", self.time_cond_dim))]
            if self.time_cond_dim
            else []
        )
        timestep = TensorSpec("timestep", "float32", ("batch",))
        residuals = self.residual_specs
        # the control image and scale: named as ControlNetModel's arguments, as the pipeline's in fused graphs
        scale = TensorSpec("conditioning_scale", "float32", (1,))
        control = [TensorSpec("control_image", "float32", ("batch", 3, S, S)), scale] if residuals else []
        comps = [ComponentDef("text_encoder", self.text_encoder, [ids], [states], {"text_states": 1e-3})]
        ip = []
        if self.image_encoder is not None:
            comps.append(image_encoder_component(self.image_encoder))
            ip = [*comps[-1].outputs, TensorSpec("ip_adapter_scale", "float32", (1,))]  # the UNet's inputs
        if residuals:
            cn_inputs = [
                latent("sample"),
                timestep,
                states,
                TensorSpec("controlnet_cond", "float32", control[0].shape),
                scale,
            ]
            comps.append(
                ComponentDef(
                    "controlnet", self.control, cn_inputs, residuals, {r.name: 1e-3 for r in residuals}
                )
            )
        comps += [
            ComponentDef(
                "unet",
                self.denoiser,
                [latent("sample"), timestep, states, *cond, *ip, *residuals],
                [latent("model_output")],
                {"model_output": 1e-3},
            ),
            ComponentDef("vae_decoder", self.decoder, [latent("latents")], [image], {"image": 1e-3}),
            ComponentDef(
                "vae_encoder",
                self.encoder,
                [image, *([latent("encoder_noise")] if self.encoder_noise else [])],
                [latent("latents")],
                {"latents": 1e-3},
            ),
        ]
        for k in self.fused_steps:
            plan = self._plan(k)
            noisy = [latent(f"noise_{i + 1}") for i in range(len(plan)) if plan.needs_noise(i)]
            specs = {
                "ids": ids,
                "latent": latent("latent"),
                "image": image,
                "pixels": pixels,
                "states": states,
                "cond": cond[0] if cond else None,
                "control": control,
                "residuals": [r.name for r in residuals],
                "ip": ip,
            }
            build = lambda parts, out, plan=plan, specs=specs: assemble_fused(  # noqa: E731
                parts, out, plan, specs, bool(self.time_cond_dim)
            )
            comps.append(
                ComponentDef(
                    fused_name(k),
                    Fused(
                        self.text_encoder,
                        self.denoiser,
                        self.decoder,
                        plan,
                        bool(self.time_cond_dim),
                        self.control,
                    ).eval(),
                    [ids, latent("noise"), *noisy, *cond, *ip, *control],
                    [pixels, states],
                    {"pixels": 2.0, "text_states": 1e-3},
                    assemble=build,
                )
            )
        return comps

    def _control_case(self, index: int, batch: int) -> dict[str, np.ndarray]:
        """A ControlNet's inputs for a reference case: a control image with edges and flat areas, scale 1."""
        if self.control is None:
            return {}
        S = self.image_size
        image = np.random.default_rng(index).random((batch, 3, S, S), dtype=np.float32)
        image[:, :, : S // 2] = image[:, :, : S // 2] > 0.5  # half binary, like an edge map
        return {"controlnet_cond": image, "conditioning_scale": np.ones(1, np.float32)}

    def _ip_adapter_case(self, index: int, batch: int) -> dict[str, np.ndarray]:
        """An IP-Adapter's inputs for a reference case: random CLIP pixels, their embedding, scale 1."""
        if self.image_encoder is None:
            return {}
        n = self.image_encoder.model.config.image_size
        pixels = np.random.default_rng(100 + index).standard_normal((batch, 3, n, n), dtype=np.float32)
        embeds = self.image_encoder(torch.from_numpy(pixels)).numpy()
        return {"pixel_values": pixels, "image_embeds": embeds, "ip_adapter_scale": np.ones(1, np.float32)}

    @torch.no_grad()
    def reference_cases(self, tokenize, groups=VALIDATION_PROMPTS, seeds_per_group=VALIDATION_SEEDS):
        """Per case: every component's inputs, chained through PyTorch the way a call would run them."""
        cases = []
        plan = self._plan(self.num_steps)
        for prompts, seeds in zip(groups, seeds_per_group):
            tokens = tokenize(prompts)
            streams = NoiseStreams(seeds)
            noise = streams.draw(self.latent_shape)
            step_noise = {
                f"noise_{i}": streams.draw(self.latent_shape) for i in range(1, max(self.fused_steps))
            }
            encoder_noise = streams.draw(self.latent_shape)
            ids = torch.from_numpy(tokens.input_ids)
            states = self.text_encoder(ids)
            x = torch.from_numpy(noise) * plan.init_sigma
            sample = plan.scale_input(0, x)
            timestep = np.full(len(prompts), plan.timesteps[0], np.float32)
            cond = {}
            if self.time_cond_dim:
                cond["timestep_cond"] = guidance_embedding(
                    np.full(len(prompts), self.guidance_scale - 1, np.float32), self.time_cond_dim
                )
            control = self._control_case(len(cases), len(prompts))
            residuals = (
                self.control(
                    sample, torch.from_numpy(timestep), states, *map(torch.from_numpy, control.values())
                )
                if control
                else ()
            )
            ip = self._ip_adapter_case(len(cases), len(prompts))
            out = self.denoiser(
                sample,
                torch.from_numpy(timestep),
                states,
                *([torch.from_numpy(cond["timestep_cond"])] if cond else []),
                *(torch.from_numpy(ip[k]) for k in ("image_embeds", "ip_adapter_scale") if k in ip),
                *residuals,
            )
            latents = plan.step(
                0, x, out, torch.from_numpy(step_noise["noise_1"]) if plan.needs_noise(0) else None
            )
            image = self.decoder(latents)
            cases.append(
                (
                    {
                        "input_ids": tokens.input_ids,
                        "attention_mask": tokens.attention_mask,
                        "noise": noise,
                        **step_noise,
                        **cond,
                        "text_states": states.numpy(),
                        "sample": sample.numpy(),
                        "timestep": timestep,
                        "latents": latents.numpy(),
                        "image": image.numpy(),
                        "encoder_noise": encoder_noise,
                        **control,
                        **ip,
                        **({"control_image": control["controlnet_cond"]} if control else {}),
                        **{r.name: v.numpy() for r, v in zip(self.residual_specs, residuals)},
                    },
                    {"prompts": np.array(prompts), "seeds": np.array(seeds, dtype=np.uint64)},
                )
            )
        return cases

"""Tiny random-weight checkpoints built in code: for tests and for checking an install (offline)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .generator import ConditionalGenerator, GeneratorConfig

TEXT_ENCODERS = ("bert", "clip", "t5", "gpt2")

_WORDS = (
    "a an the of on in with and very small large big tiny red green blue yellow orange purple pink "
    "black white gray grey brown dark light background rocket cat dog apple star moon sun tree house car "
    "flower heart face smiling happy sad centered word emoji picture photo drawing"
).split()


def _tokenizer(kind: str):
    """A word-level fast tokenizer with each family's special tokens and post-processing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {
        "bert": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"},
        "clip": {
            "pad_token": "<|endoftext|>",
            "unk_token": "<|unk|>",
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
        },
        "t5": {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "</s>"},
        "gpt2": {"unk_token": "<|unk|>", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
    }[kind]
    vocab = {}
    for token in list(dict.fromkeys(specials.values())) + list(_WORDS) + list(",.!?-'"):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    template = {
        "bert": ("[CLS]", "$A", "[SEP]"),
        "clip": ("<|startoftext|>", "$A", "<|endoftext|>"),
        "t5": ("$A", "</s>"),
        "gpt2": ("$A",),
    }[kind]
    special_ids = [(t, vocab[t]) for t in template if t != "$A"]
    tok.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=special_ids)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials), len(vocab)


def _text_model(kind: str, vocab_size: int, width: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size)
    if kind == "bert":
        cfg = tf.BertConfig(
            hidden_size=width,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=2 * width,
            max_position_embeddings=64,
            **common,
        )
        return tf.BertModel(cfg)
    if kind == "clip":
        cfg = tf.CLIPTextConfig(
            hidden_size=width,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=2 * width,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=0,
            **common,
        )
        return tf.CLIPTextModel(cfg)
    if kind == "t5":
        cfg = tf.T5Config(
            d_model=width,
            d_kv=width // 2,
            d_ff=2 * width,
            num_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
            **common,
        )
        return tf.T5EncoderModel(cfg)
    cfg = tf.GPT2Config(
        n_embd=width, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1, **common
    )
    return tf.GPT2Model(cfg)


def make_tiny_checkpoint(
    directory,
    text_encoder: str = "bert",
    seed: int = 0,
    image_size: int = 16,
    renderer: str = "conv",
    concept_heads: int = 0,
    known_subject: bool = False,
) -> Path:
    """Write a gan checkpoint (text_encoder/ + generator/) with random weights; returns its path.
    ``renderer="glyph"``: the concept-memory glyph renderer (5 subjects, 3 colours, 3 sizes) instead of
    convs, its memories reading the token states with ``concept_heads`` attention heads each, the subject
    memory with a known-subject head if ``known_subject``."""
    if text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got {text_encoder!r}")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    root = Path(directory)
    torch.manual_seed(seed)
    tokenizer, vocab_size = _tokenizer(text_encoder)
    width = 32
    model = _text_model(text_encoder, vocab_size, width).eval()
    model.save_pretrained(root / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(root / "text_encoder")
    if renderer == "glyph":
        config = GeneratorConfig(
            image_size=image_size,
            noise_dim=16,
            text_dim=width,
            channels=[],
            max_length=16,
            concepts=[5, 3, 3],
            renderer="glyph",
            concept_heads=concept_heads,
            known_subject=known_subject,
            glyph_side=image_size // 2,
            glyph_boxes=[image_size // 2, image_size - 4],
            jitter=1,
        )
    else:
        ups = {16: [32, 16], 32: [32, 16, 16], 64: [32, 32, 16, 16]}[image_size]
        config = GeneratorConfig(
            image_size=image_size,
            noise_dim=16,
            text_dim=width,
            cond_dim=32,
            channels=ups,
            attention_resolutions=[8],
            attention_dim=16,
            max_length=16,
        )
    generator = ConditionalGenerator(config).eval()
    with torch.no_grad():  # spread the random outputs over the whole pixel range, so parity checks bite
        if renderer == "glyph":
            for memory in generator.memories:
                memory.values.uniform_(0.0, 1.0)
            generator.memories[0].values.view(5, 4, -1)[:, 3].uniform_(
                0.3, 1.0
            )  # alpha: mostly opaque glyphs
        else:
            generator.to_rgb[-1].weight.mul_(8.0)
    (root / "generator").mkdir(parents=True, exist_ok=True)
    config.save(root / "generator" / "config.json")
    save_file(generator.state_dict(), str(root / "generator" / "model.safetensors"))
    return root


# ---------------------------------------------------------------- diffusion (diffusers format)

DIFFUSERS_SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
    "ddim": "DDIMScheduler",
}
# SD-Turbo's published scheduler config (stabilityai/sd-turbo, scheduler/scheduler_config.json).
SD_TURBO_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _save_diffusion_pipeline(
    root: Path, text_encoder, tokenizer, unet, vae, scheduler: str, controlnet=None
) -> Path:
    import diffusers

    sched = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler]).from_config(SD_TURBO_SCHEDULER)
    cls, extra = diffusers.StableDiffusionPipeline, {}
    if controlnet is not None:
        cls, extra = diffusers.StableDiffusionControlNetPipeline, {"controlnet": controlnet}
    pipe = cls(
        **extra,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    return root


VAES = ("kl", "tiny")


def make_tiny_diffusion_checkpoint(
    directory,
    seed: int = 0,
    image_size: int = 32,
    scheduler: str = "euler",
    time_cond_proj_dim: int | None = None,
    vae: str = "kl",
    controlnet: bool = False,
) -> Path:
    """Write a tiny random-weight diffusers pipeline directory (CLIP text encoder, UNet2DConditionModel,
    a VAE with a 2x latent scale, SD-Turbo's scheduler config); returns its path. Seconds, offline.

    ``time_cond_proj_dim`` gives the UNet an LCM-style guidance-embedding input. ``vae``: ``kl``
    (AutoencoderKL) or ``tiny`` (AutoencoderTiny, TAESD's architecture with small channels).
    ``controlnet``: a StableDiffusionControlNetPipeline with a tiny ControlNetModel (``tiny_controlnet``)."""
    if vae not in VAES:
        raise ValueError(f"vae must be one of {VAES}, got {vae!r}")
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    root = Path(directory)
    torch.manual_seed(seed)
    tokenizer, vocab_size = _tokenizer("clip")
    tokenizer.model_max_length = 16
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=0,
            hidden_act="gelu",
        )
    ).eval()
    latent = image_size // 2
    unet = diffusers.UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        use_linear_projection=True,
        time_cond_proj_dim=time_cond_proj_dim,
    ).eval()
    control = tiny_controlnet(unet) if controlnet else None
    if vae == "tiny":
        vae = _tiny_autoencoder_tiny()
        return _save_diffusion_pipeline(root, text_encoder, tokenizer, unet, vae, scheduler, control)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=0.18215,
    ).eval()
    with (
        torch.no_grad()
    ):  # magnitudes of a trained model, so every part of the arithmetic shows in the pixels:
        unet.conv_out.weight.mul_(3.0)  # noise predictions of unit variance (random init gives ~0.33)
        vae.quant_conv.weight[:4].mul_(25.0)  # image latents of unit variance once scaled by 0.18215
        vae.quant_conv.bias[:4].mul_(25.0)
        vae.quant_conv.weight[4:].mul_(0.1)  # a narrow latent distribution (log-variance about -6)
        vae.quant_conv.bias[4:].fill_(-6.0)
        vae.decoder.conv_out.weight.mul_(2.0)  # images over the pixel range, neither grey nor saturated
        vae.decoder.conv_out.bias.uniform_(-0.3, 0.3)
    return _save_diffusion_pipeline(root, text_encoder, tokenizer, unet, vae, scheduler, control)


def tiny_controlnet(unet, latent_factor: int = 2):
    """A ControlNetModel for ``unet`` (its weights copied, as ControlNetModel.from_unet starts training) whose
    zero-initialised convolutions (the residual projections and the condition embedding's last layer) get
    random weights, so the control image changes the result as a trained ControlNet's does. Its condition
    embedding downscales the control image ``latent_factor`` times (the VAE's factor)."""
    import diffusers

    channels = tuple(8 * 2**i for i in range(latent_factor.bit_length()))  # one 2x downscale per extra entry
    controlnet = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=channels
    ).eval()
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    embedding = controlnet.controlnet_cond_embedding.conv_out
    with torch.no_grad():
        # gains: residuals about half the size of the UNet's own features; a condition embedding as large as
        # the latents' (its earlier layers' default init leaves it small), as a trained ControlNet's is
        for conv, gain in [*((c, 0.5) for c in zero_convs), (embedding, 20.0)]:
            torch.nn.init.normal_(conv.weight, std=gain / conv.weight[0].numel() ** 0.5)
            torch.nn.init.uniform_(conv.bias, -0.1, 0.1)
    return controlnet


def _tiny_autoencoder_tiny():
    """AutoencoderTiny with two 16-channel blocks each way (a 2x latent scale, like the tiny KL VAE)."""
    import diffusers

    vae = diffusers.AutoencoderTiny(
        encoder_block_out_channels=(16, 16),
        decoder_block_out_channels=(16, 16),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).eval()
    # as the KL VAE's: images over the pixel range (the decoder's output is in [0, 1] before its 2x - 1),
    # neither grey nor saturated, and image latents of about unit variance
    with torch.no_grad():
        vae.decoder.layers[-1].bias.uniform_(0.2, 0.4)
        vae.encoder.layers[-1].weight.mul_(20.0)
        vae.encoder.layers[-1].bias.zero_()
    return vae


# SD-Turbo's published architecture (stabilityai/sd-turbo: the SD 2.1 base UNet, the SD VAE and the
# OpenCLIP ViT-H text tower without its last layer), written out so no download is ever needed.
SD_TURBO_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
SD_TURBO_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=(5, 10, 20, 20),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    upcast_attention=False,
)
SD_TURBO_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=768,
    scaling_factor=0.18215,
)


def make_sd_turbo_checkpoint(directory, seed: int = 0) -> Path:
    """Write a diffusers pipeline directory with SD-Turbo's full-size architecture and random weights
    (about 5 GB): latency does not depend on the weights' values. The tokenizer is edgegen's small
    word-level stand-in padded to CLIP's 77 tokens (its ids fit the 49408-entry embedding)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    root = Path(directory)
    torch.manual_seed(seed)
    tokenizer, _ = _tokenizer("clip")
    tokenizer.model_max_length = 77
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD_TURBO_TEXT_ENCODER)).eval()
    unet = diffusers.UNet2DConditionModel(**SD_TURBO_UNET).eval()
    vae = diffusers.AutoencoderKL(**SD_TURBO_VAE).eval()
    return _save_diffusion_pipeline(root, text_encoder, tokenizer, unet, vae, "euler")


def make_sd_turbo_controlnet(directory, seed: int = 0) -> Path:
    """Write a ControlNetModel directory for SD-Turbo's UNet (as ControlNetModel.from_unet builds one: the
    SD 2.1 ControlNets' architecture) with random weights, for ``export --controlnet``; returns its path."""
    import diffusers

    root = Path(directory)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**SD_TURBO_UNET)
    controlnet = diffusers.ControlNetModel.from_unet(unet, load_weights_from_unet=False).eval()
    controlnet.save_pretrained(root, safe_serialization=True)
    return root


def make_taesd_autoencoder(directory, seed: int = 0) -> Path:
    """Write an AutoencoderTiny directory with TAESD's published architecture (diffusers' AutoencoderTiny
    defaults, as madebyollin/taesd's config) and random weights, for ``export --vae``; returns its path."""
    import diffusers

    root = Path(directory)
    torch.manual_seed(seed)
    diffusers.AutoencoderTiny().eval().save_pretrained(root, safe_serialization=True)
    return root


LORA_NAMINGS = ("peft", "kohya")
LORA_TARGETS = {  # module-name endings a tiny LoRA adapts in each part: attention projections and a conv
    "unet": ("to_q", "to_k", "to_v", "to_out.0", "conv1"),
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
}


def make_random_lora(
    path, checkpoint, seed: int = 0, rank: int = 4, alpha: float = 8.0, naming: str = "peft", strength=0.5
) -> Path:
    """Write a random LoRA for a diffusers pipeline directory's UNet and text encoder (``LORA_TARGETS``) in
    ``naming``: ``peft`` (diffusers' save_lora_weights layout: lora_A/lora_B, alpha in the adapter metadata)
    or ``kohya`` (lora_down/lora_up with per-module alphas). Each delta's scale is ``strength`` times the
    weight's own, so the LoRA visibly changes images without saturating them. Returns ``path``."""
    import json

    import diffusers
    import numpy as np
    import transformers
    from safetensors.numpy import save_file as save_numpy

    if naming not in LORA_NAMINGS:
        raise ValueError(f"naming must be one of {LORA_NAMINGS}, got {naming!r}")
    root = Path(checkpoint)
    parts = {
        "unet": diffusers.UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True),
        "text_encoder": transformers.CLIPTextModel.from_pretrained(
            root / "text_encoder", local_files_only=True
        ),
    }
    rng = np.random.default_rng(seed)
    tensors, targeted = {}, {part: [] for part in parts}
    for part, model in parts.items():
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(
                LORA_TARGETS[part]
            ):
                continue
            w = module.weight.detach().numpy()
            down = rng.standard_normal((rank, *w.shape[1:]), dtype=np.float32)
            up = rng.standard_normal((w.shape[0], rank, *[1] * (w.ndim - 2)), dtype=np.float32)
            delta = up.reshape(w.shape[0], rank) @ down.reshape(rank, -1) * alpha / rank
            up *= strength * w.std() / delta.std()
            targeted[part].append(name)
            if naming == "peft":
                stem = f"{part}.{name}"
                tensors |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}
            else:
                stem = f"lora_{'unet' if part == 'unet' else 'te'}_{name.replace('.', '_')}"
                tensors |= {
                    f"{stem}.lora_down.weight": down,
                    f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": np.array(alpha, np.float32),
                }
    metadata = {"format": "pt"}
    if naming == "peft":
        config = {  # what diffusers writes: the adapter's LoraConfig per part
            f"{part}.{k}": v
            for part in parts
            for k, v in (("r", rank), ("lora_alpha", alpha), ("target_modules", targeted[part]))
        }
        metadata["lora_adapter_metadata"] = json.dumps(config)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_numpy(tensors, str(path), metadata=metadata)
    return Path(path)


def make_tiny_ip_adapter(directory, checkpoint, seed: int = 0) -> Path:
    """Write a tiny random-weight IP-Adapter for the UNet of ``checkpoint`` in diffusers' load_ip_adapter
    layout: ``image_encoder/`` (a small CLIPVisionModelWithProjection) and ``ip-adapter.safetensors``
    (``image_proj.*``: the image embedding -> 4 tokens; ``ip_adapter.{k}.to_k_ip/to_v_ip``: one pair per
    cross-attention layer, numbered as diffusers numbers them: 1, 3, 5...); returns its path."""
    import diffusers
    import transformers

    root = Path(directory)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_pretrained(Path(checkpoint) / "unet", local_files_only=True)
    cross = unet.config.cross_attention_dim
    encoder = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=24,
        )
    ).eval()
    encoder.save_pretrained(root / "image_encoder", safe_serialization=True)
    tokens = 4
    weights = {
        "image_proj.proj.weight": torch.randn(tokens * cross, 24) / 24**0.5,
        "image_proj.proj.bias": torch.randn(tokens * cross) * 0.1,
        "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross),
        "image_proj.norm.bias": 0.1 * torch.randn(cross),
    }
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        width = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features  # the layer's width
        for part in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{key}.{part}.weight"] = torch.randn(width, cross) / cross**0.5
        key += 2
    save_file({k: v.contiguous() for k, v in weights.items()}, str(root / "ip-adapter.safetensors"))
    return root

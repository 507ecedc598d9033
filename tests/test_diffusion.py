"""Diffusion family: the runtime (numpy schedulers + ONNX graphs) against diffusers' own pipelines.

Same prompt, same explicit initial latents, same step count: the runtime's uint8 images must equal
diffusers' within 2 levels (fp32). Noise drawn inside diffusers (ancestral/LCM steps, the VAE encoder's
sample, image-to-image's added noise) is replaced by the runtime's own draws for the same seeds.
"""

import importlib
import itertools
import json

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from edgegen.runtime import BadInputError, Pipeline  # noqa: E402
from edgegen.runtime.diffusion import NoiseStreams, fused_name  # noqa: E402
from edgegen.runtime.schedulers import make_scheduler  # noqa: E402

SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
    "ddim": "DDIMScheduler",
}
PROMPTS = ["a red apple", "a cat on a blue background"]
SEEDS = [5, 6]
LEVELS = 2  # uint8 levels allowed between the runtime and diffusers (fp32)


@pytest.fixture(scope="module")
def reference(diffusion_checkpoint):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(diffusion_checkpoint, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def runtime(diffusion_bundle):
    return Pipeline.from_bundle(diffusion_bundle, backend="ort-cpu", precision="fp32")


class Draws:
    """Stands in for diffusers' randn_tensor in one module: hands out the given arrays in order."""

    def __init__(self, arrays):
        self.arrays, self.calls = list(arrays), 0

    def __call__(self, shape, *args, **kw):
        array = self.arrays[self.calls]
        self.calls += 1
        assert tuple(shape) == array.shape, (shape, array.shape)
        return torch.from_numpy(array)


def patch_noise(monkeypatch, module: str, arrays) -> Draws:
    draws = Draws(arrays)
    monkeypatch.setattr(importlib.import_module(module), "randn_tensor", draws)
    return draws


def step_noise(name, streams, shape, steps):
    """The runtime draws one array per step that adds noise; diffusers' Euler ancestral also draws one
    for its last step (scaled by 0): give it zeros there."""
    if name == "euler_a":
        return [streams.draw(shape) for _ in range(steps - 1)] + [np.zeros((len(SEEDS), *shape), np.float32)]
    if name == "lcm":
        return [streams.draw(shape) for _ in range(steps - 1)]
    return []


def as_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil arithmetic


def levels(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def latent_shape(reference) -> tuple[int, int, int]:
    """A diffusers pipeline's latent shape (channels, size, size) at its UNet's sample size."""
    return tuple(reference.unet.config[k] for k in ("in_channels", "sample_size", "sample_size"))


def diffusers_txt2img(reference, monkeypatch, name, steps, guidance, seeds=SEEDS, prompts=PROMPTS):
    reference.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(reference.scheduler.config)
    shape = latent_shape(reference)
    streams = NoiseStreams(seeds)
    latents = streams.draw(shape)
    noise = step_noise(name, streams, shape, steps)
    for module in (
        "diffusers.schedulers.scheduling_euler_ancestral_discrete",
        "diffusers.schedulers.scheduling_lcm",
    ):
        patch_noise(monkeypatch, module, noise)
    images = reference(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images
    return as_uint8(images), latents


# ---------------------------------------------------------------- schedulers


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_tables_equal_diffusers(name):
    """Timesteps equal; sigmas, init noise sigma and alphas_cumprod within 1e-6 (relative: float32 tables,
    and torch's vectorised sqrt may differ from a correctly rounded one by an ulp)."""
    cls = getattr(diffusers, SCHEDULERS[name])
    checked = 0
    for spacing, betas, steps in itertools.product(
        ("linspace", "leading", "trailing"),
        ("scaled_linear", "linear", "squaredcos_cap_v2"),
        (1, 2, 3, 4, 8, 25),
    ):
        config = {
            "beta_schedule": betas,
            "timestep_spacing": spacing,
            "steps_offset": 1,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": False,
            "set_alpha_to_one": False,
        }
        theirs, ours = cls.from_config(config), make_scheduler(name, config)
        np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-6, atol=0)
        theirs.set_timesteps(steps)
        plan = ours.plan(steps)
        np.testing.assert_array_equal(plan.timesteps, theirs.timesteps.numpy().astype(np.float32))
        if name.startswith("euler"):
            np.testing.assert_allclose(plan.sigmas, theirs.sigmas.numpy(), rtol=1e-6, atol=0)
            assert plan.init_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
        checked += 1
    assert checked == 54


def test_scheduler_refuses_what_it_does_not_implement():
    with pytest.raises(BadInputError, match="use_karras_sigmas"):
        make_scheduler("euler", {"use_karras_sigmas": True})
    with pytest.raises(BadInputError, match="strength"):
        make_scheduler("euler", {}).plan(2, strength=0.2)
    with pytest.raises(BadInputError, match="num_inference_steps"):
        make_scheduler("lcm", {}).plan(51)


# ---------------------------------------------------------------- text-to-image against diffusers


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_txt2img_matches_diffusers(runtime, reference, monkeypatch, name, steps):
    want, latents = diffusers_txt2img(reference, monkeypatch, name, steps, guidance=0.0)
    runtime.clear_cache()  # a new prompt: the fused graph serves the bundle's own scheduler
    got = runtime(
        PROMPTS, seed=SEEDS, num_inference_steps=steps, scheduler=name, latents=latents, output_type="uint8"
    )
    assert levels(got, want) <= LEVELS
    assert runtime.last_call.path == (fused_name(steps) if name == "euler" else "loop")
    # seeds alone give the same latents as latents= (the first draw of each image's stream)
    runtime.clear_cache()
    assert (
        levels(
            runtime(PROMPTS, seed=SEEDS, num_inference_steps=steps, scheduler=name, output_type="uint8"), want
        )
        <= LEVELS
    )


@pytest.mark.parametrize("name", SCHEDULERS)
def test_classifier_free_guidance_matches_diffusers(runtime, reference, monkeypatch, name):
    want, latents = diffusers_txt2img(reference, monkeypatch, name, 2, guidance=4.0)
    unet = runtime.graph("unet")
    got = runtime(
        PROMPTS, seed=SEEDS, num_inference_steps=2, scheduler=name, guidance_scale=4.0, output_type="uint8"
    )
    assert levels(got, want) <= LEVELS
    assert runtime.last_call.path == "loop"
    assert 2 * len(PROMPTS) in {b for b, _ in unet._sets}  # one UNet run over [negative, positive] rows


def test_guidance_zero_runs_the_unet_on_the_images_alone(diffusion_bundle):
    pipe = Pipeline.from_bundle(diffusion_bundle, backend="ort-cpu", precision="fp32", mode="loop")
    pipe(PROMPTS, seed=SEEDS, num_inference_steps=2, guidance_scale=0.0)
    assert sorted(b for b, _ in pipe.graph("unet")._sets) == [len(PROMPTS)]
    assert [s for s in pipe.last_call.stages if s.startswith("unet")] == ["unet_1", "unet_2"]


def test_comparison_is_sensitive(runtime, reference, monkeypatch):
    """Negative controls: the images are neither flat nor saturated, and another seed, another step count
    or another prompt moves them well past the tolerance, so the parity tests above can fail."""
    want, _ = diffusers_txt2img(reference, monkeypatch, "euler", 2, guidance=0.0)
    assert want.std() > 40 and np.mean((want == 0) | (want == 255)) < 0.25
    # (not DDIM against Euler: on the same timesteps, deterministic DDIM is the Euler method, same numbers)
    for kw in ({"seed": [7, 8]}, {"num_inference_steps": 4}, {"scheduler": "lcm"}, {"guidance_scale": 3.0}):
        call = {"seed": SEEDS, "num_inference_steps": 2, **kw}
        assert levels(runtime(PROMPTS, output_type="uint8", **call), want) > 5 * LEVELS, kw
    assert (
        levels(
            runtime(["a green house", "a dog"], seed=SEEDS, num_inference_steps=2, output_type="uint8"), want
        )
        > 5 * LEVELS
    )


# ---------------------------------------------------------------- image-to-image

IMG2IMG_CASES = [("euler", 2, 0.5), ("euler_a", 4, 0.75), ("lcm", 4, 0.5), ("ddim", 4, 0.6)]


def img2img_init(size: int) -> np.ndarray:
    init = np.random.default_rng(0).integers(0, 256, (len(PROMPTS), size, size, 3), dtype=np.uint8)
    init[:, : size // 2] = 200  # some structure, not only noise
    return init


def diffusers_img2img(reference, monkeypatch, name, steps, strength, init, shape, sampled_latents=True):
    """diffusers' image-to-image with the runtime's draws: the initial noise, the VAE encoder's sample noise
    (AutoencoderKL: ``sampled_latents``; AutoencoderTiny's encoder draws none), then the steps' noise."""
    streams = NoiseStreams(SEEDS)
    noise = streams.draw(shape)
    if sampled_latents:
        patch_noise(monkeypatch, "diffusers.models.autoencoders.vae", [streams.draw(shape)])
    extra = step_noise(name, streams, shape, int(steps * strength))
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(reference.scheduler.config)
    patch_noise(
        monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img", [noise]
    )
    for module in (
        "diffusers.schedulers.scheduling_euler_ancestral_discrete",
        "diffusers.schedulers.scheduling_lcm",
    ):
        patch_noise(monkeypatch, module, extra)
    from PIL import Image

    return as_uint8(
        img2img(
            PROMPTS,
            image=[Image.fromarray(x) for x in init],
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=0.0,
            output_type="np",
        ).images
    )


def check_img2img(runtime, reference, monkeypatch, name, steps, strength, sampled_latents=True):
    init = img2img_init(runtime.image_size)
    want = diffusers_img2img(
        reference, monkeypatch, name, steps, strength, init, runtime.latent_shape, sampled_latents
    )
    got = runtime(
        PROMPTS,
        seed=SEEDS,
        image=list(init),
        strength=strength,
        num_inference_steps=steps,
        scheduler=name,
        output_type="uint8",
    )
    assert levels(got, want) <= LEVELS
    runs = int(steps * strength)
    assert [s for s in runtime.last_call.stages if s.startswith("unet")] == [
        f"unet_{i + 1}" for i in range(runs)
    ]
    assert "vae_encoder" in runtime.last_call.stages
    # the input image matters: another one gives another result
    assert (
        levels(
            runtime(
                PROMPTS,
                seed=SEEDS,
                image=255 - init[0],
                strength=strength,
                num_inference_steps=steps,
                scheduler=name,
                output_type="uint8",
            ),
            want,
        )
        > 3 * LEVELS
    )


@pytest.mark.parametrize("name,steps,strength", IMG2IMG_CASES)
def test_img2img_matches_diffusers(runtime, reference, monkeypatch, name, steps, strength):
    check_img2img(runtime, reference, monkeypatch, name, steps, strength)


# ---------------------------------------------------------------- fused graphs and the loop


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_fused_and_loop_agree(diffusion_bundle, steps):
    fused = Pipeline.from_bundle(diffusion_bundle, backend="ort-cpu", precision="fp32", mode="fused")
    loop = Pipeline.from_bundle(diffusion_bundle, backend="ort-cpu", precision="fp32", mode="loop")
    a = fused(PROMPTS, seed=SEEDS, num_inference_steps=steps, output_type="uint8")
    b = loop(PROMPTS, seed=SEEDS, num_inference_steps=steps, output_type="uint8")
    assert fused.last_call.path == fused_name(steps) and loop.last_call.path == "loop"
    assert levels(a, b) <= 1
    assert set(fused.last_call.stages) >= {"fused"} and "unet_1" in loop.last_call.stages


def test_fused_mode_refuses_calls_no_graph_serves(diffusion_bundle):
    fused = Pipeline.from_bundle(diffusion_bundle, backend="ort-cpu", precision="fp32", mode="fused")
    for kw in ({"num_inference_steps": 3}, {"scheduler": "ddim"}, {"guidance_scale": 5.0}):
        with pytest.raises(BadInputError, match="no fused graph"):
            fused("a cat", seed=0, **kw)


def test_repeated_prompt_skips_the_text_encoder(runtime):
    runtime.clear_cache()
    first = runtime("a red apple", seed=3, output_type="uint8")
    assert "text_encoder" not in runtime.last_call.stages and runtime.last_call.path == "fused"
    again = runtime("a red apple", seed=3, output_type="uint8")
    assert runtime.last_call.path == "loop" and "cache" in runtime.last_call.stages
    assert "text_encoder" not in runtime.last_call.stages
    assert levels(first, again) <= 1


def test_seed_is_per_image(runtime):
    both = runtime(PROMPTS, seed=[11, 12], num_inference_steps=2, scheduler="euler_a", output_type="uint8")
    alone = runtime(PROMPTS[1], seed=12, num_inference_steps=2, scheduler="euler_a", output_type="uint8")
    assert levels(both[1:], alone) <= 1


# ---------------------------------------------------------------- LCM-distilled UNet (guidance embedding)


def test_lcm_distilled_unet_fused_loop_and_diffusers_agree(lcm_bundle, lcm_checkpoint, monkeypatch):
    """A UNet with time_cond_proj_dim takes the guidance scale as an input; the bundle's scheduler is LCM,
    so its 2-step fused graph takes the step noise as an input too."""
    manifest = json.loads((lcm_bundle / "manifest.json").read_text())
    assert [t["name"] for t in manifest["components"]["fused_k2"]["inputs"]] == [
        "input_ids",
        "noise",
        "noise_1",
        "timestep_cond",
    ]
    fused = Pipeline.from_bundle(lcm_bundle, backend="ort-cpu", precision="fp32", mode="fused")
    loop = Pipeline.from_bundle(lcm_bundle, backend="ort-cpu", precision="fp32", mode="loop")
    a = fused(PROMPTS, seed=SEEDS, num_inference_steps=2, guidance_scale=6.0, output_type="uint8")
    b = loop(PROMPTS, seed=SEEDS, num_inference_steps=2, guidance_scale=6.0, output_type="uint8")
    assert levels(a, b) <= 1
    reference = diffusers.StableDiffusionPipeline.from_pretrained(lcm_checkpoint, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    want, _ = diffusers_txt2img(reference, monkeypatch, "lcm", 2, guidance=6.0)
    assert levels(a, want) <= LEVELS
    assert (
        levels(
            fused(PROMPTS, seed=SEEDS, num_inference_steps=2, guidance_scale=1.5, output_type="uint8"), want
        )
        > 5
    )


# ---------------------------------------------------------------- inputs


def test_bad_inputs_are_refused(runtime):
    cases = [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"strength": 0.5}, "strength"),
        ({"scheduler": "pndm"}, "scheduler"),
        ({"latents": np.zeros((1, 4, 2, 2), np.float32)}, "latents"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"image": "photo.png"}, "image"),
        ({"image": np.zeros((8, 8, 3), np.uint8), "strength": 0.1, "num_inference_steps": 4}, "strength"),
        ({"image": np.zeros((8, 8), np.uint8)}, "image"),
        ({"negative_prompt": ["a", "b"], "guidance_scale": 3}, "negative_prompt"),
        ({"latents": np.full((1, *runtime.latent_shape), np.nan, np.float32)}, "latents"),
    ]
    for kw, subject in cases:
        with pytest.raises(BadInputError) as e:
            runtime("a cat", seed=0, **kw)
        assert str(e.value).startswith(subject), (kw, str(e.value))

"""AutoencoderTiny (TAESD architecture) as a diffusion pipeline's VAE: the runtime against diffusers'
StableDiffusionPipeline and StableDiffusionImg2ImgPipeline with the same VAE, as tests/test_diffusion.py
checks the AutoencoderKL path, and ``export --vae DIR``.

diffusers' pipelines divide the latents by ``vae.config.scaling_factor`` (1.0 for AutoencoderTiny) and
read AutoencoderTiny's encoder output as the latents themselves: no sampling, so no encoder noise draw.
"""

import json
import shutil

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from edgegen.export.families import load_family  # noqa: E402
from edgegen.runtime import Pipeline  # noqa: E402
from edgegen.runtime.cli import main  # noqa: E402
from edgegen.runtime.diffusion import fused_name  # noqa: E402
from edgegen.runtime.errors import BadBundleError, CheckpointError  # noqa: E402
from test_diffusion import (  # noqa: E402
    IMG2IMG_CASES,
    LEVELS,
    PROMPTS,
    SCHEDULERS,
    SEEDS,
    check_img2img,
    diffusers_txt2img,
    levels,
)


@pytest.fixture(scope="module")
def reference(taesd_checkpoint):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(taesd_checkpoint, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vae).__name__ == "AutoencoderTiny"
    return pipe


@pytest.fixture(scope="module")
def runtime(taesd_bundle):
    return Pipeline.from_bundle(taesd_bundle, backend="ort-cpu", precision="fp32")


def test_manifest_names_the_vae(taesd_bundle, diffusion_bundle):
    """The runtime reads the VAE class from the manifest; AutoencoderTiny's encoder takes no noise."""
    for bundle, vae, encoder_inputs in (
        (taesd_bundle, "AutoencoderTiny", ["image"]),
        (diffusion_bundle, "AutoencoderKL", ["image", "encoder_noise"]),
    ):
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["generation"]["vae"] == vae
        assert [t["name"] for t in manifest["components"]["vae_encoder"]["inputs"]] == encoder_inputs


def test_a_bundle_without_or_with_an_unknown_vae_is_refused(taesd_bundle, tmp_path):
    bundle = shutil.copytree(taesd_bundle, tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for vae, problem in ((None, "incomplete"), ("AutoencoderKLWan", "unknown VAE class")):
        gen = {k: v for k, v in manifest["generation"].items() if k != "vae"}
        (bundle / "manifest.json").write_text(
            json.dumps({**manifest, "generation": {**gen, "vae": vae} if vae else gen})
        )
        with pytest.raises(BadBundleError, match=problem):
            Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32")


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_txt2img_matches_diffusers(runtime, reference, monkeypatch, name, steps):
    want, latents = diffusers_txt2img(reference, monkeypatch, name, steps, guidance=0.0)
    runtime.clear_cache()  # a new prompt: the fused graph serves the bundle's own scheduler
    got = runtime(
        PROMPTS, seed=SEEDS, num_inference_steps=steps, scheduler=name, latents=latents, output_type="uint8"
    )
    assert levels(got, want) <= LEVELS
    fused = fused_name(steps)
    assert runtime.last_call.path == (fused if name == "euler" else "loop")


@pytest.mark.parametrize("name", SCHEDULERS)
def test_classifier_free_guidance_matches_diffusers(runtime, reference, monkeypatch, name):
    want, _ = diffusers_txt2img(reference, monkeypatch, name, 2, guidance=4.0)
    got = runtime(
        PROMPTS, seed=SEEDS, num_inference_steps=2, scheduler=name, guidance_scale=4.0, output_type="uint8"
    )
    assert levels(got, want) <= LEVELS
    assert runtime.last_call.path == "loop"


def test_comparison_is_sensitive(runtime, reference, monkeypatch):
    """The images are neither flat nor saturated, and another seed or step count moves them well past the
    tolerance; decoding with AutoencoderKL's scaling factor (0.18215) instead of 1.0 would too."""
    want, latents = diffusers_txt2img(reference, monkeypatch, "euler", 2, guidance=0.0)
    assert want.std() > 40 and np.mean((want == 0) | (want == 255)) < 0.25
    for kw in ({"seed": [7, 8]}, {"num_inference_steps": 4}):
        call = {"seed": SEEDS, "num_inference_steps": 2, **kw}
        assert levels(runtime(PROMPTS, output_type="uint8", **call), want) > 5 * LEVELS, kw
    with torch.no_grad():
        reference.vae.config.scaling_factor = 0.18215
        try:
            kl_scaled, _ = diffusers_txt2img(reference, monkeypatch, "euler", 2, guidance=0.0)
        finally:
            reference.vae.config.scaling_factor = 1.0
    assert levels(kl_scaled, want) > 5 * LEVELS


@pytest.mark.parametrize("name,steps,strength", IMG2IMG_CASES)
def test_img2img_matches_diffusers(runtime, reference, monkeypatch, name, steps, strength):
    """No encoder noise: the runtime draws the initial noise, then the steps' noise, nothing in between."""
    check_img2img(runtime, reference, monkeypatch, name, steps, strength, sampled_latents=False)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_fused_and_loop_agree(taesd_bundle, steps):
    fused = Pipeline.from_bundle(taesd_bundle, backend="ort-cpu", precision="fp32", mode="fused")
    loop = Pipeline.from_bundle(taesd_bundle, backend="ort-cpu", precision="fp32", mode="loop")
    a = fused(PROMPTS, seed=SEEDS, num_inference_steps=steps, output_type="uint8")
    b = loop(PROMPTS, seed=SEEDS, num_inference_steps=steps, output_type="uint8")
    assert fused.last_call.path == fused_name(steps)
    assert loop.last_call.path == "loop"
    assert levels(a, b) <= 1


# ---------------------------------------------------------------- export --vae DIR


def test_vae_option_swaps_the_autoencoder(diffusion_checkpoint, taesd_checkpoint):
    """The KL pipeline with the TAESD directory in place of its vae/ (loading only: the export steps are
    the ones the taesd bundle above went through)."""
    family = load_family(diffusion_checkpoint, vae=taesd_checkpoint / "vae")
    assert type(family.vae).__name__ == family.vae_class == "AutoencoderTiny"
    assert family.generation(1)["vae"] == family.describe()["vae"]["class"] == "AutoencoderTiny"
    encoder = next(c for c in family.components() if c.name == "vae_encoder")
    assert [t.name for t in encoder.inputs] == ["image"]
    # and back: a KL VAE into the TAESD pipeline
    own = load_family(taesd_checkpoint, vae=diffusion_checkpoint / "vae")
    assert own.vae_class == "AutoencoderKL" and type(own.vae).__name__ == "AutoencoderKL"


def test_vae_option_refuses_what_is_not_an_autoencoder(
    diffusion_checkpoint, taesd_checkpoint, tmp_path, capsys
):
    for bad, problem in (
        (taesd_checkpoint / "unet", "holds a UNet2DConditionModel"),
        (tmp_path / "missing", "holds no diffusers autoencoder"),
    ):
        with pytest.raises(CheckpointError, match=problem):
            load_family(diffusion_checkpoint, vae=bad)
    # through the CLI: the clean error line, nothing written
    code = main(
        [
            "export",
            str(diffusion_checkpoint),
            "-o",
            str(tmp_path / "b"),
            "--vae",
            str(taesd_checkpoint / "unet"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "--vae" in err and "UNet2DConditionModel" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
    # a pickled autoencoder is refused as the pipeline's own would be
    pickled = shutil.copytree(taesd_checkpoint / "vae", tmp_path / "pickled")
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_family(diffusion_checkpoint, vae=pickled)


def test_subpixel_upsampling_of_the_tiny_decoder_equals_diffusers():
    """AutoencoderTiny's decoder upsamples with nn.Upsample + a 3x3 conv in a Sequential: traced as a 2x2
    conv + pixel shuffle, same values; the model is restored afterwards."""
    from edgegen.export.families.diffusion import UpsampleConv, upsamplers_as_subpixel

    torch.manual_seed(0)
    vae = diffusers.AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
    ).eval()
    layers = list(vae.decoder.layers)
    z = torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        want = vae.decode(z).sample
        with upsamplers_as_subpixel(vae) as swapped:
            assert swapped == 2 and sum(isinstance(m, UpsampleConv) for m in vae.decoder.layers) == 2
            assert not any(isinstance(m, torch.nn.Upsample) for m in vae.decoder.layers)
            got = vae.decode(z).sample
    assert got.shape == want.shape == (2, 3, 20, 28)
    assert float((got - want).abs().max()) < 1e-5
    assert list(vae.decoder.layers) == layers

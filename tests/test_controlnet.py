"""ControlNet: the runtime against diffusers' StableDiffusionControlNetPipeline on a tiny random-weight
pipeline whose ControlNet's zero-initialised convolutions have random weights (so the control image
matters), the fused graphs against the loop, fp16, ``export --controlnet DIR``, and bad control input.

diffusers sizes its output after the control image unless told: the reference gets height/width, as the
runtime's graphs are built for the bundle's image size (the control image is resized to it).
"""

import json

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from edgegen.export.families import load_family  # noqa: E402
from edgegen.runtime import BadInputError, Pipeline  # noqa: E402
from edgegen.runtime.cli import main  # noqa: E402
from edgegen.runtime.diffusion import NoiseStreams, fused_name  # noqa: E402
from edgegen.runtime.errors import CheckpointError  # noqa: E402
from PIL import Image  # noqa: E402
from test_diffusion import LEVELS, PROMPTS, SEEDS, as_uint8, latent_shape, levels, patch_noise  # noqa: E402

RESIDUALS = [f"down_block_additional_residuals_{i}" for i in range(4)] + ["mid_block_additional_residual"]


@pytest.fixture(scope="module")
def checkpoint(controlnet_checkpoint):
    return controlnet_checkpoint  # conftest's: test_ip_adapter exports it too


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    """fp32 and fp16, fused graphs for 1, 2 and 4 Euler steps, each with the ControlNet."""
    from edgegen.export import export_checkpoint

    out = tmp_path_factory.mktemp("controlnet_bundle") / "b"
    return export_checkpoint(checkpoint, out, precisions="fp32,fp16", progress=False)


@pytest.fixture(scope="module")
def reference(checkpoint):
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(checkpoint, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def runtime(bundle):
    return Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32")


def control_image(size=40, flip=False) -> np.ndarray:
    """An edge-map-like condition, of another size than the bundle's (resized as diffusers does)."""
    image = np.zeros((size, size, 3), np.uint8)
    image[size // 4 : 3 * size // 4, size // 8 : size // 2] = 255
    image[:: max(size // 6, 1)] = 128
    return image[:, ::-1].copy() if flip else image


def diffusers_controlnet(reference, steps, guidance, scale, image, size):
    latents = NoiseStreams(SEEDS).draw(latent_shape(reference))
    return as_uint8(
        reference(
            PROMPTS,
            image=Image.fromarray(image),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            controlnet_conditioning_scale=scale,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).images
    )


# ---------------------------------------------------------------- the bundle


def test_bundle_holds_the_controlnet_and_plain_bundles_are_unchanged(bundle, diffusion_checkpoint):
    manifest = json.loads((bundle / "manifest.json").read_text())
    inputs = {name: [t["name"] for t in c["inputs"]] for name, c in manifest["components"].items()}
    assert inputs["controlnet"] == [
        "sample",
        "timestep",
        "text_states",
        "controlnet_cond",
        "conditioning_scale",
    ]
    assert [t["name"] for t in manifest["components"]["controlnet"]["outputs"]] == RESIDUALS
    assert inputs["unet"] == ["sample", "timestep", "text_states", *RESIDUALS]
    for fused in ("fused", "fused_k2", "fused_k4"):
        assert inputs[fused] == ["input_ids", "noise", "control_image", "conditioning_scale"]
    assert manifest["generation"]["controlnet"]["residuals"] == RESIDUALS
    assert manifest["model"]["controlnet"]["conditioning_channels"] == 3
    plain = {c.name: [t.name for t in c.inputs] for c in load_family(diffusion_checkpoint).components()}
    assert "controlnet" not in plain and plain["unet"] == ["sample", "timestep", "text_states"]
    assert plain["fused"] == ["input_ids", "noise"]


# ---------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("guidance", [0.0, 4.0])
def test_matches_diffusers(runtime, reference, steps, scale, guidance):
    want = diffusers_controlnet(reference, steps, guidance, scale, control_image(), runtime.image_size)
    runtime.clear_cache()  # a new prompt: the fused graph serves calls without guidance
    got = runtime(
        PROMPTS,
        seed=SEEDS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        control_image=control_image(),
        controlnet_conditioning_scale=scale,
        output_type="uint8",
    )
    assert levels(got, want) <= LEVELS
    assert runtime.last_call.path == (fused_name(steps) if guidance == 0 else "loop")
    if guidance:  # the ControlNet ran before each UNet step, on the negative and positive rows together
        assert [s for s in runtime.last_call.stages if s.startswith("controlnet")] == [
            f"controlnet_{i + 1}" for i in range(steps)
        ]
        assert 2 * len(PROMPTS) in {b for b, _ in runtime.graph("controlnet")._sets}


def test_the_condition_changes_the_image(runtime, reference):
    """Negative controls: another control image or scale 0 moves the image well past the tolerance; scale 0
    is the plain pipeline (the same UNet without a ControlNet), in the same graphs."""
    want = diffusers_controlnet(reference, 2, 0.0, 1.0, control_image(), runtime.image_size)
    call = {"seed": SEEDS, "num_inference_steps": 2, "output_type": "uint8"}
    flipped = runtime(PROMPTS, control_image=control_image(flip=True), **call)
    off = runtime(PROMPTS, control_image=control_image(), controlnet_conditioning_scale=0, **call)
    assert levels(flipped, want) > 5 * LEVELS
    assert np.abs(off.astype(np.int16) - want).mean() > 5
    plain = diffusers.StableDiffusionPipeline(
        **{k: v for k, v in reference.components.items() if k != "controlnet"}
    )
    plain.set_progress_bar_config(disable=True)
    latents = NoiseStreams(SEEDS).draw(runtime.latent_shape)
    without = plain(
        PROMPTS,
        num_inference_steps=2,
        guidance_scale=0.0,
        latents=torch.from_numpy(latents),
        output_type="np",
    )
    assert levels(off, as_uint8(without.images)) <= LEVELS


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_fused_and_loop_agree(bundle, steps):
    fused = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", mode="fused")
    loop = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", mode="loop")
    call = {
        "seed": SEEDS,
        "num_inference_steps": steps,
        "control_image": control_image(),
        "output_type": "uint8",
    }
    a, b = (
        fused(PROMPTS, controlnet_conditioning_scale=0.7, **call),
        loop(PROMPTS, controlnet_conditioning_scale=0.7, **call),
    )
    assert fused.last_call.path.startswith("fused") and loop.last_call.path == "loop"
    assert levels(a, b) <= 1


def test_fp16_passes_its_gate(bundle, runtime):
    report = json.loads((bundle / "report.json").read_text())
    assert report["ok"] and report["precisions"]["fp16"]["gate"]["ok"]
    assert set(report["precisions"]["fp16"]["parity"]) >= {"controlnet", "unet", "fused_k4"}
    half = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp16")
    call = {"seed": SEEDS, "num_inference_steps": 2, "control_image": control_image(), "output_type": "uint8"}
    got, want = half(PROMPTS, **call), runtime(PROMPTS, **call)
    assert np.abs(got.astype(np.int16) - want).mean() < 1.0


def test_image_to_image_with_a_controlnet(runtime, reference, monkeypatch):
    """``image=`` the init image, ``control_image=`` the condition: StableDiffusionControlNetImg2ImgPipeline's
    meaning (with the runtime's draws: initial noise, then the VAE encoder's); the loop runs the ControlNet
    on the steps image-to-image keeps."""
    init = np.full((runtime.image_size, runtime.image_size, 3), 90, np.uint8)
    init[:, :10] = 220
    streams = NoiseStreams(SEEDS)
    noise, encoder_noise = streams.draw(runtime.latent_shape), streams.draw(runtime.latent_shape)
    patch_noise(monkeypatch, "diffusers.models.autoencoders.vae", [encoder_noise])
    patch_noise(monkeypatch, "diffusers.pipelines.controlnet.pipeline_controlnet_img2img", [noise])
    img2img = diffusers.StableDiffusionControlNetImg2ImgPipeline(**reference.components)
    img2img.set_progress_bar_config(disable=True)
    want = img2img(
        PROMPTS,
        image=[Image.fromarray(init)] * len(PROMPTS),  # one per prompt: each encoded with its own noise
        control_image=Image.fromarray(control_image()),
        height=runtime.image_size,
        width=runtime.image_size,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=0.0,
        output_type="np",
    ).images
    call = {"seed": SEEDS, "image": init, "strength": 0.5, "num_inference_steps": 4, "output_type": "uint8"}
    a = runtime(PROMPTS, control_image=control_image(), **call)
    assert levels(a, as_uint8(want)) <= LEVELS
    assert runtime.last_call.path == "loop"
    assert [s for s in runtime.last_call.stages if s.startswith("controlnet")] == [
        "controlnet_1",
        "controlnet_2",
    ]
    assert levels(runtime(PROMPTS, control_image=control_image(flip=True), **call), a) > 5 * LEVELS


# ---------------------------------------------------------------- export --controlnet DIR


def test_export_adds_a_saved_controlnet_to_a_plain_pipeline(diffusion_checkpoint, checkpoint, tmp_path):
    family = load_family(diffusion_checkpoint, controlnet=checkpoint / "controlnet")
    names = {c.name: [t.name for t in c.inputs] for c in family.components()}
    assert names["controlnet"][-2:] == ["controlnet_cond", "conditioning_scale"]
    assert names["fused_k2"] == ["input_ids", "noise", "control_image", "conditioning_scale"]
    assert family.generation(4)["controlnet"]["residuals"] == RESIDUALS
    for wrong in (checkpoint / "vae", tmp_path):  # another model's directory, an empty one
        with pytest.raises(CheckpointError, match="--controlnet"):
            load_family(diffusion_checkpoint, controlnet=wrong)


# ---------------------------------------------------------------- inputs


def test_other_image_modes_are_converted_to_rgb(runtime):
    rgb = control_image()
    call = {"seed": SEEDS, "num_inference_steps": 1, "output_type": "uint8"}
    want = runtime(PROMPTS, control_image=Image.fromarray(rgb).convert("L").convert("RGB"), **call)
    assert levels(runtime(PROMPTS, control_image=Image.fromarray(rgb).convert("L"), **call), want) == 0
    rgba = Image.fromarray(rgb).convert("RGBA")
    assert (
        levels(runtime(PROMPTS, control_image=rgba, **call), runtime(PROMPTS, control_image=rgb, **call)) == 0
    )


def test_a_shared_image_is_read_once(runtime, monkeypatch):
    """One control image and one init image for four output images: each is decoded and resized once."""
    from edgegen.runtime import diffusion

    read, original = [], diffusion._rgb
    monkeypatch.setattr(
        diffusion, "_rgb", lambda image, subject: read.append(subject) or original(image, subject)
    )
    call = {"seed": [1, 2, 3, 4], "num_inference_steps": 2, "strength": 0.5, "output_type": "uint8"}
    out = runtime(["a cat"] * 4, control_image=control_image(), image=control_image(size=32), **call)
    assert sorted(read) == ["control_image", "image"] and len(out) == 4


def test_bad_control_input_is_refused(runtime, diffusion_bundle, tmp_path):
    text, cut = tmp_path / "notes.png", tmp_path / "cut.png"
    text.write_text("not an image")
    Image.fromarray(control_image()).save(cut)
    cut.write_bytes(cut.read_bytes()[:60])  # a truncated PNG: the header reads, the pixels do not
    huge = Image.new("1", (10000, 8000))
    cases = [
        ({}, "control_image", "missing"),
        ({"control_image": str(tmp_path / "absent.png")}, "control_image", "cannot read"),
        ({"control_image": str(text)}, "control_image", "cannot read"),
        ({"control_image": cut}, "control_image", "cannot"),
        ({"control_image": huge}, "control_image", "too large"),
        ({"control_image": np.zeros((8, 8), np.uint8)}, "control_image", "array"),
        ({"control_image": [control_image()] * 3}, "control_image", "3 images"),
        (
            {"control_image": control_image(), "controlnet_conditioning_scale": -1},
            "controlnet_conditioning",
            "",
        ),
        ({"control_image": control_image(), "guess_mode": True}, "guess_mode", "unknown keyword"),
    ]
    for kw, subject, problem in cases:
        with pytest.raises(BadInputError) as e:
            runtime(PROMPTS, seed=0, **kw)
        assert str(e.value).startswith(subject) and problem in str(e.value), (kw, str(e.value))
    plain = Pipeline.from_bundle(diffusion_bundle, backend="ort-cpu", precision="fp32")
    for kw in ({"control_image": control_image()}, {"controlnet_conditioning_scale": 0.5}):
        with pytest.raises(BadInputError, match="no ControlNet"):
            plain("a cat", seed=0, **kw)


def test_cli_generate_and_inspect(bundle, tmp_path, capsys):
    edges = tmp_path / "edges.png"
    Image.fromarray(control_image()).convert("L").save(edges)
    out = tmp_path / "out.png"
    argv = ["generate", "a cat", "--bundle", str(bundle), "--seed", "3", "-o", str(out), "--json"]
    assert main([*argv, "--control-image", str(edges), "--controlnet-conditioning-scale", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] and Image.open(out).size == (32, 32)
    (tmp_path / "bad.png").write_text("no")
    assert main([*argv, "--control-image", str(tmp_path / "bad.png")]) != 0
    err = json.loads(capsys.readouterr().out)
    assert err["error"]["subject"] == "control_image" and "Traceback" not in json.dumps(err)
    assert main(["inspect", str(bundle)]) == 0
    assert "controlnet ControlNetModel, 5 residuals" in capsys.readouterr().out
    # bench times calls with a stand-in control image; in the loop the ControlNet's runs are engine stages
    bench = ["bench", str(bundle), "--precision", "fp32", "--backend", "ort-cpu", "--iterations", "2"]
    assert main([*bench, "--warmup", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["path"] == "fused"
    assert main([*bench, "--warmup", "1", "--mode", "loop", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert run["path"] == "loop" and run["stages_ms"]["controlnet_1"]["engine"]

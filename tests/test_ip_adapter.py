"""IP-Adapter: the runtime against diffusers' StableDiffusionPipeline with ``load_ip_adapter`` (a tiny
random-weight adapter written in code: a CLIPVisionModelWithProjection and ip-adapter.safetensors) and
``set_ip_adapter_scale``; the fused graphs against the loop, fp16, the per-image embedding cache, bad input.
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
from test_diffusion import LEVELS, PROMPTS, SEEDS, as_uint8, latent_shape, levels  # noqa: E402


@pytest.fixture(scope="module")
def adapter(diffusion_checkpoint, tmp_path_factory):
    from edgegen.export.testing import make_tiny_ip_adapter

    return make_tiny_ip_adapter(tmp_path_factory.mktemp("ip_adapter") / "adapter", diffusion_checkpoint)


@pytest.fixture(scope="module")
def bundle(diffusion_checkpoint, adapter, tmp_path_factory):
    """fp32 and fp16, fused graphs for 1, 2 and 4 Euler steps, each with the adapter."""
    from edgegen.export import export_checkpoint

    out = tmp_path_factory.mktemp("ip_adapter_bundle") / "b"
    return export_checkpoint(
        diffusion_checkpoint,
        out,
        precisions="fp32,fp16",
        progress=False,
        family_options={"ip_adapter": adapter},
    )


def with_ip_adapter(pipe, adapter):
    """A diffusers pipeline with the adapter at ``adapter`` loaded (make_tiny_ip_adapter's layout)."""
    pipe.load_ip_adapter(
        str(adapter), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder="image_encoder"
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(diffusion_checkpoint, adapter):
    return with_ip_adapter(
        diffusers.StableDiffusionPipeline.from_pretrained(diffusion_checkpoint, local_files_only=True),
        adapter,
    )


@pytest.fixture(scope="module")
def runtime(bundle):
    return Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32")


def reference_image(seed=1) -> np.ndarray:
    """Not square and not the encoder's size: resized and centre-cropped as CLIPImageProcessor does."""
    image = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    image[:20] = 200
    return image


def diffusers_ip_adapter(reference, steps, guidance, scale, image, prompts=PROMPTS):
    reference.set_ip_adapter_scale(scale)
    latents = NoiseStreams(SEEDS[: len(prompts)]).draw(latent_shape(reference))
    return as_uint8(
        reference(
            prompts,
            ip_adapter_image=Image.fromarray(image),
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).images
    )


def test_bundle_holds_the_image_encoder(bundle, diffusion_checkpoint):
    manifest = json.loads((bundle / "manifest.json").read_text())
    inputs = {name: [t["name"] for t in c["inputs"]] for name, c in manifest["components"].items()}
    assert inputs["image_encoder"] == ["pixel_values"]
    assert inputs["unet"] == ["sample", "timestep", "text_states", "image_embeds", "ip_adapter_scale"]
    assert inputs["fused_k4"] == ["input_ids", "noise", "image_embeds", "ip_adapter_scale"]
    assert manifest["generation"]["ip_adapter"]["image_size"] == 32
    # every setting written is one the runtime reads (runtime.diffusion._ip_adapter_settings)
    assert set(manifest["generation"]["ip_adapter"]) == {"image_size", "image_mean", "image_std", "scale"}
    plain = {c.name: [t.name for t in c.inputs] for c in load_family(diffusion_checkpoint).components()}
    assert "image_encoder" not in plain and plain["unet"] == ["sample", "timestep", "text_states"]


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("guidance", [0.0, 4.0])
def test_matches_diffusers(runtime, reference, steps, scale, guidance):
    want = diffusers_ip_adapter(reference, steps, guidance, scale, reference_image())
    runtime.clear_cache()
    got = runtime(
        PROMPTS,
        seed=SEEDS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        ip_adapter_image=reference_image(),
        ip_adapter_scale=scale,
        output_type="uint8",
    )
    assert levels(got, want) <= LEVELS
    assert runtime.last_call.path == (fused_name(steps) if guidance == 0 else "loop")


def test_the_reference_image_changes_the_result(runtime, reference, diffusion_checkpoint):
    """Negative controls: another reference image moves the result past the tolerance; scale 0 gives the
    plain pipeline's image (no adapter) from the same graphs."""
    want = diffusers_ip_adapter(reference, 2, 0.0, 1.0, reference_image())
    call = {"seed": SEEDS, "num_inference_steps": 2, "output_type": "uint8"}
    other = runtime(PROMPTS, ip_adapter_image=reference_image(seed=2)[:, ::-1].copy(), **call)
    assert levels(other, want) > 5 * LEVELS
    off = runtime(PROMPTS, ip_adapter_image=reference_image(), ip_adapter_scale=0.0, **call)
    plain = diffusers.StableDiffusionPipeline.from_pretrained(diffusion_checkpoint, local_files_only=True)
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
    assert np.abs(off.astype(np.int16) - want).mean() > 5


def test_the_image_embedding_is_cached(runtime):
    encoder, runs = runtime.graph("image_encoder"), []
    original = encoder.run
    encoder.run = lambda *a, **k: runs.append(1) or original(*a, **k)
    try:
        image = reference_image(seed=7)
        first = runtime(PROMPTS, seed=SEEDS, ip_adapter_image=image, output_type="uint8")
        again = runtime(PROMPTS, seed=SEEDS, ip_adapter_image=Image.fromarray(image), output_type="uint8")
        runtime(PROMPTS, seed=SEEDS, ip_adapter_image=reference_image(seed=8), output_type="uint8")
    finally:
        encoder.run = original
    assert len(runs) == 2 and levels(first, again) == 0  # one run per distinct image, as a PIL or an array


def test_each_distinct_image_is_prepared_once_outside_the_engine_stage(runtime, monkeypatch):
    """Four output images, two reference images: each is read and prepared once (not once per output image)
    and reaches its own rows; the image_encoder stage times encoder runs alone (a cached image runs none)."""
    from edgegen.runtime import diffusion

    prepared, original = [], diffusion.clip_pixels
    monkeypatch.setattr(diffusion, "clip_pixels", lambda *a: prepared.append(1) or original(*a))
    runtime.clear_cache()
    a, b = reference_image(seed=9), reference_image(seed=10)
    call = {"seed": [1] * 4, "num_inference_steps": 1, "output_type": "uint8"}
    out = runtime(["a cat"] * 4, ip_adapter_image=[a, b, a, a], **call)
    assert len(prepared) == 2 and "image_encoder" in runtime.last_call.stages
    assert levels(out[[2, 3]], out[[0, 0]]) == 0 and levels(out[1], out[0]) > 0
    runtime(["a dog"] * 4, ip_adapter_image=a, **call)
    assert len(prepared) == 3 and "image_encoder" not in runtime.last_call.stages  # cached: no engine time


@pytest.mark.parametrize("steps", [1, 4])
def test_fused_and_loop_agree(bundle, steps):
    fused = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", mode="fused")
    loop = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", mode="loop")
    call = {"seed": SEEDS, "num_inference_steps": steps, "ip_adapter_image": reference_image()}
    a = fused(PROMPTS, ip_adapter_scale=0.6, output_type="uint8", **call)
    b = loop(PROMPTS, ip_adapter_scale=0.6, output_type="uint8", **call)
    assert fused.last_call.path.startswith("fused") and loop.last_call.path == "loop"
    assert levels(a, b) <= 1


def test_fused_mode_refuses_before_encoding(bundle, monkeypatch):
    fused = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", mode="fused")
    encoder, runs = fused.graph("image_encoder"), []
    original = encoder.run
    monkeypatch.setattr(encoder, "run", lambda *a, **k: runs.append(1) or original(*a, **k))
    with pytest.raises(BadInputError, match="no fused graph"):
        fused(PROMPTS, seed=SEEDS, guidance_scale=4.0, ip_adapter_image=reference_image())
    assert runs == []


def test_fp16_passes_its_gate(bundle, runtime):
    report = json.loads((bundle / "report.json").read_text())
    assert report["ok"] and report["precisions"]["fp16"]["gate"]["ok"]
    assert set(report["precisions"]["fp16"]["parity"]) >= {"image_encoder", "unet", "fused_k4"}
    half = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp16")
    call = {"seed": SEEDS, "num_inference_steps": 2, "ip_adapter_image": reference_image()}
    got, want = half(PROMPTS, output_type="uint8", **call), runtime(PROMPTS, output_type="uint8", **call)
    assert np.abs(got.astype(np.int16) - want).mean() < 1.0


def test_bad_input_is_refused(runtime, diffusion_bundle, diffusion_checkpoint, adapter, tmp_path):
    cases = [
        ({}, "ip_adapter_image", "missing"),
        ({"ip_adapter_image": str(tmp_path / "absent.png")}, "ip_adapter_image", "cannot read"),
        ({"ip_adapter_image": reference_image(), "ip_adapter_scale": "big"}, "ip_adapter_scale", ""),
        ({"ip_adapter_image": np.zeros((4, 4, 4), np.float32)}, "ip_adapter_image", "array"),
    ]
    for kw, subject, problem in cases:
        with pytest.raises(BadInputError) as e:
            runtime(PROMPTS, seed=0, **kw)
        assert str(e.value).startswith(subject) and problem in str(e.value), (kw, str(e.value))
    plain = Pipeline.from_bundle(diffusion_bundle, backend="ort-cpu", precision="fp32")
    with pytest.raises(BadInputError, match="no IP-Adapter"):
        plain("a cat", seed=0, ip_adapter_image=reference_image())
    # export refuses what is not a plain IP-Adapter in diffusers' layout
    import shutil

    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(adapter, tmp_path / "plus")
    weights = load_file(broken / "ip-adapter.safetensors")
    save_file(
        {k: v for k, v in weights.items() if k != "image_proj.proj.weight"}, broken / "ip-adapter.safetensors"
    )
    for wrong, problem in ((broken, "not a plain IP-Adapter"), (tmp_path / "empty", "no image_encoder")):
        with pytest.raises(CheckpointError, match=problem):
            load_family(diffusion_checkpoint, ip_adapter=wrong)


def test_cli_generate_and_inspect(bundle, tmp_path, capsys):
    ref = tmp_path / "ref.png"
    Image.fromarray(reference_image()).convert("RGBA").save(ref)
    out = tmp_path / "out.png"
    argv = ["generate", "a cat", "--bundle", str(bundle), "--seed", "3", "-o", str(out), "--json"]
    assert main([*argv, "--ip-adapter-image", str(ref), "--ip-adapter-scale", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] and Image.open(out).size == (32, 32)
    assert main(["inspect", str(bundle)]) == 0
    assert "ip_adapter CLIP image encoder at 32px" in capsys.readouterr().out


def test_with_a_controlnet_matches_diffusers(controlnet_checkpoint, tmp_path):
    """Both conditionings in one bundle (a fused graph takes ids and noise, then the adapter's inputs, then
    the ControlNet's) against StableDiffusionControlNetPipeline with load_ip_adapter, fused and loop."""
    from edgegen.export import export_checkpoint
    from edgegen.export.testing import make_tiny_ip_adapter
    from test_controlnet import control_image

    checkpoint = controlnet_checkpoint
    adapter = make_tiny_ip_adapter(tmp_path / "adapter", checkpoint)
    bundle = export_checkpoint(
        checkpoint, tmp_path / "b", progress=False, family_options={"ip_adapter": adapter, "fused_steps": [2]}
    )
    reference = with_ip_adapter(
        diffusers.StableDiffusionControlNetPipeline.from_pretrained(checkpoint, local_files_only=True),
        adapter,
    )
    reference.set_ip_adapter_scale(0.7)
    pipe = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32")
    latents = torch.from_numpy(NoiseStreams(SEEDS).draw(pipe.latent_shape))
    for guidance, path in ((0.0, "fused_k2"), (3.0, "loop")):
        want = reference(
            PROMPTS,
            image=Image.fromarray(control_image()),
            height=32,
            width=32,
            ip_adapter_image=Image.fromarray(reference_image()),
            num_inference_steps=2,
            guidance_scale=guidance,
            controlnet_conditioning_scale=0.8,
            latents=latents,
            output_type="np",
        ).images
        got = pipe(
            PROMPTS,
            seed=SEEDS,
            num_inference_steps=2,
            guidance_scale=guidance,
            control_image=control_image(),
            controlnet_conditioning_scale=0.8,
            ip_adapter_image=reference_image(),
            ip_adapter_scale=0.7,
            output_type="uint8",
        )
        assert levels(got, as_uint8(want)) <= LEVELS and pipe.last_call.path == path

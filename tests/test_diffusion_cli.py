"""Diffusion bundles through the CLI (export refusals, generate, img2img, inspect, validate, bench) and
the export-side rewrite of diffusers' upsampling layers."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from edgegen.runtime import BadInputError  # noqa: E402
from edgegen.runtime.cli import _diffusion_options, main  # noqa: E402


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_and_img2img(diffusion_bundle, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, text, _ = run(
        capsys,
        "generate",
        "a cat",
        "--bundle",
        str(diffusion_bundle),
        "--seed",
        "4",
        "--steps",
        "2",
        "-o",
        str(out),
        "--json",
    )
    assert code == 0 and json.loads(text)["seeds"] == [4]
    from PIL import Image

    first = np.asarray(Image.open(out))
    assert first.shape == (32, 32, 3)
    edited = tmp_path / "edited.png"
    code, text, _ = run(
        capsys,
        "generate",
        "a dog",
        "--bundle",
        str(diffusion_bundle),
        "--seed",
        "4",
        "--image",
        str(out),
        "--strength",
        "0.5",
        "--scheduler",
        "euler_a",
        "-o",
        str(edited),
    )
    assert code == 0 and edited.is_file()
    assert not np.array_equal(np.asarray(Image.open(edited)), first)
    guided = tmp_path / "guided.png"
    code, _, _ = run(
        capsys,
        "generate",
        "a cat",
        "--bundle",
        str(diffusion_bundle),
        "--seed",
        "4",
        "--steps",
        "2",
        "--guidance-scale",
        "3",
        "--negative-prompt",
        "a dog",
        "-o",
        str(guided),
    )
    assert code == 0 and not np.array_equal(np.asarray(Image.open(guided)), first)
    code, _, err = run(
        capsys,
        "generate",
        "a cat",
        "--bundle",
        str(diffusion_bundle),
        "--image",
        str(tmp_path / "none.png"),
        "-o",
        str(tmp_path / "x.png"),
    )
    assert code == 2 and "--image" in err


def test_diffusion_options_are_refused_for_other_families():
    args = SimpleNamespace(
        steps=2,
        negative_prompt=None,
        guidance_scale=None,
        scheduler=None,
        strength=None,
        image="no-such-file.png",
        control_image=None,
        controlnet_conditioning_scale=None,
        ip_adapter_image=None,
        ip_adapter_scale=None,
    )
    # refused before --image is read
    with pytest.raises(BadInputError, match="only for diffusion bundles") as refused:
        _diffusion_options(args, SimpleNamespace(bundle=SimpleNamespace(family="gan")))
    assert refused.value.subject == "--steps, --image"


def test_diffusion_options_are_passed_by_diffusers_names():
    args = SimpleNamespace(
        steps=2,
        negative_prompt="a dog",
        guidance_scale=1.5,
        scheduler="lcm",
        strength=None,
        image=None,
        control_image=None,
        controlnet_conditioning_scale=None,
        ip_adapter_image=None,
        ip_adapter_scale=None,
    )
    options = _diffusion_options(args, SimpleNamespace(bundle=SimpleNamespace(family="diffusion")))
    assert options == {
        "num_inference_steps": 2,
        "negative_prompt": "a dog",
        "guidance_scale": 1.5,
        "scheduler": "lcm",
    }


def test_inspect_validate_bench(diffusion_bundle, capsys):
    code, text, _ = run(capsys, "inspect", str(diffusion_bundle), "--json")
    manifest = json.loads(text)["manifest"]
    assert code == 0 and manifest["family"] == "diffusion"
    assert set(manifest["components"]) == {
        "text_encoder",
        "unet",
        "vae_decoder",
        "vae_encoder",
        "fused",
        "fused_k2",
        "fused_k4",
    }
    assert manifest["generation"]["scheduler"]["name"] == "euler"
    code, text, _ = run(capsys, "validate", str(diffusion_bundle), "--backend", "ort-cpu", "--json")
    report = json.loads(text)
    assert code == 0 and report["ok"]
    assert report["precisions"]["fp32"]["parity"]["unet"]["max_abs"] <= 1e-3
    code, text, _ = run(
        capsys,
        "bench",
        str(diffusion_bundle),
        "--backend",
        "ort-cpu",
        "--iterations",
        "3",
        "--warmup",
        "1",
        "--mode",
        "loop",
        "--json",
    )
    result = json.loads(text)["runs"][0]
    assert code == 0 and result["path"] == "loop"
    assert {"text_encoder", "unet_1", "vae_decoder"} <= set(result["stages_ms"])
    assert (
        result["stages_ms"]["unet_1"]["engine"]
        and 0 < result["engine_ms"]["p50"] <= result["end_to_end_ms"]["p50"]
    )


def test_int8_is_refused_and_leaves_nothing(diffusion_checkpoint, tmp_path):
    from edgegen.export import export_checkpoint

    with pytest.raises(BadInputError, match="int8 is not supported for the diffusion family"):
        export_checkpoint(diffusion_checkpoint, tmp_path / "b", precisions="fp32,int8", progress=False)
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())
    with pytest.raises(BadInputError, match="image-size"):
        export_checkpoint(
            diffusion_checkpoint, tmp_path / "b", progress=False, family_options={"image_size": 20}
        )


@pytest.mark.parametrize(
    "entry, refusal",
    [
        (
            {"image_encoder": ["transformers", "CLIPVisionModelWithProjection"]},
            r"has a image_encoder component \(CLIPVisionModelWithProjection\)",
        ),
        ({"controlnet": ["diffusers", "MultiControlNetModel"]}, r"its controlnet is a MultiControlNetModel"),
        (
            {"controlnet": ["diffusers", "ControlNetModel"]},
            r"holds no diffusers ControlNet",
        ),  # no controlnet/
        (
            {"vae": ["diffusers", "AsymmetricAutoencoderKL"]},
            r"its vae is a AsymmetricAutoencoderKL.*Note: .*AutoencoderKL or AutoencoderTiny",
        ),
    ],
)
def test_unsupported_components_are_refused(diffusion_checkpoint, tmp_path, entry, refusal):
    """Never dropped (an IP-Adapter's image encoder) nor an internal error (another VAE or ControlNet class, a
    missing ControlNet): a CheckpointError, and no bundle."""
    import shutil

    from edgegen.export import export_checkpoint
    from edgegen.runtime.errors import CheckpointError

    ckpt = shutil.copytree(diffusion_checkpoint, tmp_path / "ckpt")
    index = json.loads((ckpt / "model_index.json").read_text())
    (ckpt / "model_index.json").write_text(json.dumps({**index, **entry}))
    with pytest.raises(CheckpointError, match=refusal):
        export_checkpoint(ckpt, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_subpixel_upsampling_equals_diffusers():
    """The traced graphs replace nearest-2x + 3x3 conv by a 2x2 conv + pixel shuffle: same values."""
    from diffusers.models.upsampling import Upsample2D
    from edgegen.export.families.diffusion import UpsampleConv, upsamplers_as_subpixel

    torch.manual_seed(0)
    up = Upsample2D(6, use_conv=True, out_channels=5)
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        want = up(x)
        got = UpsampleConv(up.conv)(x)
    assert got.shape == want.shape == (2, 5, 10, 14)
    assert float((got - want).abs().max()) < 1e-5
    model = torch.nn.Sequential(up)
    with upsamplers_as_subpixel(model) as swapped:
        assert swapped == 1 and isinstance(model[0], UpsampleConv)
    assert model[0] is up

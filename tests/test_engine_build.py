"""`edgegen engines BUNDLE --flavour ...`: engines built for an existing bundle with the lean runtime alone,
written into it atomically. Built with TensorRT for RTX on this CPU-only machine (ahead of time, for compute
capability 8.9); the switch-over and failure cases use a stand-in builder so they run in milliseconds."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from edgegen.runtime import (
    BackendUnavailableError,
    BadInputError,
    Bundle,
    ValidationFailedError,
    engine_build,
)
from edgegen.runtime.cli import main
from edgegen.runtime.engine_build import STAGING_PREFIX, add_engines
from gpu_emulation import needs_trt_rtx, trt

COMPONENTS = ("text_encoder", "generator", "fused")


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """A private user cache (where the machine's timing cache lives) for every test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEGEN_CACHE", str(cache))
    return cache


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) by relative path -> sha256 of its bytes."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def engines_cli(capsys, *argv):
    code = main(["engines", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def fake_builder(monkeypatch, fail_at=None, error=None):
    """Replace the TensorRT build of one engine by a stand-in (bytes naming the engine; the timing cache
    grows by one byte per build); with ``fail_at``, the build of that engine (1-based) raises ``error``."""
    built = []

    def build_one(trt, logger, onnx_path, what, *args, **kwargs):
        cache = args[-1]
        if fail_at is not None and len(built) + 1 == fail_at:
            raise error
        built.append(what)
        return f"engine {what}".encode() * 100, cache + b"t"

    monkeypatch.setattr(engine_build, "_build_one", build_one)
    return built


# ---------------------------------------------------------------- real builds (TensorRT for RTX, no GPU)


@pytest.mark.tensorrt
@needs_trt_rtx
def test_engines_command_writes_engines_into_the_bundle(capsys, bundle_copy):
    before = json.loads((bundle_copy / "manifest.json").read_text())
    code, out, err = engines_cli(
        capsys, bundle_copy, "--flavour", "trt-rtx", "--compute-capability", "8.9", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    rel_dir = f"engines/trt-rtx-{trt.__version__}-sm89"
    assert result["ok"] and result["dir"] == rel_dir and result["replaced"] == 0
    bundle = Bundle.open(bundle_copy)  # every file, engines included, matches its hash
    manifest = bundle.manifest
    engines = manifest["engines"]
    assert {(e["component"], e["form"]) for e in engines} == {
        (c, "fp32") for c in COMPONENTS
    }  # fp32-only bundle
    for e in engines:
        assert (
            e["flavour"] == "trt-rtx" and e["version"] == trt.__version__ and e["compute_capability"] == "8.9"
        )
        assert e["file"] == f"{rel_dir}/{e['component']}.fp32.engine" and e["file"] in manifest["files"]
        assert e["onnx"] == f"onnx/{e['component']}.fp32.onnx"
        assert (
            e["onnx_sha256"] == manifest["files"][e["onnx"]]["sha256"] == before["files"][e["onnx"]]["sha256"]
        )
        assert (
            e["profile"] == {"min_batch": 1, "opt_batch": 1, "max_batch": 16, "sequence": 16}
            and e["strongly_typed"]
        )
        assert (bundle_copy / e["file"]).stat().st_size > 10_000
    new_files = set(manifest["files"]) - set(before["files"])
    assert new_files == {f"{rel_dir}/{c}.fp32.engine" for c in COMPONENTS} | {
        f"{rel_dir}/timing.cache",
        f"{rel_dir}/build.json",
    }
    # nothing else in the manifest changed, and nothing was left behind
    assert {k: v for k, v in manifest.items() if k not in ("engines", "files")} == {
        k: v for k, v in before.items() if k not in ("engines", "files")
    }
    assert all(manifest["files"][rel] == entry for rel, entry in before["files"].items())
    assert not list(bundle_copy.glob(".*"))
    build = json.loads((bundle_copy / rel_dir / "build.json").read_text())
    assert (
        build == result["build"]
        and build["timing_cache_source"] is None
        and build["timing_cache_bytes_after"] > 0
    )
    # a real TensorRT-RTX engine: it passes every check up to the missing GPU
    from edgegen.runtime import cudart
    from edgegen.runtime.engines import load_engine

    if not cudart.gpu_status()["available"]:
        with pytest.raises(BackendUnavailableError, match="TensorRT-RTX cannot run it here"):
            load_engine(
                bundle, "trt-rtx", "fused", "fp32", trt=trt, version=trt.__version__, compute_capability="8.9"
            )


@pytest.mark.tensorrt
@needs_trt_rtx
def test_a_second_run_reuses_the_timing_cache_and_replaces_the_engines(capsys, bundle_copy, user_cache):
    assert (
        engines_cli(capsys, bundle_copy, "--flavour", "trt-rtx", "--compute-capability", "8.9", "--quiet")[0]
        == 0
    )
    rel_dir = f"engines/trt-rtx-{trt.__version__}-sm89"
    first = json.loads((bundle_copy / rel_dir / "build.json").read_text())
    code, out, err = engines_cli(capsys, bundle_copy, "--flavour", "trt-rtx", "--compute-capability", "8.9")
    assert code == 0 and "replaced 3 older ones" in out and "timing cache from the user cache" in out
    assert "engine 3/3" in err  # progress on stderr
    second = json.loads((bundle_copy / rel_dir / "build.json").read_text())
    assert second["timing_cache_source"] == "user cache"
    assert second["timing_cache_bytes_before"] == first["timing_cache_bytes_after"] > 0
    manifest = Bundle.open(bundle_copy).manifest
    assert len(manifest["engines"]) == 3  # replaced, not added
    # a machine without the user cache starts from the bundle's own copy for this flavour, version and GPU
    shutil.rmtree(user_cache)
    result = add_engines(bundle_copy, "trt-rtx", "8.9", progress=False)
    assert (
        result["build"]["timing_cache_source"] == "bundle"
        and result["build"]["timing_cache_bytes_before"] > 0
    )
    # engines for another GPU sit beside these ones
    add_engines(bundle_copy, "trt-rtx", "8.6", progress=False)
    manifest = Bundle.open(bundle_copy).manifest
    assert sorted(e["compute_capability"] for e in manifest["engines"]) == ["8.6"] * 3 + ["8.9"] * 3


BLOCKER = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "diffusers", "onnx", "onnxscript"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
from edgegen.runtime.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "diffusers", "onnx")
                or m.startswith("edgegen.export"))
print("LEAKED", leaked, file=sys.stderr)
sys.exit(code if not leaked else 99)
"""


@pytest.mark.tensorrt
@needs_trt_rtx
def test_engines_command_runs_without_torch(bundle_copy, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKER,
            "engines",
            str(bundle_copy),
            "--flavour",
            "trt-rtx",
            "--compute-capability",
            "8.9",
            "--json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGEGEN_CACHE": str(tmp_path / "c")},
    )
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stderr
    assert len(json.loads(result.stdout)["engines"]) == 3
    assert len(Bundle.open(bundle_copy).manifest["engines"]) == 3


# ---------------------------------------------------------------- failures leave the bundle as it was


@needs_trt_rtx
@pytest.mark.parametrize(
    "error",
    [ValidationFailedError("engine generator.fp32", "TensorRT failed to build it"), KeyboardInterrupt()],
)
def test_a_failed_or_interrupted_build_leaves_the_bundle_byte_identical(bundle_copy, monkeypatch, error):
    fake_builder(monkeypatch)
    add_engines(bundle_copy, "trt-rtx", "8.9", progress=False)  # engines there already: the replace path
    before = snapshot(bundle_copy)
    built = fake_builder(monkeypatch, fail_at=2, error=error)
    with pytest.raises(type(error)):
        add_engines(bundle_copy, "trt-rtx", "8.9", progress=False)
    assert built == ["text_encoder.fp32"]  # it failed mid-way, after writing one engine
    assert snapshot(bundle_copy) == before
    Bundle.open(bundle_copy)


@needs_trt_rtx
def test_a_failed_first_build_leaves_the_bundle_byte_identical(capsys, bundle_copy, monkeypatch):
    before = snapshot(bundle_copy)
    fake_builder(
        monkeypatch,
        fail_at=3,
        error=ValidationFailedError("engine fused.fp32", "TensorRT failed to build it"),
    )
    code, out, err = engines_cli(
        capsys, bundle_copy, "--flavour", "trt-rtx", "--compute-capability", "8.9", "--quiet"
    )
    assert (
        code == 1
        and err.startswith("edgegen: engine fused.fp32 | TensorRT failed")
        and len(err.splitlines()) == 1
    )
    assert snapshot(bundle_copy) == before


class Crash(BaseException):
    """The process dying at this point (nothing after it runs but the cleanup a kill would skip)."""


@needs_trt_rtx
@pytest.mark.parametrize("crash_at", range(4))
def test_the_bundle_verifies_whatever_step_of_the_switch_is_cut_short(bundle_copy, monkeypatch, crash_at):
    """The switch is: manifest without the old engines, old directory aside, new directory in, new manifest.
    Cut before step ``crash_at``, the bundle still verifies and holds the old engines or none of this set;
    the next run completes it."""
    fake_builder(monkeypatch)
    add_engines(bundle_copy, "trt-rtx", "8.9", progress=False)
    old = Bundle.open(bundle_copy).manifest["engines"]
    real_switch, real_write, real_rename = engine_build._switch, engine_build._write, Path.rename
    steps = []

    def counted(fn):
        def step(*args):
            if len(steps) == crash_at:
                raise Crash
            steps.append(fn.__name__)
            return fn(*args)

        return step

    def switch(*args):
        monkeypatch.setattr(engine_build, "_write", counted(real_write))
        monkeypatch.setattr(Path, "rename", counted(real_rename))
        try:
            return real_switch(*args)
        finally:
            monkeypatch.setattr(engine_build, "_write", real_write)
            monkeypatch.setattr(Path, "rename", real_rename)

    monkeypatch.setattr(engine_build, "_switch", switch)
    with pytest.raises(Crash):
        add_engines(bundle_copy, "trt-rtx", "8.9", progress=False)
    assert steps == ["_write", "rename", "rename", "_write"][:crash_at]
    engines = Bundle.open(bundle_copy).manifest["engines"]
    assert engines == (old if crash_at == 0 else [])
    monkeypatch.setattr(engine_build, "_switch", real_switch)
    add_engines(bundle_copy, "trt-rtx", "8.9", progress=False)
    assert len(Bundle.open(bundle_copy).manifest["engines"]) == 3


@needs_trt_rtx
def test_an_interrupt_during_the_switch_waits_until_it_is_done(bundle_copy, monkeypatch):
    fake_builder(monkeypatch)
    real_switch, handler = engine_build._switch, signal.getsignal(signal.SIGINT)

    def switch(*args):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between two renames
        return real_switch(*args)

    monkeypatch.setattr(engine_build, "_switch", switch)
    with pytest.raises(KeyboardInterrupt):
        add_engines(bundle_copy, "trt-rtx", "8.9", progress=False)
    assert len(Bundle.open(bundle_copy).manifest["engines"]) == 3  # switched over completely, then stopped
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_bad_options_are_refused_before_anything_is_built(capsys, bundle_copy, monkeypatch):
    before = snapshot(bundle_copy)
    monkeypatch.setattr(engine_build, "_build_one", lambda *a: pytest.fail("built despite a bad option"))
    cases = [
        (
            ["--flavour", "trt-rtx", "--compute-capability", "89"],
            2,
            "--compute-capability | expected MAJOR.MINOR",
        ),
        (["--flavour", "trt-rtx", "--compute-capability", "8.9", "--workspace-mb", "0"], 2, "--workspace-mb"),
        (["--flavour", "trt", "--compute-capability", "8.7"], 1, r"\(tensorrt\) is not installed"),
    ]
    if trt is not None:
        cases.append(
            (
                ["--flavour", "trt-rtx", "--compute-capability", "1.0"],
                2,
                "1.0 is not a target of this TensorRT",
            )
        )
    for argv, code, fragment in cases:
        got, out, err = engines_cli(capsys, bundle_copy, *argv)
        assert (
            got == code
            and len(err.splitlines()) == 1
            and err.startswith("edgegen: ")
            and re.search(fragment, err)
        ), err
    assert snapshot(bundle_copy) == before


@needs_trt_rtx
def test_trt_rtx_without_a_gpu_needs_a_compute_capability(bundle_copy):
    if engine_build.local_compute_capability() is not None:
        pytest.skip("a GPU is present: the build targets it")
    with pytest.raises(BadInputError, match="no CUDA GPU here to build for.*--compute-capability"):
        add_engines(bundle_copy, "trt-rtx", progress=False)


def test_a_damaged_bundle_is_refused_before_building(bundle_copy, monkeypatch):
    from edgegen.runtime import BadBundleError

    monkeypatch.setattr(engine_build, "_build_one", lambda *a: pytest.fail("built from a damaged bundle"))
    path = bundle_copy / "onnx" / "generator.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BadBundleError, match="does not match its sha256"):
        add_engines(bundle_copy, "trt-rtx", "8.9", progress=False)
    assert not list(bundle_copy.glob(STAGING_PREFIX + "*"))


def test_rebuild_commands_point_at_edgegen_engines(bert_bundle):
    from edgegen.runtime.engines import rebuild_hint

    hint = rebuild_hint(Bundle.open(bert_bundle, verify_hashes=False), "trt")
    assert hint.startswith(f"edgegen engines {bert_bundle} --flavour trt") and "export" not in hint


# -------------------------------------------------------- the desk check's fixes (issue 24), fake TensorRT


class FakeTimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return self.data


class FakeBuilderConfig:
    """TensorRT's IBuilderConfig as far as _build_one uses it: a timing cache from "another device" (any
    bytes but ``accepted``) is refused with False, and then get_timing_cache() returns None."""

    def __init__(self, accepted: bytes):
        self.accepted, self.cache = accepted, None

    def set_memory_pool_limit(self, pool, size):
        pass

    def create_timing_cache(self, data):
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.data not in (b"", self.accepted):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def add_optimization_profile(self, profile):
        pass


def fake_tensorrt(accepted: bytes):
    def build(network, config):
        if config.cache is not None:
            config.cache.data += b"+measured"  # the build adds its timings to the cache it was given
        return b"engine"

    builder = SimpleNamespace(
        create_network=lambda flags: SimpleNamespace(num_inputs=0),
        create_builder_config=lambda: FakeBuilderConfig(accepted),
        create_optimization_profile=lambda: None,
        build_serialized_network=build,
    )
    return SimpleNamespace(
        __version__="10.3.0.30",
        Builder=lambda logger: builder,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0),
        OnnxParser=lambda network, logger: SimpleNamespace(parse_from_file=lambda path: True),
        MemoryPoolType=SimpleNamespace(WORKSPACE=0),
    )


def build_with_cache(cache: bytes, accepted: bytes):
    notes = []
    blob, after = engine_build._build_one(
        fake_tensorrt(accepted),
        None,
        Path("fused.fp16.onnx"),
        "fused.fp16",
        "onnx/fused.fp16.onnx",
        "trt",
        "9.0",
        64,
        4,
        16,
        cache,
        notes=notes,
    )
    return blob, after, notes


def test_a_timing_cache_from_another_gpu_is_replaced_by_a_fresh_one():
    blob, after, notes = build_with_cache(b"from an RTX 4090", accepted=b"from this H200")
    assert blob == b"engine" and after == b"+measured"  # a fresh cache, filled by this build
    assert notes == [
        "fused.fp16: the timing cache (16 bytes) was made on another GPU or TensorRT version; "
        "started a fresh one (this build measures every kernel again)"
    ]


def test_a_timing_cache_from_this_gpu_is_reused():
    assert build_with_cache(b"from this H200", accepted=b"from this H200")[1:] == (
        b"from this H200+measured",
        [],
    )
    assert build_with_cache(b"", accepted=b"from this H200")[1:] == (b"+measured", [])


def test_engines_with_tensorrt_older_than_10_are_refused_before_building(bundle_copy, monkeypatch):
    monkeypatch.setattr(
        engine_build, "import_flavour", lambda flavour: SimpleNamespace(__version__="8.6.2.3")
    )
    monkeypatch.setattr(engine_build, "_build_one", lambda *a, **k: pytest.fail("built with TensorRT 8.6"))
    before = snapshot(bundle_copy)
    with pytest.raises(
        BackendUnavailableError,
        match=r"TensorRT 8.6.2.3 is too old: edgegen's engines need "
        r"TensorRT >= 10 \(strongly typed networks\). Note: upgrade TensorRT",
    ):
        add_engines(bundle_copy, "trt", progress=False)
    assert snapshot(bundle_copy) == before


# ---------------------------------------------------------------- refittable engines (LoRAs merged at load)


@pytest.mark.tensorrt
@needs_trt_rtx
def test_the_lora_targets_are_weights_tensorrt_can_mark_refittable(diffusion_bundle):
    """TensorRT for RTX's real ONNX parser and network (no GPU): every initializer a LoRA may target, in the
    UNet graph and a fused graph, is a weight the network can mark refittable by that name; a name it does
    not have is refused. Building the marked engine needs a GPU (TensorRT for RTX 1.7 compiles refittable
    weights' kernels at build time), and a real refit is not exercised here."""
    from edgegen.runtime.engine_build import mark_refittable
    from edgegen.runtime.engines import collecting_logger
    from edgegen.runtime.lora import target_initializers

    bundle = Bundle.open(diffusion_bundle)
    for component in ("unet", "fused"):
        logger = collecting_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert parser.parse_from_file(str(bundle.onnx_path(component, "fp32")))
        config = builder.create_builder_config()
        names = target_initializers(bundle, component, "fp32")
        assert len(names) > 20
        mark_refittable(trt, network, config, names, component)
        assert config.get_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        assert all(network.are_weights_marked_refittable(n) for n in names)
        with pytest.raises(ValidationFailedError, match="no weight 'no-such-weight'"):
            mark_refittable(trt, network, config, ["no-such-weight"], component)


def test_refittable_engines_mark_what_a_lora_may_target(diffusion_bundle, bert_bundle, tmp_path, monkeypatch):
    """--refittable marks, in each graph, exactly the initializers the manifest's LoRA targets point at
    (the UNet's and text encoder's, in every fused graph too), and records it; the VAE's engines, which no
    LoRA reaches, are built plain (not refittable). A bundle without LoRA targets is refused before
    anything is built."""
    from edgegen.runtime.lora import target_initializers

    bundle = Path(shutil.copytree(diffusion_bundle, tmp_path / "b"))
    asked = {}

    def build_one(trt, logger, onnx_path, what, *args, refit_names=None, **kwargs):
        asked[what] = refit_names
        return b"engine " + what.encode(), args[-1] + b"t"

    monkeypatch.setattr(engine_build, "_build_one", build_one)
    result = add_engines(bundle, "trt-rtx", "8.9", progress=False, refittable=True)
    opened = Bundle.open(bundle)
    vae = ("vae_decoder", "vae_encoder")
    assert result["build"]["refittable"]
    assert any(e["component"] in vae for e in opened.manifest["engines"])
    for e in opened.manifest["engines"]:
        assert e["refittable"] == (e["component"] not in vae), e["file"]
    for what, names in asked.items():
        component, form = what.split(".")
        if component in vae:
            assert names is None and not target_initializers(opened, component, form), what
        else:
            assert names and names == target_initializers(opened, component, form), what
    assert len(asked["fused.fp32"]) == len(asked["unet.fp32"]) + len(asked["text_encoder.fp32"])
    with pytest.raises(BadInputError, match="records no weights a LoRA may target"):
        add_engines(Path(shutil.copytree(bert_bundle, tmp_path / "g")), "trt-rtx", "8.9", refittable=True)

"""TensorRT engines: built with TensorRT for RTX on this CPU-only machine (ahead of time for a named GPU) by
`edgegen export --engines`, recorded in the manifest, and refused on a machine they were not built for.
`edgegen engines` on an existing bundle (the same builder) is tested in test_engine_build.py."""

import copy
import json

import pytest
from edgegen.runtime import BackendUnavailableError, BadBundleError, Bundle, EngineMismatchError
from edgegen.runtime.engines import check_sources, select_engines
from gpu_emulation import needs_trt_rtx, trt


@pytest.fixture(scope="module")
def engine_bundle(tiny_checkpoints, tmp_path_factory, monkeypatch_module):
    from edgegen.export import export_checkpoint

    monkeypatch_module.setenv("EDGEGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
    return export_checkpoint(
        tiny_checkpoints["bert"],
        tmp_path_factory.mktemp("e") / "b",
        precisions="fp16,int8",
        engines="trt-rtx",
        compute_capability="8.9",
        progress=False,
    )


def _build_record(root) -> dict:
    """engines/<dir>/build.json of the bundle's (only) engine directory: how the engines were built."""
    [path] = (root / "engines").glob("*/build.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.tensorrt
@needs_trt_rtx
def test_engines_written_and_recorded(engine_bundle):
    bundle = Bundle.open(engine_bundle)  # verifies every engine's hash
    engines = bundle.manifest["engines"]
    assert {(e["component"], e["form"]) for e in engines} == {
        (c, f) for c in ("text_encoder", "generator", "fused") for f in ("fp16", "int8-qdq")
    }
    for e in engines:
        assert (
            e["flavour"] == "trt-rtx" and e["version"] == trt.__version__ and e["compute_capability"] == "8.9"
        )
        assert (
            e["file"].startswith(f"engines/trt-rtx-{trt.__version__}-sm89/")
            and e["file"] in bundle.manifest["files"]
        )
        assert e["onnx_sha256"] == bundle.manifest["files"][e["onnx"]]["sha256"] and e["strongly_typed"]
        assert e["profile"] == {"min_batch": 1, "opt_batch": 1, "max_batch": 16, "sequence": 16}
        assert (engine_bundle / e["file"]).stat().st_size > 10_000
    build = _build_record(engine_bundle)
    assert build["timing_cache"] in bundle.manifest["files"] and build["timing_cache_bytes_after"] > 0
    assert f"{build['dir']}/build.json" in bundle.manifest["files"]


@pytest.mark.tensorrt
@needs_trt_rtx
def test_rebuild_reuses_the_timing_cache(engine_bundle, tiny_checkpoints, tmp_path):
    from edgegen.export import export_checkpoint

    again = export_checkpoint(
        tiny_checkpoints["bert"],
        tmp_path / "b",
        precisions="fp16",
        engines="trt-rtx",
        compute_capability="8.9",
        progress=False,
    )
    Bundle.open(again)
    build = _build_record(again)
    assert build["timing_cache_bytes_before"] > 0  # the cache of the first build was loaded


@pytest.mark.tensorrt
@needs_trt_rtx
def test_corrupt_engine_is_refused(engine_bundle, tmp_path):
    import shutil

    root = shutil.copytree(engine_bundle, tmp_path / "b")
    engine = root / json.loads((root / "manifest.json").read_text())["engines"][0]["file"]
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 1
    engine.write_bytes(bytes(data))
    with pytest.raises(BadBundleError, match="sha256"):
        Bundle.open(root)


# The compatibility rules need no TensorRT: they read the manifest.
MANIFEST = {
    "files": {"onnx/fused.fp16.onnx": {"sha256": "abc", "bytes": 1}},
    "engines": [
        {
            "flavour": "trt-rtx",
            "version": "1.7.1.116",
            "compute_capability": "8.9",
            "component": "fused",
            "form": "fp16",
            "file": "engines/x/fused.fp16.engine",
            "onnx": "onnx/fused.fp16.onnx",
            "onnx_sha256": "abc",
        }
    ],
}
HINT = "edgegen engines B --flavour trt-rtx"


def test_engine_for_this_machine_is_selected():
    entries = select_engines(MANIFEST, "trt-rtx", "1.7.1.116", "8.9", HINT)
    assert len(entries) == 1
    check_sources(MANIFEST, entries)


def test_version_mismatch_refused_with_rebuild_command():
    with pytest.raises(
        EngineMismatchError, match=r"built with trt-rtx 1\.7\.1\.116, this machine has 1\.8\.0"
    ) as e:
        select_engines(MANIFEST, "trt-rtx", "1.8.0", "8.9", HINT)
    assert HINT in str(e.value) and "ort-cuda" in str(e.value)


def test_compute_capability_mismatch_refused():
    with pytest.raises(EngineMismatchError, match="built for compute capability 8.9, this GPU is 8.7"):
        select_engines(MANIFEST, "trt-rtx", "1.7.1.116", "8.7", HINT)


def test_missing_engines_refused():
    with pytest.raises(BackendUnavailableError, match="no engines of this flavour"):
        select_engines(MANIFEST, "trt", "10.3", "8.7", HINT)


def test_engine_from_another_onnx_refused():
    m = copy.deepcopy(MANIFEST)
    m["files"]["onnx/fused.fp16.onnx"]["sha256"] = "changed"
    with pytest.raises(EngineMismatchError, match="another version of onnx/fused.fp16.onnx"):
        check_sources(m, select_engines(m, "trt-rtx", "1.7.1.116", "8.9", HINT))


# -------------------------------------------------------- the runtime's checks, on a machine without a GPU


@pytest.mark.tensorrt
@needs_trt_rtx
def test_rebuild_loads_exactly_the_first_builds_timing_cache(engine_bundle, tiny_checkpoints, tmp_path):
    from edgegen.export import export_checkpoint

    first = _build_record(engine_bundle)
    again = export_checkpoint(
        tiny_checkpoints["bert"],
        tmp_path / "b",
        precisions="fp16",
        engines="trt-rtx",
        compute_capability="8.9",
        progress=False,
    )
    build = _build_record(again)
    assert build["timing_cache_bytes_before"] >= first["timing_cache_bytes_after"] > 0
    assert build["timing_cache_bytes_after"] >= build["timing_cache_bytes_before"]


def _damaged(engine_bundle, tmp_path, change, rehash=True):
    """A copy of the engine bundle whose fused fp16 engine ``change(bytes)`` rewrote; with ``rehash`` the
    manifest is updated to match (a bundle that passes its hash checks but holds a bad engine)."""
    import hashlib
    import shutil

    root = shutil.copytree(engine_bundle, tmp_path / "damaged")
    manifest = json.loads((root / "manifest.json").read_text())
    entry = next(e for e in manifest["engines"] if e["component"] == "fused" and e["form"] == "fp16")
    path = root / entry["file"]
    path.write_bytes(change(path.read_bytes()))
    if rehash:
        manifest["files"][entry["file"]] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "bytes": path.stat().st_size,
        }
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _load(root_or_bundle, component="fused", form="fp16", cc="8.9", version=None):
    from edgegen.runtime.engines import load_engine

    bundle = root_or_bundle if isinstance(root_or_bundle, Bundle) else Bundle.open(root_or_bundle)
    return load_engine(
        bundle, "trt-rtx", component, form, trt=trt, version=version or trt.__version__, compute_capability=cc
    )


@pytest.mark.tensorrt
@needs_trt_rtx
def test_garbage_engine_with_matching_hash_is_refused_before_deserializing(engine_bundle, tmp_path):
    root = _damaged(engine_bundle, tmp_path, lambda b: b"\x00not an engine\x00" * (len(b) // 15))
    with pytest.raises(
        BadBundleError, match=r"fused\.fp16\.engine \| is not a valid TensorRT-RTX engine"
    ) as e:
        _load(root)
    assert f"edgegen engines {root} --flavour trt-rtx" in str(e.value)


@pytest.mark.tensorrt
@needs_trt_rtx
def test_engine_truncated_or_changed_after_the_bundle_was_opened_is_refused(engine_bundle, tmp_path):
    root = _damaged(engine_bundle, tmp_path, lambda b: b, rehash=False)
    bundle = Bundle.open(root)
    entry = next(e for e in bundle.manifest["engines"] if e["component"] == "fused" and e["form"] == "fp16")
    path = root / entry["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadBundleError, match=r"has \d+ bytes, manifest says \d+ \(truncated\?\)"):
        _load(bundle)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(BadBundleError, match="does not match its sha256"):
        _load(bundle)


@pytest.mark.tensorrt
@needs_trt_rtx
def test_truncated_engine_is_refused_when_the_bundle_opens(engine_bundle, tmp_path):
    root = _damaged(engine_bundle, tmp_path, lambda b: b[: len(b) // 3], rehash=False)
    with pytest.raises(BadBundleError, match=r"trt-rtx-.*fused\.fp16\.engine has \d+ bytes, manifest says"):
        Bundle.open(root)


@pytest.mark.tensorrt
@needs_trt_rtx
def test_missing_engine_for_a_component_and_form_is_refused(engine_bundle):
    bundle = Bundle.open(engine_bundle)
    with pytest.raises(
        BackendUnavailableError,
        match=r"no fused\.fp32 engine for trt-rtx .* on compute capability 8\.9 "
        r"\(built: .*fused\.fp16.*\)",
    ):
        _load(bundle, form="fp32")


@pytest.mark.tensorrt
@needs_trt_rtx
def test_mismatches_are_refused_before_the_engine_is_read(engine_bundle, monkeypatch):
    from edgegen.runtime import engines

    monkeypatch.setattr(
        engines, "read_engine", lambda *a: pytest.fail("read an engine it should have refused")
    )
    bundle = Bundle.open(engine_bundle)
    with pytest.raises(EngineMismatchError, match="built for compute capability 8.9, this GPU is 8.6") as e:
        _load(bundle, cc="8.6")
    assert f"edgegen engines {engine_bundle} --flavour trt-rtx" in str(e.value)
    with pytest.raises(
        EngineMismatchError, match=rf"built with trt-rtx {trt.__version__}, this machine has 9\.9\.9"
    ):
        _load(bundle, version="9.9.9")


@pytest.mark.tensorrt
@needs_trt_rtx
def test_a_good_engine_passes_every_check_up_to_the_gpu(engine_bundle):
    from edgegen.runtime import cudart

    if cudart.gpu_status()["available"]:
        pytest.skip("a GPU is present: test_gpu_backends.py runs the engines")
    with pytest.raises(BackendUnavailableError, match="TensorRT-RTX cannot run it here"):
        _load(Bundle.open(engine_bundle))


# ---------------------------------------------------------------- `auto` and named backends with engines


@pytest.fixture
def pretend_gpu(monkeypatch):
    """This machine as trt-rtx would see it with a GPU of compute capability ``cc``; the GPU itself is
    still missing, so anything past the checks fails the way it would without one."""
    from edgegen.runtime import backends, engines

    real, real_machine = backends.backend_loads, engines.machine

    def set_machine(cc="8.9", version=None):
        monkeypatch.setattr(backends, "backend_loads", lambda b: (True, "") if b == "trt-rtx" else real(b))
        monkeypatch.setattr(
            engines,
            "machine",
            lambda flavour: (
                (trt, version or trt.__version__, cc) if flavour == "trt-rtx" else real_machine(flavour)
            ),
        )

    yield set_machine
    real.cache_clear()  # nothing probed while pretending may outlive the test


@pytest.mark.tensorrt
@needs_trt_rtx
def test_auto_passes_over_engines_for_another_gpu_and_says_so(engine_bundle, pretend_gpu):
    from edgegen.runtime import Pipeline, cudart

    if cudart.gpu_status()["available"]:
        pytest.skip("a GPU is present: auto would also try the ORT GPU backends")
    pretend_gpu(cc="8.6")
    pipe = Pipeline.from_bundle(engine_bundle)
    assert pipe.backend == "ort-cpu"
    note = next(n for n in pipe.notes if n.startswith("trt-rtx skipped"))
    assert (
        "built for compute capability 8.9, this GPU is 8.6" in note and "(bundle engines (trt-rtx))" in note
    )
    assert [n.split(" skipped")[0] for n in pipe.notes] == ["trt", "trt-rtx", "ort-trt", "ort-cuda"]


@pytest.mark.tensorrt
@needs_trt_rtx
def test_auto_passes_over_engines_of_another_tensorrt_version(engine_bundle, pretend_gpu):
    from edgegen.runtime import Pipeline

    pretend_gpu(version="1.8.0.1")
    pipe = Pipeline.from_bundle(engine_bundle)
    assert pipe.backend != "trt-rtx"
    assert any(
        f"trt-rtx skipped: built with trt-rtx {trt.__version__}, this machine has 1.8.0.1" in n
        for n in pipe.notes
    )


@pytest.mark.tensorrt
@needs_trt_rtx
def test_auto_passes_over_engines_that_match_but_cannot_run(engine_bundle, pretend_gpu):
    from edgegen.runtime import Pipeline, cudart

    if cudart.gpu_status()["available"]:
        pytest.skip("a GPU is present")
    pretend_gpu(cc="8.9")  # the checks pass; opening the engine needs the GPU that is not there
    pipe = Pipeline.from_bundle(engine_bundle)
    assert pipe.backend == "ort-cpu"
    assert any(n.startswith("trt-rtx skipped: no usable NVIDIA GPU") for n in pipe.notes)


@pytest.mark.tensorrt
@needs_trt_rtx
def test_named_trt_rtx_with_engines_for_another_gpu_is_an_error(engine_bundle, pretend_gpu):
    from edgegen.runtime import Pipeline

    pretend_gpu(cc="8.6")
    with pytest.raises(EngineMismatchError, match="built for compute capability 8.9, this GPU is 8.6") as e:
        Pipeline.from_bundle(engine_bundle, backend="trt-rtx")
    assert f"edgegen engines {engine_bundle} --flavour trt-rtx" in str(
        e.value
    ) and "or use --backend ort-cuda" in str(e.value)


@pytest.mark.tensorrt
@needs_trt_rtx
def test_named_precision_without_engines_is_an_error(engine_bundle, pretend_gpu):
    from edgegen.runtime import Pipeline

    pretend_gpu(cc="8.9")
    with pytest.raises(BackendUnavailableError, match="no fp32 engines for this machine") as e:
        Pipeline.from_bundle(engine_bundle, backend="trt-rtx", precision="fp32")
    assert "engines exist for fp16, int8" in str(e.value)


@pytest.mark.tensorrt
@needs_trt_rtx
def test_auto_precision_on_trt_rtx_picks_a_precision_that_has_engines(engine_bundle, pretend_gpu):
    from edgegen.runtime.backends import engine_forms
    from edgegen.runtime.precision import choose_precision

    pretend_gpu(cc="8.9")
    bundle = Bundle.open(engine_bundle)
    forms = engine_forms(bundle, "trt-rtx")
    assert forms == {"fp16", "int8-qdq"}
    assert choose_precision(bundle, "auto", "trt-rtx", forms) in ("int8", "fp16")
    assert choose_precision(bundle, "auto", "trt-rtx", {"fp16"}) == "fp16"


@pytest.mark.tensorrt
@needs_trt_rtx
def test_doctor_does_not_fail_a_tensorrt_backend_for_a_bundle_without_fp32_engines(
    engine_bundle, pretend_gpu, monkeypatch
):
    from edgegen.runtime import doctor

    pretend_gpu(cc="8.9")
    monkeypatch.setattr(
        doctor, "backend_loads", lambda b: (True, "") if b == "trt-rtx" else (b == "ort-cpu", "no")
    )
    report = doctor.run_doctor(engine_bundle)
    entry = report["backends"]["trt-rtx"]
    assert entry["ok"] and entry["loads"] and not entry["checked"]
    assert "engines are fp16, int8-qdq; parity is checked at fp32" in entry["error"]
    pretend_gpu(cc="8.6")
    entry = doctor.run_doctor(engine_bundle)["backends"]["trt-rtx"]
    assert entry["ok"] and "not compared" in entry["error"] and "this GPU is 8.6" in entry["error"]

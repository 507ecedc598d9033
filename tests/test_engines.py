"""TensorRT engines: built with TensorRT for RTX on this CPU-only machine (ahead of time for a named GPU),
recorded in the manifest, and refused on a machine they were not built for."""
import copy
import json

import pytest

from edgegen.runtime import BackendUnavailableError, BadBundleError, Bundle, EngineMismatchError
from edgegen.runtime.engines import check_sources, import_flavour, select_engines


def _trt_rtx():
    try:
        return import_flavour("trt-rtx")
    except BackendUnavailableError:
        return None


trt = _trt_rtx()
needs_trt_rtx = pytest.mark.skipif(trt is None, reason="TensorRT for RTX is not installed (pip install 'edgegen[tensorrt-rtx]')")


@pytest.fixture(scope="module")
def engine_bundle(tiny_checkpoints, tmp_path_factory, monkeypatch_module):
    from edgegen.export import export_checkpoint
    monkeypatch_module.setenv("EDGEGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
    return export_checkpoint(tiny_checkpoints["bert"], tmp_path_factory.mktemp("e") / "b", precisions="fp16,int8",
                             engines="trt-rtx", compute_capability="8.9", progress=False)


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
        (c, f) for c in ("text_encoder", "generator", "fused") for f in ("fp16", "int8-qdq")}
    for e in engines:
        assert e["flavour"] == "trt-rtx" and e["version"] == trt.__version__ and e["compute_capability"] == "8.9"
        assert e["file"].startswith(f"engines/trt-rtx-{trt.__version__}-sm89/") and e["file"] in bundle.manifest["files"]
        assert e["onnx_sha256"] == bundle.manifest["files"][e["onnx"]]["sha256"] and e["strongly_typed"]
        assert e["profile"] == {"min_batch": 1, "opt_batch": 1, "max_batch": 16}
        assert (engine_bundle / e["file"]).stat().st_size > 10_000
    build = bundle.report()["engine_builds"][0]
    assert build["timing_cache"] in bundle.manifest["files"] and build["timing_cache_bytes_after"] > 0


@pytest.mark.tensorrt
@needs_trt_rtx
def test_rebuild_reuses_the_timing_cache(engine_bundle, tiny_checkpoints, tmp_path):
    from edgegen.export import export_checkpoint
    again = export_checkpoint(tiny_checkpoints["bert"], tmp_path / "b", precisions="fp16", engines="trt-rtx",
                              compute_capability="8.9", progress=False)
    build = Bundle.open(again).report()["engine_builds"][0]
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
MANIFEST = {"files": {"onnx/fused.fp16.onnx": {"sha256": "abc", "bytes": 1}},
            "engines": [{"flavour": "trt-rtx", "version": "1.7.1.116", "compute_capability": "8.9", "component": "fused",
                         "form": "fp16", "file": "engines/x/fused.fp16.engine", "onnx": "onnx/fused.fp16.onnx",
                         "onnx_sha256": "abc"}]}
HINT = "edgegen export CKPT -o B --engines trt-rtx --force"


def test_engine_for_this_machine_is_selected():
    entries = select_engines(MANIFEST, "trt-rtx", "1.7.1.116", "8.9", HINT)
    assert len(entries) == 1
    check_sources(MANIFEST, entries)


def test_version_mismatch_refused_with_rebuild_command():
    with pytest.raises(EngineMismatchError, match=r"built with trt-rtx 1\.7\.1\.116, this machine has 1\.8\.0") as e:
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

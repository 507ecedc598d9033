"""A damaged or hostile bundle is refused with a BadBundleError before any session is created."""

import json
import os

import onnxruntime
import pytest
from edgegen.runtime import BadBundleError, Bundle, Pipeline


def edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


@pytest.fixture
def no_sessions(monkeypatch):
    """Fail the test if anything creates an ONNX Runtime session."""

    def refuse(*a, **k):
        raise AssertionError("a session was created for a bundle that should have been refused")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def refused(bundle, *fragments):
    with pytest.raises(BadBundleError) as e:
        Pipeline.from_bundle(bundle, backend="ort-cpu")
    text = str(e.value)
    assert "Note:" in text, text
    for f in fragments:
        assert f in text, text
    return text


def test_intact_bundle_loads(bundle_copy):
    assert Bundle.open(bundle_copy).family == "gan"


def test_flipped_byte_in_onnx(bundle_copy, no_sessions):
    flip_byte(bundle_copy / "onnx" / "fused.fp32.onnx")
    refused(bundle_copy, "fused.fp32.onnx", "sha256")


def test_truncated_file(bundle_copy, no_sessions):
    p = bundle_copy / "onnx" / "generator.fp32.onnx"
    p.write_bytes(p.read_bytes()[:-10])
    refused(bundle_copy, "generator.fp32.onnx", "bytes")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "onnx/../../x", "..\\x".replace("\\", "/")])
def test_path_leaving_bundle(bundle_copy, no_sessions, bad):
    def change(m):
        m["files"][bad] = m["files"].pop("onnx/fused.fp32.onnx")
        m["components"]["fused"]["files"]["fp32"] = bad

    edit_manifest(bundle_copy, change)
    refused(bundle_copy, "leaves the bundle")


def test_symlink_leaving_bundle(bundle_copy, tmp_path, no_sessions):
    outside = tmp_path / "outside.onnx"
    target = bundle_copy / "onnx" / "fused.fp32.onnx"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    os.symlink(outside, target)
    refused(bundle_copy, "link")


def test_unknown_schema(bundle_copy, no_sessions):
    edit_manifest(bundle_copy, lambda m: m.update(schema="edgegen.bundle/99"))
    refused(bundle_copy, "unknown bundle schema", "edgegen.bundle/99")


def test_missing_file(bundle_copy, no_sessions):
    (bundle_copy / "onnx" / "text_encoder.fp32.onnx").unlink()
    refused(bundle_copy, "file missing", "text_encoder.fp32.onnx")


def test_unlisted_component_file(bundle_copy, no_sessions):
    def change(m):
        del m["files"]["onnx/fused.fp32.onnx"]

    edit_manifest(bundle_copy, change)
    refused(bundle_copy, "not listed")


@pytest.mark.parametrize("content", ["not json{", "[1, 2]", json.dumps({"schema": "edgegen.bundle/1"})])
def test_malformed_manifest(bundle_copy, no_sessions, content):
    (bundle_copy / "manifest.json").write_text(content)
    refused(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BadBundleError, match="no manifest.json"):
        Bundle.open(tmp_path)


def test_reference_outputs_name_an_output(bundle_copy, no_sessions):
    wrong = {"component": "fused", "output": "x"}
    edit_manifest(bundle_copy, lambda m: m["reference_outputs"].update(pixels=wrong))
    refused(bundle_copy, "reference_outputs['pixels']")


def test_reference_outputs_are_read_from_the_manifest(bundle_copy):
    """The checks read what the family named; a bundle written before the manifest named them still reads."""
    from edgegen.runtime.bundle import OutputRef
    from edgegen.runtime.check import pipeline_parity

    named = Bundle.open(bundle_copy).manifest["reference_outputs"]
    assert named == {
        "pixels": {"component": "fused", "output": "pixels"},
        "text_states": {"component": "fused", "output": "text_states"},
    }
    pipe = Pipeline.from_bundle(bundle_copy, backend="ort-cpu", precision="fp32")
    assert pipeline_parity(pipe) <= 1
    edit_manifest(bundle_copy, lambda m: m["reference_outputs"].pop("pixels"))
    pipe = Pipeline.from_bundle(bundle_copy, backend="ort-cpu", precision="fp32")
    with pytest.raises(BadBundleError, match="no reference pixels"):
        pipeline_parity(pipe)
    edit_manifest(bundle_copy, lambda m: m.pop("reference_outputs"))
    assert Bundle.open(bundle_copy).reference_output("text_states") == OutputRef("fused", "text_states")

"""fp16 (and later int8) exports: every component written, gates measured and enforced, degraded bundles marked."""
import json

import numpy as np
import onnx
import pytest

from edgegen.export import export_checkpoint
from edgegen.export.fp16 import FP32_OPS, convert_to_fp16
from edgegen.runtime import Bundle, Pipeline, ValidationFailedError


@pytest.fixture(scope="module")
def fp16_bundle(tiny_checkpoints, tmp_path_factory):
    return export_checkpoint(tiny_checkpoints["clip"], tmp_path_factory.mktemp("p") / "b", precisions="fp16",
                             progress=False)


def test_fp16_files_and_gate(fp16_bundle):
    bundle = Bundle.open(fp16_bundle)
    assert bundle.precisions == ["fp32", "fp16"]
    for comp in ("text_encoder", "generator", "fused"):
        model = onnx.load(str(bundle.onnx_path(comp, "fp16")))
        kinds = {i.data_type for i in model.graph.initializer if i.data_type in (1, 10)}
        assert onnx.TensorProto.FLOAT16 in kinds
        # inputs and outputs stay as they were (fp32 / int64 / uint8)
        assert [i.type.tensor_type.elem_type for i in model.graph.input] == \
               [onnx.TensorProto.INT64 if t.dtype == "int64" else onnx.TensorProto.FLOAT for t in bundle.components[comp].inputs]
    report = bundle.report()
    gate = report["precisions"]["fp16"]["gate"]
    assert gate["ok"] and gate["checks"]["psnr_db"]["min"] == 35.0 and gate["checks"]["psnr_db"]["value"] >= 35
    assert gate["checks"]["text_cosine"]["value"] >= 0.999


def test_fp16_fragile_ops_stay_fp32(fp16_bundle):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_bundle / "onnx" / "fused.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    fragile = [n for n in model.graph.node if n.op_type in FP32_OPS]
    assert fragile, "the graph should contain softmax/normalisation ops"
    for node in fragile:
        for name in node.output:
            assert types.get(name, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, (node.op_type, name)


def test_fp16_runs_without_nan(fp16_bundle):
    pipe = Pipeline.from_bundle(fp16_bundle, backend="ort-cpu", precision="fp16")
    ref = Pipeline.from_bundle(fp16_bundle, backend="ort-cpu", precision="fp32")
    prompts = ["a red apple", "cat", "a very small yellow star on a dark green background"]
    got, want = pipe(prompts, seed=[1, 2, 3], output_type="np"), ref(prompts, seed=[1, 2, 3], output_type="np")
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 1.0
    assert pipe.precision == "fp16"


def test_fp16_clamps_out_of_range_weights():
    from onnx import helper, numpy_helper, TensorProto
    w = numpy_helper.from_array(np.array([[1e6]], np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [w])
    converted = convert_to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    value = numpy_helper.to_array(converted.graph.initializer[0])
    assert value.dtype == np.float16 and np.isfinite(value).all() and value.max() == np.finfo(np.float16).max


def test_too_strict_gate_fails_and_allow_degraded_marks_it(tiny_checkpoints, tmp_path):
    strict = {"fp16": {"psnr_db": 99.0, "text_cosine": 0.999}}
    with pytest.raises(ValidationFailedError, match="fp16 quality gate psnr_db"):
        export_checkpoint(tiny_checkpoints["bert"], tmp_path / "b", precisions="fp16", gates=strict, progress=False)
    assert not (tmp_path / "b").exists()
    out = export_checkpoint(tiny_checkpoints["bert"], tmp_path / "b", precisions="fp16", gates=strict,
                            allow_degraded=True, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("fp16 quality gate psnr_db" in line for line in manifest["degraded"])
    report = Bundle.open(out).report()
    assert report["ok"] is False and report["degraded"] == manifest["degraded"]


def test_inspect_says_degraded(tiny_checkpoints, tmp_path, capsys):
    from edgegen.runtime.cli import main
    out = export_checkpoint(tiny_checkpoints["bert"], tmp_path / "b", precisions="fp16",
                            gates={"fp16": {"psnr_db": 99.0}}, allow_degraded=True, progress=False)
    assert main(["inspect", str(out)]) == 0
    assert "DEGRADED   fp16 quality gate psnr_db" in capsys.readouterr().out

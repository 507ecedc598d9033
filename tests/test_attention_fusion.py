"""The CPU int8 form's attention fusion: same outputs as the traced graph, QAttention in int8, and refused
whenever the fused graph would compute something else."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgegen.export import export_checkpoint, int8
from edgegen.export.attention_fusion import fuse_attention
from edgegen.runtime import Pipeline


def run(path_or_model, feed):
    src = (
        path_or_model.SerializeToString()
        if isinstance(path_or_model, onnx.ModelProto)
        else str(path_or_model)
    )
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feed)


def feed(length=16):
    ids = np.zeros((2, length), np.int64)
    ids[0, :5], ids[1, :3] = [2, 7, 9, 11, 3], [2, 8, 3]
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}


def test_bert_attention_fuses_to_one_node_per_layer_with_the_same_outputs(bert_bundle):
    path = bert_bundle / "onnx" / "text_encoder.fp32.onnx"
    model = onnx.load(str(path))
    before = len(model.graph.node)
    assert fuse_attention(model) == 2  # the tiny BERT has two layers
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Attention"] == 2 and ops["Softmax"] == 0 and len(model.graph.node) < before / 2
    want, got = run(path, feed()), run(model, feed())
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)


@pytest.fixture(scope="module")
def bert_int8(tiny_checkpoints, tmp_path_factory):
    return export_checkpoint(
        tiny_checkpoints["bert"], tmp_path_factory.mktemp("att") / "b", precisions="fp32,int8", progress=False
    )


def test_cpu_int8_form_runs_quantized_attention_and_passes_its_gate(bert_int8):
    for comp in ("text_encoder", "fused"):
        ops = Counter(
            n.op_type
            for n in onnx.load(
                str(bert_int8 / "onnx" / f"{comp}.int8.onnx"), load_external_data=False
            ).graph.node
        )
        assert ops["QAttention"] == 2, comp
    qdq = Counter(
        n.op_type
        for n in onnx.load(
            str(bert_int8 / "onnx" / "fused.int8-qdq.onnx"), load_external_data=False
        ).graph.node
    )
    assert qdq["QAttention"] == qdq["Attention"] == 0  # the TensorRT form stays standard ONNX
    pipe = Pipeline.from_bundle(bert_int8, backend="ort-cpu", precision="int8")
    assert pipe.bundle.report()["precisions"]["int8"]["gate"]["ok"]
    assert pipe(["a red apple"], seed=[0], output_type="uint8").shape == (1, 16, 16, 3)


def test_a_fusion_that_changes_the_outputs_is_refused(bert_bundle, tmp_path, monkeypatch):
    path = bert_bundle / "onnx" / "text_encoder.fp32.onnx"

    def without_mask(model):  # a fusion that would let every token see the padding
        n = fuse_attention(model)
        for node in model.graph.node:
            if node.op_type == "Attention":
                del node.input[3:]
        return n

    monkeypatch.setattr(int8, "fuse_attention", without_mask)
    fused = tmp_path / "fused.onnx"
    assert int8.with_fused_attention(path, fused, [feed()]) == path  # refused: the original is quantized
    monkeypatch.undo()
    assert int8.with_fused_attention(path, fused, [feed()]) == fused
    assert Counter(n.op_type for n in onnx.load(str(fused)).graph.node)["Attention"] == 2

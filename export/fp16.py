"""fp32 ONNX -> fp16 ONNX: fp16 weights and math, fp32 inputs and outputs, fragile ops kept in fp32.

Written for edgegen's graphs rather than borrowed: every float tensor gets a precision (fp16 where the
node computing it runs in fp16), and a Cast is inserted wherever a consumer needs the other one.

Why not ONNX Runtime's converter (``onnxruntime.transformers.float16.convert_float_to_float16`` with
``keep_io_types=True, op_block_list=FP32_OPS``), measured against this one with onnxruntime 1.31.1: on a
CLIP text encoder, and so on every diffusion fused graph, it writes a model ONNX Runtime refuses to load
("two nodes with same node name ...bias_cast_to_fp32_node"): an initializer read by several nodes kept in
fp32 (the exporter stores equal constants once, e.g. a zero bias shared by LayerNorms and Adds) gets one
Cast per reader, all with the same node and output names. Where it works (the diffusion UNet and VAE
decoder, the default model) it gives the same node counts, outputs and speed: benchmarks/fp16_converters.py.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Kept in fp32 by rule: normalisation statistics, softmax, exp/pow and friends, reductions (overflow).
FP32_OPS = frozenset(
    {
        "LayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "BatchNormalization",
        "Softmax",
        "LogSoftmax",
        "Exp",
        "Log",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Erf",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL2",
        "CumSum",
        "RandomNormalLike",
    }
)
# Float inputs that are parameters of the op, not data: they stay fp32 whatever the op runs in.
FP32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
FP16_MAX = float(np.finfo(np.float16).max)


def weight_to_fp16(array: np.ndarray) -> np.ndarray:
    """An fp32 weight as the fp16 form stores it: clamped into fp16's range, then cast (export.lora keys the
    LoRA targets' fp16 copies with it, so they match the converted graphs' bytes)."""
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)


def convert_to_fp16(model: onnx.ModelProto, keep_fp32: set[str] = frozenset()) -> onnx.ModelProto:
    """``keep_fp32``: extra node names to keep in fp32 (e.g. layers a sensitivity scan singled out)."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    float_names = {
        v.name
        for v in list(g.value_info) + list(g.input) + list(g.output)
        if v.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    inits = {i.name: i for i in g.initializer}
    float_names |= {n for n, i in inits.items() if i.data_type == TensorProto.FLOAT}

    def runs_fp16(node) -> bool:
        return node.op_type not in FP32_OPS and node.name not in keep_fp32

    # Initializers used only as data inputs of fp16 nodes become fp16 themselves (clamped into range).
    consumers: dict[str, list[tuple]] = {}
    for node in g.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    precision = {name: "fp32" for name in float_names}
    for name, init in inits.items():
        uses = consumers.get(name, [])
        if (
            init.data_type == TensorProto.FLOAT
            and uses
            and all(runs_fp16(n) and k not in FP32_INPUTS.get(n.op_type, ()) for n, k in uses)
        ):
            arr = weight_to_fp16(numpy_helper.to_array(init))
            init.CopyFrom(numpy_helper.from_array(arr, name))
            precision[name] = "fp16"

    new_nodes, casts = [], {}

    def cast(name: str, to: str) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{to}"
            new_nodes.append(
                helper.make_node(
                    "Cast",
                    [name],
                    [out],
                    name=f"cast_{to}_{len(casts)}",
                    to=TensorProto.FLOAT16 if to == "fp16" else TensorProto.FLOAT,
                )
            )
            casts[key] = out
        return casts[key]

    for node in g.node:
        want = "fp16" if runs_fp16(node) else "fp32"
        for k, name in enumerate(node.input):
            if name in precision:
                need = "fp32" if k in FP32_INPUTS.get(node.op_type, ()) else want
                if precision[name] != need:
                    node.input[k] = cast(name, need)
        if want == "fp16":
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
        produces_float = node.op_type == "Cast" and any(
            a.name == "to" and a.i in (TensorProto.FLOAT, TensorProto.FLOAT16) for a in node.attribute
        )
        for name in node.output:
            if name in float_names or produces_float:
                precision[name] = want
        new_nodes.append(node)

    outputs = {o.name for o in g.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    renamed = {name: f"{name}__fp16" for name in outputs if precision.get(name) == "fp16"}
    for node in new_nodes:  # graph outputs stay fp32: the fp16 producer writes a renamed tensor, cast back
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    new_nodes += [
        helper.make_node("Cast", [fp16], [name], name=f"cast_out_{name}", to=TensorProto.FLOAT)
        for name, fp16 in renamed.items()
    ]
    del g.node[:]
    g.node.extend(_toposort(new_nodes, {i.name for i in g.input} | set(inits)))
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def _toposort(nodes, available: set[str]):
    ready, order, pending = set(available) | {""}, [], list(nodes)
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise RuntimeError("fp16 conversion produced a cycle")
        for n in done:
            order.append(n)
            ready.update(n.output)
        pending = rest
    return order

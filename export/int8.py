"""fp32 ONNX -> INT8 ONNX, two forms, quantizing only ops with constant weights (Conv, Gemm, MatMul).

- ``int8`` (CPU form): the text encoder's weight MatMuls dynamically quantized (activation ranges measured
  per call, so MiniLM's outlier dimensions cost nothing), its self-attention fused into ONNX Runtime's
  Attention op (quantized to QAttention) where the fused graph matches the original (attention_fusion.py),
  the generator's static QDQ (calibrated; ONNX Runtime fuses it into QLinearConv/QLinearMatMul on CPU).
- ``int8-qdq`` (GPU/TensorRT form): everything static QDQ, as TensorRT's explicit quantization wants.

Layer groups the sensitivity scan keeps back keep their activations in float but their weights in int8
(per output channel, behind a DequantizeLinear): activation ranges are what hurts (MiniLM's FFN outputs
carry outliers), and int8 weights keep the file 4x smaller than fp32 ones would.

Attention-score MatMuls (activation x activation) and the attention mask's additions are never
quantized, so calibration never sees the mask's large negative values. Weights are per channel.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .attention_fusion import fuse_attention, split_qkv_constants
from .weights import quantize_embeddings

FORMS = ("int8", "int8-qdq")
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def is_text_node(name: str) -> bool:
    """Nodes of the Hugging Face text encoder: traced under TextEncoder.model (``/model/`` in the name)."""
    return "/model/" in name


def weight_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes of WEIGHT_OPS whose second input is a constant (an initializer): the ones worth quantizing."""
    inits = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits
    ]


def with_fused_attention(fp32_path: Path, out_path: Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    """The graph to quantize into the CPU form: ``out_path``, written with the self-attention fused, if that
    graph gives the original's outputs on the calibration feeds (float outputs within 1e-4 of their scale,
    integer ones within 1); otherwise (nothing to fuse, or a mismatch) ``fp32_path`` itself."""
    import onnxruntime as ort

    model = onnx.load(str(fp32_path))
    if not fuse_attention(model):
        return fp32_path
    onnx.save(model, str(out_path))
    ref, new = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32_path, out_path)
    )
    names = {i.name for i in ref.get_inputs()}
    for f in calibration:
        feed = {k: v for k, v in f.items() if k in names}
        for a, b in zip(ref.run(None, feed), new.run(None, feed)):
            limit = 1.0 if np.issubdtype(a.dtype, np.integer) else 1e-4 * max(1.0, float(np.abs(a).max()))
            if a.shape != b.shape or np.abs(a.astype(np.float64) - b).max() > limit:
                return fp32_path
    return out_path


def block_of(name: str, wrappers: tuple[str, ...] = ()) -> str:
    """The layer group a node belongs to, named the same in every graph: e.g. 'blocks.1',
    'model/encoder/layer.3'. ``wrappers``: the bundle's component names; a graph that runs other components
    inside it (a fused graph) names their nodes under them ('/generator/blocks.1/...'), which the
    component's own graph lacks."""
    parts = [p for p in name.split("/") if p]
    if parts and parts[0] in wrappers:
        parts = parts[1:]
    for depth, part in enumerate(parts):
        if "." in part and part.split(".")[-1].isdigit():  # blocks.1, layer.3, attns.2
            return "/".join(parts[: depth + 1])
    return "/".join(parts[:-1][:3]) or name


class _Reader:
    """ONNX Runtime calibration reader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # newer ORT versions may call it
        pass


def quantize(
    fp32_path: Path,
    out_path: Path,
    form: str,
    calibration: list[dict[str, np.ndarray]],
    keep_blocks: set[str] = frozenset(),
    ranges: Path | None = None,
    wrappers: tuple[str, ...] = (),
) -> list[str]:
    """Write the ``form`` INT8 model; ``keep_blocks``: layer groups kept back (float activations, int8
    weights; in the ``int8`` form a kept-back layer's fused attention keeps fp32 weights too).
    Returns the fully quantized nodes. ``ranges``: a calibration cache file of this graph; written by the
    first call, reused by the next. ``wrappers``: as for block_of."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    quiet = logging.getLogger()  # the quantizer logs advice at WARNING on the root logger
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # CPU form: one Attention kernel per layer where it provably computes the same thing
            current = (
                with_fused_attention(fp32_path, Path(tmp) / "attention.onnx", calibration)
                if form == "int8"
                else fp32_path
            )
            model = onnx.load(str(current))
            names = {i.name for i in model.graph.input}
            feeds = [{k: v for k, v in f.items() if k in names} for f in calibration]
            every = weight_nodes(model)
            nodes = [n for n in every if block_of(n, wrappers) not in keep_blocks]
            attention = [
                n.name
                for n in model.graph.node
                if n.op_type == "Attention" and block_of(n.name, wrappers) not in keep_blocks
            ]
            dynamic = [n for n in nodes if form == "int8" and is_text_node(n)] + attention
            static = [n for n in nodes if n not in dynamic]
            if static:
                staged = Path(tmp) / "static.onnx"
                quantize_static(
                    str(current),
                    str(staged),
                    _Reader(feeds),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8 if form == "int8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_quantize=static,
                    calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=ranges,
                    # TensorRT wants symmetric int8 activations and fp32 biases in QDQ graphs
                    extra_options={
                        "ActivationSymmetric": form == "int8-qdq",
                        "QuantizeBias": form != "int8-qdq",
                    },
                )
                staged_model = onnx.load(str(staged))
                del staged_model.graph.value_info[
                    :
                ]  # stale shapes here trip the dynamic pass's shape inference
                onnx.save(staged_model, str(staged))
                current = staged
            if dynamic:
                staged = Path(tmp) / "dynamic.onnx"
                quantize_dynamic(
                    str(current),
                    str(staged),
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    nodes_to_quantize=dynamic,
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
                current = staged
            model = onnx.load(str(current))
    finally:  # also when quantizing fails: the caller's logging is left as it was
        quiet.setLevel(level)
    split_qkv_constants(model)
    weights_only(model, [n for n in every if n not in nodes])
    quantize_embeddings(model, qdq=form == "int8-qdq")
    model.producer_name = "edgegen"
    onnx.save(model, str(out_path))
    return static + dynamic


def weights_only(model: onnx.ModelProto, node_names: list[str]) -> None:
    """Give these nodes int8 weights (symmetric, one scale per output channel) dequantized in the graph
    (DequantizeLinear -> the op, the weight-only pattern ONNX Runtime and TensorRT read), activations
    untouched."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    wanted, dq_nodes, done = set(node_names), [], {}
    for node in g.node:
        if node.name not in wanted or inits.get(node.input[1]) is None:
            continue
        if node.input[1] not in done:
            init = inits[node.input[1]]
            w = numpy_helper.to_array(init)
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else w.ndim - 1
            scale = (
                np.maximum(np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis)), 1e-12) / 127.0
            )
            shape = [-1 if i == axis else 1 for i in range(w.ndim)]
            q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            base = init.name
            g.initializer.extend(
                [
                    numpy_helper.from_array(q, f"{base}.int8"),
                    numpy_helper.from_array(scale.astype(np.float32), f"{base}.scale"),
                    numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{base}.zero"),
                ]
            )
            dq_nodes.append(
                onnx.helper.make_node(
                    "DequantizeLinear",
                    [f"{base}.int8", f"{base}.scale", f"{base}.zero"],
                    [f"{base}.dq"],
                    name=f"{base}.dequant",
                    axis=axis,
                )
            )
            done[node.input[1]] = f"{base}.dq"
        node.input[1] = done[node.input[1]]
    used = {i for n in g.node for i in n.input}
    for name in done:
        if name not in used:
            g.initializer.remove(inits[name])
    if dq_nodes:  # their inputs are initializers: first is a valid topological place
        rest = list(g.node)
        del g.node[:]
        g.node.extend(dq_nodes + rest)


def blocks(fp32_path: Path, wrappers: tuple[str, ...] = ()) -> list[str]:
    return sorted({block_of(n, wrappers) for n in weight_nodes(onnx.load(str(fp32_path)))})


def keep_back(
    fp32_path: Path, form: str, calibration, score, gate: dict, wrappers: tuple[str, ...] = ()
) -> tuple[set[str], dict]:
    """Per-layer sensitivity, then keep the worst layer groups back until the gate passes.

    ``score(model_path) -> quality dict`` with the ``gate``'s metrics (minimums). A group's sensitivity is
    each metric when it alone is quantized; while a metric misses its minimum, the group that alone lowers
    that metric most is kept back next. Returns (groups kept, {group: {metric: value}}). ``wrappers``: as
    for block_of.
    """

    def failing(q):
        return [m for m, least in gate.items() if m in q and q[m] < least]

    with tempfile.TemporaryDirectory() as tmp:
        trial, ranges = Path(tmp) / "trial.onnx", Path(tmp) / "ranges.json"
        if form == "int8":  # fuse and check once: quantize() then finds nothing left to fuse in this graph
            fp32_path = with_fused_attention(fp32_path, Path(tmp) / "attention.onnx", calibration)
        names = blocks(fp32_path, wrappers)
        quantize(fp32_path, trial, form, calibration, ranges=ranges, wrappers=wrappers)  # calibrates once
        quality = score(trial)
        alone = {}
        for block in names:
            quantize(
                fp32_path,
                trial,
                form,
                calibration,
                keep_blocks=set(names) - {block},
                ranges=ranges,
                wrappers=wrappers,
            )
            alone[block] = {m: round(float(v), 5) for m, v in score(trial).items() if m in gate}
        kept: set[str] = set()
        while failing(quality) and len(kept) < len(names):
            metric = failing(quality)[0]
            kept.add(min((b for b in names if b not in kept), key=lambda b: alone[b][metric]))
            quantize(fp32_path, trial, form, calibration, keep_blocks=kept, ranges=ranges, wrappers=wrappers)
            quality = score(trial)
    return kept, alone

"""Roofline-style bounds: FLOPs and bytes per ONNX graph, against this machine's peak.

FLOPs count the multiply-adds of Conv, ConvTranspose, MatMul and Gemm (2 per MAC) at batch 1; other ops
are memory-bound and counted only as bytes. Integer products (MatMulInteger, QLinear*, the dynamic-quantized
MatMuls, and a MatMul/Conv/Gemm whose two inputs both come out of DequantizeLinear: ONNX Runtime runs
that QDQ pattern as an integer kernel) are counted apart, as int8 ops, against the integer peak.
Bytes = weights read once (lookup tables at the rows read) + every node's output written once and read
once (an upper bound; fusion lowers it). Nodes whose inputs are
all constant (a weight's DequantizeLinear, weights concatenated) cost nothing per run: ONNX Runtime folds or
fuses them when the session loads. Peak FLOP/s is derived from the CPU (cores x
clock x FMA lanes), peak bytes/s is measured (numpy copy); both are stated with the derivation.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import onnx
from edgegen.runtime.bundle import SEQUENCE_AXIS

DTYPE_BYTES = {1: 4, 10: 2, 11: 8, 7: 8, 6: 4, 3: 1, 2: 1, 9: 1, 16: 2}
INTEGER_OPS = (
    "ConvInteger",
    "QLinearConv",
    "MatMulInteger",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QAttention",
)


def _fix_shapes(model: onnx.ModelProto, batch: int, sequence: int | None) -> onnx.ModelProto:
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == SEQUENCE_AXIS and sequence is None:
                raise ValueError(
                    f"{value.name} has a dynamic token axis: pass the positions to count at (sequence=)"
                )
            if dim.dim_param:
                dim.dim_value = sequence if dim.dim_param == SEQUENCE_AXIS else batch
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    # onnx's inference stops at ONNX Runtime's (Q)Attention; its output has its input's shape: say so, go on
    for node in [n for n in model.graph.node if n.op_type in ("Attention", "QAttention")]:
        known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
        if node.input[0] in known and node.output[0] not in known:
            out = onnx.ValueInfoProto()
            out.CopyFrom(known[node.input[0]])
            out.name = node.output[0]
            model.graph.value_info.append(out)
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return model


def count(path: Path, batch: int = 1, sequence: int | None = None) -> dict:
    """{"flops", "bytes", "weight_bytes"} of one forward pass at ``batch`` and ``sequence`` token positions
    (where the graph's token axis is dynamic)."""
    model = _fix_shapes(onnx.load(str(path), load_external_data=False), batch, sequence)
    g = model.graph
    shapes = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        dims = [d.dim_value if d.dim_value else 1 for d in t.shape.dim]
        shapes[v.name] = (dims, DTYPE_BYTES.get(t.elem_type, 4))
    weights = {i.name: (list(i.dims), DTYPE_BYTES.get(i.data_type, 4)) for i in g.initializer}
    shapes.update(weights)
    flops = int8_ops = 0
    act_bytes = 0
    dequantized = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    constant = set(weights)  # tensors known before a run: ONNX Runtime folds or fuses the nodes making them
    for n in g.node:
        if all(i in constant for i in n.input if i):  # e.g. a weight's DequantizeLinear, a weight Concat
            constant.update(n.output)
            continue
        out = shapes.get(n.output[0]) if n.output else None
        if out:
            act_bytes += 2 * int(np.prod(out[0])) * out[1]
        if not out:
            continue
        products, other = 0, 0  # other: float products of a node whose main product is integer
        if n.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w = shapes.get(n.input[3 if n.op_type == "QLinearConv" else 1])
            products = 2 * int(np.prod(out[0])) * int(np.prod(w[0][1:])) if w else 0
        elif n.op_type in (
            "MatMul",
            "MatMulInteger",
            "Gemm",
            "QLinearMatMul",
            "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat",
        ):
            a = shapes.get(n.input[0])
            k = a[0][-1] if a and a[0] else 0
            if n.op_type == "Gemm" and any(at.name == "transA" and at.i for at in n.attribute) and a:
                k = a[0][-2]
            w = weights.get(n.input[1]) if len(n.input) > 1 else None
            if w and len(w[0]) >= 2 and n.op_type in ("MatMul", "MatMulInteger"):  # a constant B knows K even
                k = w[0][-2]  # where inference lost A's shape
            products = 2 * int(np.prod(out[0])) * int(k)
        elif n.op_type in ("Attention", "QAttention"):  # the QKV projection, then scores and mix per head
            w = shapes.get(n.input[1])
            tokens = int(np.prod(out[0][:-1]))
            products = 2 * tokens * w[0][0] * w[0][1] if w else 0
            other = 2 * 2 * tokens * out[0][-2] * out[0][-1]
        integer = n.op_type in INTEGER_OPS or (
            n.op_type in ("MatMul", "Gemm", "Conv")
            and len(n.input) > 1
            and n.input[0] in dequantized
            and n.input[1] in dequantized
        )
        if integer:
            int8_ops += products
            flops += other
        else:
            flops += products + other
    # a lookup table (Gather's data input) is read only at the gathered rows, counted as its output
    gathered = {n.input[0] for n in g.node if n.op_type == "Gather"} - {
        i for n in g.node if n.op_type != "Gather" for i in n.input
    }
    weight_bytes = sum(int(np.prod(d)) * b for name, (d, b) in weights.items() if name not in gathered)
    return {
        "flops": int(flops),
        "int8_ops": int(int8_ops),
        "bytes": int(weight_bytes + act_bytes),
        "weight_bytes": int(weight_bytes),
    }


def cpu_peak() -> dict:
    """Peak fp32 FLOP/s and int8 op/s from the CPU's flags and clock; memory bandwidth measured with a numpy
    copy.

    int8: a VNNI dot-product instruction does 4 u8 x s8 multiply-adds per 32-bit lane where an FMA does one
    fp32 multiply-add, so 4x the fp32 rate; without VNNI (vpmaddubsw + vpmaddwd) 2x."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = max([float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)] or [2000.0])
    cores = os.cpu_count() or 1
    lanes = 16 if "avx512f" in info else 8 if "avx2" in info else 4  # fp32 lanes per vector
    fma = 2 if "fma" in info else 1
    units = 2  # two FMA pipes per core on current x86 cores
    peak_flops = cores * mhz * 1e6 * lanes * fma * units
    int8_factor = 4 if ("avx512_vnni" in info or "avx_vnni" in info) else 2 if "avx2" in info else 1
    a = np.ones(32 * 2**20 // 8)
    b = np.empty_like(a)
    np.copyto(b, a)
    start, n = time.perf_counter(), 8
    for _ in range(n):
        np.copyto(b, a)
    bandwidth = 2 * a.nbytes * n / (time.perf_counter() - start)
    return {
        "flops_per_s": peak_flops,
        "int8_ops_per_s": peak_flops * int8_factor,
        "bytes_per_s": bandwidth,
        "derivation": f"{cores} cores x {mhz:.0f} MHz x {lanes} fp32 lanes x {fma * units} "
        f"(FMA x {units} pipes) = {peak_flops / 1e9:.1f} GFLOP/s; int8 x{int8_factor} "
        f"({'VNNI' if int8_factor == 4 else 'no VNNI'}) = {peak_flops * int8_factor / 1e9:.1f} GOP/s; "
        f"memory {bandwidth / 1e9:.1f} GB/s measured by a 32 MiB numpy copy (read + write)",
    }


def bound_ms(counts: dict, peak: dict) -> float:
    """The slower of compute (float and int8 products, each at its own peak) and memory traffic."""
    compute = counts["flops"] / peak["flops_per_s"] + counts.get("int8_ops", 0) / peak["int8_ops_per_s"]
    return 1e3 * max(compute, counts["bytes"] / peak["bytes_per_s"])

"""edgegen's fp16 converter (export/fp16.py) against ONNX Runtime's (onnxruntime.transformers.float16), on a
bundle's fp32 graphs: node and Cast counts, largest difference of each output from the fp32 graph on the
bundle's reference inputs, and CPU latency (one thread, interleaved, median and min).

    python -m benchmarks.fp16_converters BUNDLE fused text_encoder generator

Why export/fp16.py keeps its own converter is written in its docstring; this is the measurement.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from edgegen.export.fp16 import FP32_OPS, convert_to_fp16
from edgegen.runtime.bundle import Bundle
from edgegen.runtime.check import load_reference
from onnxruntime.transformers.float16 import convert_float_to_float16

ROUNDS = 200


def converted(src: Path) -> dict[str, onnx.ModelProto]:
    return {
        "edgegen": convert_to_fp16(onnx.load(str(src))),
        "onnxruntime": convert_float_to_float16(
            onnx.load(str(src)), keep_io_types=True, op_block_list=sorted(FP32_OPS)
        ),
    }


def compare(bundle: Bundle, name: str, scratch: Path) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    src = bundle.onnx_path(name, "fp32")
    sessions = {"fp32": ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])}
    for key, model in converted(src).items():
        path = scratch / f"{name}.{key}.onnx"
        onnx.save(model, str(path))
        casts = sum(n.op_type == "Cast" for n in model.graph.node)
        try:
            sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # the converter wrote a model ONNX Runtime refuses
            print(f"{name} {key}: {len(model.graph.node)} nodes, {casts} casts; does not load: {e}")
            continue
        print(f"{name} {key}: {len(model.graph.node)} nodes, {casts} casts")
    inputs = [i.name for i in sessions["fp32"].get_inputs()]
    fp16 = [k for k in sessions if k != "fp32"]
    worst = {k: {} for k in fp16}
    for case in load_reference(bundle):
        feed = {i: case["in"][i] for i in inputs}
        want = sessions["fp32"].run(None, feed)
        for key in fp16:
            for spec, a, b in zip(sessions[key].get_outputs(), want, sessions[key].run(None, feed)):
                diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
                worst[key][spec.name] = max(worst[key].get(spec.name, 0.0), diff)
    for key in fp16:
        print(f"{name} {key}: largest difference from fp32 {worst[key]}")
    times = {k: [] for k in fp16}
    for _ in range(ROUNDS):
        for key in fp16:
            start = time.perf_counter()
            sessions[key].run(None, feed)
            times[key].append(time.perf_counter() - start)
    print(
        f"{name} ms (1 thread, last reference case, {ROUNDS} interleaved; median | min): "
        + ", ".join(f"{k} {statistics.median(v) * 1e3:.3f} | {min(v) * 1e3:.3f}" for k, v in times.items())
    )


def main(argv: list[str]) -> None:
    bundle = Bundle.open(argv[0])
    with tempfile.TemporaryDirectory() as scratch:
        for name in argv[1:]:
            compare(bundle, name, Path(scratch))


if __name__ == "__main__":
    main(sys.argv[1:])

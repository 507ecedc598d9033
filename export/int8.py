"""fp32 ONNX -> INT8 ONNX, two forms, quantizing only ops with constant weights (Conv, Gemm, MatMul).

- ``int8`` (CPU form): the text encoder's weight MatMuls dynamically quantized (activation ranges measured
  per call, so MiniLM's outlier dimensions cost nothing), the generator's static QDQ (calibrated; ONNX
  Runtime fuses it into QLinearConv/QLinearMatMul on CPU).
- ``int8-qdq`` (GPU/TensorRT form): everything static QDQ, as TensorRT's explicit quantization wants.

Attention-score MatMuls (activation x activation) and the attention mask's additions are never
quantized, so calibration never sees the mask's large negative values. Weights are per channel.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .weights import quantize_embeddings

FORMS = ("int8", "int8-qdq")
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def is_text_node(name: str) -> bool:
    """Nodes of the Hugging Face text encoder: traced under TextEncoder.model (``/model/`` in the name)."""
    return "/model/" in name


def weight_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes of WEIGHT_OPS whose second input is a constant (an initializer): the ones worth quantizing."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits]


def block_of(name: str) -> str:
    """The layer group a node belongs to, named the same in every graph (the fused graph's nodes carry a
    '/text_encoder' or '/generator' prefix the split graphs lack): e.g. 'blocks.1', 'model/encoder/layer.3'."""
    parts = [p for p in name.split("/") if p]
    if parts and parts[0] in ("text_encoder", "generator"):
        parts = parts[1:]
    for depth, part in enumerate(parts):
        if "." in part and part.split(".")[-1].isdigit():  # blocks.1, layer.3, attns.2
            return "/".join(parts[:depth + 1])
    return "/".join(parts[:-1][:3]) or name


class _Reader:
    """ONNX Runtime calibration reader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # newer ORT versions may call it
        pass


def quantize(fp32_path: Path, out_path: Path, form: str, calibration: list[dict[str, np.ndarray]],
             keep_blocks: set[str] = frozenset(), ranges: Path | None = None) -> list[str]:
    """Write the ``form`` INT8 model; ``keep_blocks``: layer groups left in fp32. Returns the quantized nodes.
    ``ranges``: a calibration cache file of this graph; written by the first call, reused by the next."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    model = onnx.load(str(fp32_path))
    nodes = [n for n in weight_nodes(model) if block_of(n) not in keep_blocks]
    if not nodes:
        shutil.copyfile(fp32_path, out_path)
        return []  # everything kept back: the fp32 graph as it is
    dynamic = [n for n in nodes if form == "int8" and is_text_node(n)]
    static = [n for n in nodes if n not in dynamic]
    names = {i.name for i in model.graph.input}
    feeds = [{k: v for k, v in f.items() if k in names} for f in calibration]
    quiet = logging.getLogger()  # the quantizer logs advice at WARNING on the root logger
    level, quiet.level = quiet.level, logging.ERROR
    with tempfile.TemporaryDirectory() as tmp:
        current = fp32_path
        if static:
            staged = Path(tmp) / "static.onnx"
            quantize_static(str(current), str(staged), _Reader(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8 if form == "int8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=static,
                            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=ranges,
                            # TensorRT wants symmetric int8 activations and fp32 biases in QDQ graphs
                            extra_options={"ActivationSymmetric": form == "int8-qdq",
                                           "QuantizeBias": form != "int8-qdq"})
            staged_model = onnx.load(str(staged))
            del staged_model.graph.value_info[:]  # stale shapes here trip the dynamic pass's shape inference
            onnx.save(staged_model, str(staged))
            current = staged
        if dynamic:
            staged = Path(tmp) / "dynamic.onnx"
            quantize_dynamic(str(current), str(staged), per_channel=True, weight_type=QuantType.QInt8,
                             nodes_to_quantize=dynamic)
            current = staged
        model = onnx.load(str(current))
    quiet.setLevel(level)
    quantize_embeddings(model, qdq=form == "int8-qdq")
    model.producer_name = "edgegen"
    onnx.save(model, str(out_path))
    return static + dynamic


def blocks(fp32_path: Path) -> list[str]:
    return sorted({block_of(n) for n in weight_nodes(onnx.load(str(fp32_path)))})


def keep_back(fp32_path: Path, form: str, calibration, score, passes) -> tuple[set[str], dict]:
    """Per-layer sensitivity, then keep the worst layer groups in fp32 until the gate passes.

    ``score(model_path) -> quality dict``; ``passes(quality) -> bool``. A group's sensitivity is the pixel
    PSNR against PyTorch fp32 when it alone is quantized (lower = worse). Returns (groups kept, {group: dB}).
    """
    with tempfile.TemporaryDirectory() as tmp:
        trial, ranges = Path(tmp) / "trial.onnx", Path(tmp) / "ranges.json"
        names = blocks(fp32_path)
        quantize(fp32_path, trial, form, calibration, ranges=ranges)  # calibrates every range once
        full = score(trial)
        alone = {}
        for block in names:
            quantize(fp32_path, trial, form, calibration, keep_blocks=set(names) - {block}, ranges=ranges)
            alone[block] = round(score(trial)["psnr_db"], 2)
        kept: set[str] = set()
        for block in sorted(names, key=alone.get):
            if passes(full if not kept else score(trial)):
                break
            kept.add(block)
            quantize(fp32_path, trial, form, calibration, keep_blocks=kept, ranges=ranges)
    return kept, alone

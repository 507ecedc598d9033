"""torch module -> cleaned ONNX file."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .families import ComponentDef

OPSET = 18
PROTOBUF_LIMIT = 2**31 - 1  # a graph with more weights than this keeps them in a file beside it
EXTERNAL_SUFFIX = ".onnx.data"


def export_component(comp: ComponentDef, sample: dict[str, np.ndarray], path: Path) -> None:
    """Trace ``comp.module`` on ``sample`` (use a batch > 1 so no size-1 axis gets specialised)."""
    args = tuple(torch.from_numpy(sample[t.name]) for t in comp.inputs)
    dynamic_axes = {
        t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
        for t in comp.inputs + comp.outputs
    }
    # The TorchScript exporter: fast (a second for these models, against tens for the dynamo
    # exporter) and it gives the same parity here; it warns that it is deprecated.
    # A graph over 2 GB (a full-size UNet) is written as one file per weight: trace into a scratch
    # directory, so only the cleaned graph (and its one weights file) lands beside the others.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".trace-") as scratch:
        raw = Path(scratch) / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                comp.module.eval(),
                args,
                str(raw),
                input_names=[t.name for t in comp.inputs],
                output_names=[t.name for t in comp.outputs],
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
        clean(raw, path)


def clean(path: Path, out: Path | None = None) -> None:
    """Fold constants and drop dead nodes and unused initializers, then check the graph; written to
    ``out`` (default: in place), with its weights in ``<out>.data`` when they pass protobuf's 2 GB."""
    import onnxscript.optimizer

    out = path if out is None else out
    model = onnx.load(str(path))
    model = onnxscript.optimizer.optimize(model)
    # Intermediate shapes recorded while tracing can hold the trace's batch size; drop them so no
    # later tool (quantizer, TensorRT parser) mistakes them for facts. Inputs/outputs keep their axes.
    del model.graph.value_info[:]
    model.producer_name = "edgegen"
    save(model, out)


def save(model: onnx.ModelProto, out: Path) -> None:
    """Check and write ``model``; weights past protobuf's 2 GB go to ``<out>.data`` beside it. A model that
    already points at external weights (files beside ``out``) is checked once written, where they resolve."""
    inline = sum(len(t.raw_data) for t in model.graph.initializer) < PROTOBUF_LIMIT - (64 << 20)
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer) and inline:
        onnx.checker.check_model(model)
        onnx.save(model, str(out))
        return
    if inline:
        onnx.save(model, str(out))
    else:
        onnx.save(
            model,
            str(out),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=out.name.removesuffix(".onnx") + EXTERNAL_SUFFIX,
            size_threshold=1024,
        )
    onnx.checker.check_model(str(out))

"""torch module -> cleaned ONNX file."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .families import ComponentDef

OPSET = 18


def export_component(comp: ComponentDef, sample: dict[str, np.ndarray], path: Path) -> None:
    """Trace ``comp.module`` on ``sample`` (use a batch > 1 so no size-1 axis gets specialised)."""
    args = tuple(torch.from_numpy(sample[t.name]) for t in comp.inputs)
    dynamic_axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                    for t in comp.inputs + comp.outputs}
    # The TorchScript exporter: fast (a second for these models, against tens for the dynamo
    # exporter) and it gives the same parity here; it warns that it is deprecated.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(comp.module.eval(), args, str(path), input_names=[t.name for t in comp.inputs],
                          output_names=[t.name for t in comp.outputs], dynamic_axes=dynamic_axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    clean(path)


def clean(path: Path) -> None:
    """Fold constants and drop dead nodes and unused initializers, then check the graph."""
    import onnxscript.optimizer
    model = onnx.load(str(path))
    model = onnxscript.optimizer.optimize(model)
    # Intermediate shapes recorded while tracing can hold the trace's batch size; drop them so no
    # later tool (quantizer, TensorRT parser) mistakes them for facts. Inputs/outputs keep their axes.
    del model.graph.value_info[:]
    model.producer_name = "edgegen"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))

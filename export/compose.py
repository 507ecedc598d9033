"""Assemble one ONNX graph from already exported ones: copies of their nodes wired together by name.

The diffusion family builds its unrolled few-step graphs this way: k copies of the exported UNet's
nodes (all reading the one set of UNet weights), the text encoder and VAE decoder graphs, and small
traced "glue" graphs for the scheduler arithmetic between them. Tracing the unrolled torch module
instead costs minutes at full size and gives the same graph.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper


class Composer:
    """Collects nodes and initializers of the graph being built; ``add`` inlines a whole graph."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.opsets: dict[str, int] = {}
        self.ir_version = 0

    def add(
        self, model: onnx.ModelProto, prefix: str, wires: dict[str, str], weights: str | None = None
    ) -> None:
        """Inline ``model``'s graph: its inputs and outputs named in ``wires`` take the wired names, its
        initializers are named ``weights`` + name (added once per ``weights`` prefix, so copies share
        them; default: ``prefix``), every other value ``prefix`` + name."""
        g = model.graph
        weights = prefix if weights is None else weights
        inits = {t.name for t in g.initializer}
        for t in g.initializer:
            if weights + t.name not in self.initializers:
                copy = onnx.TensorProto()
                copy.CopyFrom(t)
                copy.name = weights + t.name
                self.initializers[copy.name] = copy
        self.ir_version = max(self.ir_version, model.ir_version)
        for opset in model.opset_import:
            self.opsets[opset.domain] = max(self.opsets.get(opset.domain, 0), opset.version)

        def name(value: str) -> str:
            if not value:
                return value
            if value in wires:
                return wires[value]
            return weights + value if value in inits else prefix + value

        for node in g.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ValueError(f"compose: node {node.name} ({node.op_type}) has a subgraph; not supported")
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [name(v) for v in node.input]
            copy.output[:] = [name(v) for v in node.output]
            copy.name = prefix + node.name
            self.nodes.append(copy)

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def constant(self, name: str, value) -> str:
        self.initializers[name] = onnx.numpy_helper.from_array(value, name)
        return name

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "edgegen-composed", inputs, outputs, list(self.initializers.values())
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        )
        model.producer_name = "edgegen"
        model.ir_version = self.ir_version
        return model


def load(path: Path) -> onnx.ModelProto:
    """A graph to inline. Weights it keeps in an external file stay there (the tensors keep pointing at it,
    relative to the same directory): a full-size UNet is not held in memory, nor written twice."""
    return onnx.load(str(path), load_external_data=False)

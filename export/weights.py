"""Bundle size: int8 embedding tables, and one shared weights file per precision form.

The fused graph holds the same weights as the text encoder and generator graphs; storing each distinct
tensor once (ONNX external data, offsets into ``onnx/weights.<form>.bin``) halves a bundle.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_SHARED_BYTES = 1024  # smaller tensors stay inside the graph file
ALIGN = 64  # offsets aligned for mmap-friendly loading
MIN_EMBEDDING_ROWS = 1000  # Gather tables at least this tall are vocabulary embeddings


def quantize_embeddings(model: onnx.ModelProto, qdq: bool = False) -> list[str]:
    """Vocabulary tables to int8 with a scale per row (4x smaller). CPU form: Gather(int8) * Gather(scale),
    so only the rows a prompt uses are dequantized; QDQ form (``qdq``): DequantizeLinear(table) -> Gather,
    the weight pattern TensorRT folds. Both store the same int8 table. Returns the tables converted."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    done, new_nodes = [], []
    for node in g.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (
            table is None
            or table.data_type != TensorProto.FLOAT
            or len(table.dims) != 2
            or table.dims[0] < MIN_EMBEDDING_ROWS
            or axis != 0
        ):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(table)
        scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        base = table.name
        g.initializer.remove(table)
        scale = scale.astype(np.float32)
        ids, out = node.input[1], node.output[0]
        if qdq:
            g.initializer.extend(
                [
                    numpy_helper.from_array(q, f"{base}.int8"),
                    numpy_helper.from_array(scale, f"{base}.scale"),
                    numpy_helper.from_array(np.zeros_like(q[:, 0]), f"{base}.zero"),
                ]
            )
            new_nodes += [
                helper.make_node(
                    "DequantizeLinear",
                    [f"{base}.int8", f"{base}.scale", f"{base}.zero"],
                    [f"{base}.dq"],
                    name=f"{node.name}.dequant",
                    axis=0,
                ),
                helper.make_node("Gather", [f"{base}.dq", ids], [out], name=node.name, axis=0),
            ]
            done.append(base)
            continue
        g.initializer.extend(
            [
                numpy_helper.from_array(q, f"{base}.int8"),
                numpy_helper.from_array(scale[:, None], f"{base}.scale"),
            ]
        )
        new_nodes += [
            helper.make_node("Gather", [f"{base}.int8", ids], [f"{out}.q"], name=f"{node.name}.q", axis=0),
            helper.make_node("Gather", [f"{base}.scale", ids], [f"{out}.s"], name=f"{node.name}.s", axis=0),
            helper.make_node(
                "Cast", [f"{out}.q"], [f"{out}.f"], name=f"{node.name}.cast", to=TensorProto.FLOAT
            ),
            helper.make_node("Mul", [f"{out}.f", f"{out}.s"], [out], name=f"{node.name}.dequant"),
        ]
        done.append(base)
    del g.node[:]
    g.node.extend(new_nodes)
    return done


def content_key(data: bytes, data_type: int) -> str:
    """A tensor's identity in the shared file: its bytes' sha256 and its ONNX data type."""
    return hashlib.sha256(data).hexdigest() + str(data_type)


def share_weights(
    root: Path, model_rels: list[str], blob_rel: str, always: frozenset[str] = frozenset()
) -> dict[str, tuple[int, int]]:
    """Move the large initializers of these models into one file, each distinct tensor once; those whose
    content key is in ``always`` (the weights a LoRA may target) however small. Returns each stored tensor's
    (offset, length) by content key."""
    blob_path = root / blob_rel
    offsets: dict[str, tuple[int, int]] = {}
    with open(blob_path, "wb") as blob:
        for rel in model_rels:
            path = root / rel
            model = onnx.load(str(path))
            for tensor in model.graph.initializer:
                data = (
                    tensor.raw_data
                    if tensor.HasField("raw_data")
                    else numpy_helper.to_array(tensor).tobytes()
                )
                key = content_key(data, tensor.data_type)
                if len(data) < MIN_SHARED_BYTES and key not in always:
                    continue
                if key not in offsets:
                    pad = -blob.tell() % ALIGN
                    blob.write(b"\0" * pad)
                    offsets[key] = (blob.tell(), len(data))
                    blob.write(data)
                offset, length = offsets[key]
                dims, dtype, name = list(tensor.dims), tensor.data_type, tensor.name
                tensor.Clear()
                tensor.name, tensor.data_type = name, dtype
                tensor.dims.extend(dims)
                tensor.data_location = TensorProto.EXTERNAL
                for k, v in (
                    ("location", Path(blob_rel).name),
                    ("offset", str(offset)),
                    ("length", str(length)),
                ):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
            onnx.save(model, str(path))
    return offsets

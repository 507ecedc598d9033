"""Self-attention subgraphs -> one com.microsoft Attention node, for the CPU int8 form only.

A BERT-style encoder exported from PyTorch spells each layer's attention as ~15 nodes: three projections
(MatMul + Add), Reshape/Transpose into heads, MatMul(Q, K^T) * scale + additive mask, Softmax, MatMul with
V, Transpose/Reshape back; plus a mask-building subgraph. At 32 tokens those small nodes cost about as much
as the arithmetic. ONNX Runtime's Attention contrib op does it in one kernel (one QKV GEMM, heads inside),
and its dynamic quantizer turns it into QAttention (int8 QKV GEMM). ONNX Runtime's own fuser does not
recognise the transformers 5 export, so this matches the structure itself.

Only the ``int8`` form uses this: Attention is an ONNX Runtime CPU/CUDA contrib op that TensorRT does not
take, and the other forms must stay portable. The padding mask is passed as the model's 0/1
``attention_mask`` (mask_index), which is what a bidirectional encoder's additive key mask means; the
caller checks the fused graph against the original on real inputs and keeps the original if they differ
(a causal encoder, for example, would).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MASK_INPUT = "attention_mask"


def _producers(graph):
    return {o: n for n in graph.node for o in n.output}


def _const(graph, name):
    for i in graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _perm(node):
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _projection(prod, graph, tensor, perm):
    """Transpose(perm) <- Reshape <- Add(bias) <- MatMul(x, W): (x, W, bias) or None."""
    t = prod.get(tensor)
    if t is None or t.op_type != "Transpose" or _perm(t) != perm:
        return None
    r = prod.get(t.input[0])
    if r is None or r.op_type != "Reshape":
        return None
    add = prod.get(r.input[0])
    if add is None or add.op_type != "Add":
        return None
    for mm_in, bias_in in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        mm, bias = prod.get(mm_in), _const(graph, bias_in)
        if mm is not None and mm.op_type == "MatMul" and bias is not None:
            w = _const(graph, mm.input[1])
            if w is not None and w.ndim == 2:
                return mm.input[0], w, bias
    return None


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrite every matching attention subgraph in place; returns how many were fused. A fused node is
    named after its layer (``<layer prefix>/Attention``), so int8.block_of() groups it with the layer."""
    graph = model.graph
    if MASK_INPUT not in {i.name for i in graph.input}:
        return 0
    prod = _producers(graph)
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    fused, new_nodes = 0, []
    for sm in [n for n in graph.node if n.op_type == "Softmax"]:
        add = prod.get(sm.input[0])
        scaled = prod.get(add.input[0]) if add is not None and add.op_type == "Add" else None
        if scaled is None or scaled.op_type not in ("Mul", "Div"):
            continue
        factor = _const(graph, scaled.input[1])
        qk = prod.get(scaled.input[0])
        if factor is None or factor.size != 1 or qk is None or qk.op_type != "MatMul":
            continue
        scale = float(factor) if scaled.op_type == "Mul" else 1.0 / float(factor)
        q = _projection(prod, graph, qk.input[0], [0, 2, 1, 3])
        k = _projection(prod, graph, qk.input[1], [0, 2, 3, 1])
        consumers = users.get(sm.output[0], [])
        if q is None or k is None or len(consumers) != 1 or consumers[0].op_type != "MatMul":
            continue
        pv = consumers[0]
        v = _projection(prod, graph, pv.input[1], [0, 2, 1, 3])
        after = users.get(pv.output[0], [])
        if v is None or len(after) != 1 or after[0].op_type != "Transpose" or _perm(after[0]) != [0, 2, 1, 3]:
            continue
        back = users.get(after[0].output[0], [])
        if len(back) != 1 or back[0].op_type != "Reshape" or not (q[0] == k[0] == v[0]):
            continue
        hidden = q[1].shape[1]
        head = round(1.0 / scale**2)
        if (
            hidden % head
            or abs(scale - head**-0.5) > 1e-4 * scale
            or not q[1].shape == k[1].shape == v[1].shape
        ):
            continue
        base = sm.name.rsplit("/", 1)[0] or f"attention_{fused}"
        weight, bias = f"{base}/qkv_weight", f"{base}/qkv_bias"
        graph.initializer.extend(
            [
                numpy_helper.from_array(
                    np.concatenate([q[1], k[1], v[1]], axis=1).astype(np.float32), weight
                ),
                numpy_helper.from_array(np.concatenate([q[2], k[2], v[2]]).astype(np.float32), bias),
            ]
        )
        new_nodes.append(
            helper.make_node(
                "Attention",
                [q[0], weight, bias, "attention_mask_int32"],
                [back[0].output[0]],
                name=f"{base}/Attention",
                domain="com.microsoft",
                num_heads=hidden // head,
                scale=scale,
            )
        )
        fused += 1
    if not fused:
        return 0
    graph.node.insert(
        0,
        helper.make_node(
            "Cast",
            [MASK_INPUT],
            ["attention_mask_int32"],
            name="attention_mask/Cast",
            to=onnx.TensorProto.INT32,
        ),
    )
    graph.node.extend(new_nodes)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _prune_and_sort(model)
    return fused


def _prune_and_sort(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers no output depends on; order nodes topologically."""
    graph = model.graph
    prod = _producers(graph)
    needed, stack, keep = set(), [o.name for o in graph.output], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = prod.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = [n for n in graph.node if id(n) in keep], []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("attention fusion left a graph with a cycle or a missing input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    used = {i for n in ordered for i in n.input}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)


def split_qkv_constants(model: onnx.ModelProto) -> None:
    """Store each QAttention's int8 QKV weight, scales and zero points as three per-projection tensors joined
    by a Concat (constant-folded when the session loads). The pieces are the same bytes the other int8
    form keeps for its separate Q, K and V MatMuls, so the shared weights file holds them once."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    joins = []
    for node in graph.node:
        if node.op_type != "QAttention":
            continue
        for slot in (1, 4, 7):  # weight, weight_scale, weight_zero_point
            name = node.input[slot] if len(node.input) > slot else ""
            tensor = inits.get(name)
            if tensor is None or not tensor.dims or tensor.dims[-1] % 3:
                continue
            array = numpy_helper.to_array(tensor)
            parts = [f"{name}.{p}" for p in "qkv"]
            graph.initializer.remove(tensor)
            del inits[name]
            graph.initializer.extend(
                numpy_helper.from_array(np.ascontiguousarray(a), n)
                for a, n in zip(np.split(array, 3, axis=-1), parts)
            )
            joins.append(helper.make_node("Concat", parts, [name], name=f"{name}/join", axis=-1))
    if joins:  # inputs are initializers, so the front of the graph is a valid topological place
        rest = list(graph.node)
        del graph.node[:]
        graph.node.extend(joins + rest)

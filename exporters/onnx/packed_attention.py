"""Fused prefixed layers as ONNX Runtime's ``com.microsoft.Attention``: packed QKV weights, the prefix as its past.

Why: ``fused_attention.py`` writes one ``MultiHeadAttention`` node per prefixed layer, fed separate query, key and
value. Once ``merge_projections.py`` has merged the three projections into one GEMM, each layer still copies that
GEMM's output three times on the way there: a ``Split``, a ``Transpose`` of keys and values into (batch, heads, seq,
head_dim), and a ``Concat`` of the prefix in front. ORT's ``Attention`` op takes the layer input and the packed
weights, projects and lays out Q/K/V itself, and takes the prefix as ``past`` (2, batch, heads, n, head_dim), which
it puts in front of the keys and values; its 2-D mask covers past and current keys, which is exactly the (batch,
n + seq) key-padding mask the ``MultiHeadAttention`` node already has. One MiniLM layer in ORT 1.32 on 2 CPU
threads (a one-off script, `/tmp/att/exp.py`, not in the repo): the same time at batch 1 x 16, 0.92x at 32 x 64.

The op refuses a ``past`` without its ``present`` output ("Expect to have present state output when past state input
is given"), so the rewritten node declares one (unused, not a graph output): a graph optimizer that pruned it would
make the graph fail loudly, never drop the prefix silently. The rewrite computes the same attention; every export
is still validated against PyTorch.

Layers in another layout stay ``MultiHeadAttention``: keys/values already prefixed in (batch, seq, hidden)
(BERT-family attention computed inline, transformers 4.5x) and per-projection biases added after the split (the
TorchScript exporter's graphs). Only graphs that stay float32 are rewritten: an int8 export keeps
``MultiHeadAttention`` so that ORT's quantizer sees the projection GEMM (``quantize.py``); float16 exports have no
fused attention at all (``fused_attention.py``). Exports on CUDA keep ``MultiHeadAttention`` too (``export.py``):
ORT's CUDA ``Attention`` kernel with a past has not been run for this project.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .fused_attention import DOMAIN, FUSED_OP, PACKED_OP
from .merge_projections import names_read

_BNSH = [0, 2, 1, 3]


@dataclass(frozen=True)
class _Match:
    """One ``MultiHeadAttention`` node whose query/key/value are the three thirds of one projection GEMM."""

    node: onnx.NodeProto
    hidden: str  # the layer input the GEMM projects
    weight: str  # (hidden, 3 x width) initializer
    bias: str | None  # (3 x width) initializer, or None when the GEMM has no bias
    prefix_key: str  # (batch, heads, n, head_dim): the prefix keys, already expanded to the batch
    prefix_value: str
    mask: str  # (batch, n + seq) int32 key-padding mask


def pack_prefixed_attention(model: onnx.ModelProto) -> int:
    """Rewrite every matching fused prefixed layer of ``model`` (in place) as one ``com.microsoft.Attention`` node;
    returns how many were rewritten. Nodes that do not match the pattern are left as they are."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    matches = [m for node in graph.node if (m := _match(node, producers, initializers)) is not None]
    for index, match in enumerate(matches):
        _replace(graph, match, index)
    if matches:
        _drop_dead_nodes(graph)
    return len(matches)


def count_packed(graph: onnx.GraphProto) -> int:
    return sum(1 for node in graph.node if node.op_type == PACKED_OP and node.domain == DOMAIN)


def _match(node: onnx.NodeProto, producers: dict, initializers: dict) -> _Match | None:
    if node.op_type != FUSED_OP or node.domain != DOMAIN:
        return None
    inputs = list(node.input)
    if len(inputs) != 5 or inputs[3] or not inputs[4] or len([o for o in node.output if o]) != 1:
        return None  # a bias, attention bias or past inputs, or present outputs: not the layout fused_attention writes
    query = _through_reshapes(inputs[0], producers)
    key, value = (_prefixed_states(name, producers) for name in inputs[1:3])
    if key is None or value is None:
        return None
    split = producers.get(query)
    if split is None or split.op_type != "Split" or list(split.output) != [query, key[1], value[1]]:
        return None
    gemm = _projection(split, producers, initializers)
    if gemm is None:
        return None
    hidden, weight, bias = gemm
    return _Match(node, hidden, weight, bias, key[0], value[0], inputs[4])


def _through_reshapes(name: str, producers: dict) -> str:
    while (node := producers.get(name)) is not None and node.op_type == "Reshape":
        name = node.input[0]
    return name


def _prefixed_states(name: str, producers: dict) -> tuple[str, str] | None:
    """``Concat(prefix, Transpose(Reshape(third)), axis=2)`` -> (prefix, third)."""
    concat = producers.get(name)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 or _attr(concat, "axis") not in (2, -2):
        return None
    prefix, states = concat.input
    transpose = producers.get(states)
    if transpose is None or transpose.op_type != "Transpose" or list(_attr(transpose, "perm") or []) != _BNSH:
        return None
    reshape = producers.get(transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    return prefix, reshape.input[0]


def _projection(split: onnx.NodeProto, producers: dict, initializers: dict) -> tuple[str, str, str | None] | None:
    """The GEMM the split divides into three equal parts: (its input, its weight, its bias or None)."""
    if _attr(split, "axis") not in (-1, 2) or len(split.input) < 2 or split.input[1] not in initializers:
        return None
    sizes = numpy_helper.to_array(initializers[split.input[1]]).tolist()
    if len(sizes) != 3 or len(set(sizes)) != 1:
        return None
    source, bias = producers.get(split.input[0]), None
    if source is not None and source.op_type == "Add":
        terms = list(source.input)
        bias = next((t for t in terms if t in initializers), None)
        product = next((t for t in terms if t != bias), None)
        source = producers.get(product) if bias is not None else None
    if source is None or source.op_type != "MatMul" or source.input[1] not in initializers:
        return None
    weight = initializers[source.input[1]]
    if len(weight.dims) != 2 or weight.dims[1] != 3 * sizes[0]:
        return None
    if bias is not None and list(initializers[bias].dims) != [3 * sizes[0]]:
        return None
    return source.input[0], source.input[1], bias


def _replace(graph: onnx.GraphProto, match: _Match, index: int) -> None:
    node = match.node
    name = node.name or f"prefixed_attention_{index}"
    past = f"{name}/past"
    key, value, axes = f"{past}/key", f"{past}/value", f"{past}/axes"
    graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), axes))
    new = [
        helper.make_node("Unsqueeze", [match.prefix_key, axes], [key], name=f"{past}/unsqueeze_key"),
        helper.make_node("Unsqueeze", [match.prefix_value, axes], [value], name=f"{past}/unsqueeze_value"),
        helper.make_node("Concat", [key, value], [past], name=f"{past}/concat", axis=0),
    ]
    bias = match.bias
    if bias is None:
        weight = next(t for t in graph.initializer if t.name == match.weight)
        bias = f"{name}/zero_bias"
        zeros = np.zeros(weight.dims[1], dtype=helper.tensor_dtype_to_np_dtype(weight.data_type))
        graph.initializer.append(numpy_helper.from_array(zeros, bias))
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in ("num_heads", "scale",
                                                                                             "mask_filter_value")}
    new.append(helper.make_node(PACKED_OP, [match.hidden, match.weight, bias, match.mask, past],
                                [node.output[0], f"{name}/present"], name=name, domain=DOMAIN, **attributes))
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, created in enumerate(new):
        graph.node.insert(position + offset, created)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is used (the split, reshapes, transposes and concats the rewrite
    bypassed), then initializers nothing reads."""
    while True:
        used = names_read(graph)  # graph outputs included
        dead = [node for node in graph.node if not any(o in used for o in node.output if o)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = names_read(graph)
    graph_inputs = {i.name for i in graph.input}
    for tensor in [t for t in graph.initializer if t.name not in used and t.name not in graph_inputs]:
        graph.initializer.remove(tensor)


def _attr(node: onnx.NodeProto, name: str):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None

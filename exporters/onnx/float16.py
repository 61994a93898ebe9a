"""Mixed-precision float16 conversion of exported graphs: float16 storage and MatMuls, float32 where half overflows.

Why not convert every op: a residual stream above ~256 squares past float16's largest value (65504), so an RMSNorm
computed in half becomes ``rsqrt(inf) = 0`` and the layer outputs zeros; attention scores plus a ``finfo.min`` mask
and the softmax over them lose their range the same way. So, as PyTorch's autocast does, these stay float32:

* normalisations: ``LayerNormalization`` nodes, and decomposed norms (RMSNorm, T5's and Gemma's norms, manual
  LayerNorm): the square (``Pow``/``Mul``) feeding each ``ReduceMean``, its explicit float32 upcast, the
  ``ReduceMean`` and the chain after it (``Add`` eps, ``Sqrt``, ``Reciprocal``/``Div``) up to and including the node
  that applies the statistic to the activations;
* every ``Softmax`` and the attention-score path into it: the element-wise ops (scale, mask ``Add``/``Where``,
  mask ``Cast``, relative-position terms added to the scores) and reshapes between the score ``MatMul`` and the
  softmax.

Everything else, MatMuls and the prefix initializers included, is float16; graph inputs and outputs are float16.
The conversion itself is ONNX Runtime's ``onnxruntime.transformers.float16.convert_float_to_float16`` with those
nodes in ``node_block_list``; it wraps each kept node in casts, which we then drop between two float32 nodes (a
float32 -> float16 -> float32 round trip would overflow exactly where float32 was wanted), and its topological sort.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import onnx
from onnx import TensorProto
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

FLOAT32_OPS = ("LayerNormalization", "Softmax")
_NORM_CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal"}
_SCORE_PATH_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Neg", "Tanh"}
_SCORE_LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze"}  # DeBERTa reshapes its scores before the mask


def convert_to_float16(proto: onnx.ModelProto, *, external_path: Path | None = None) -> onnx.ModelProto:
    """``proto`` (float32) in mixed precision.

    ``external_path``: for graphs over protobuf's 2 GB, ``proto`` is first saved there with external data, and the
    converter reads the file (ONNX shape inference, which the converter needs for its casts, works on files only).
    """
    _name_nodes(proto.graph)
    keep = sorted(float32_nodes(proto.graph))
    source: onnx.ModelProto | str = proto
    if external_path is not None:
        onnx.save_model(proto, str(external_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_path.name + "_data")
        source = str(external_path)
    converted = convert_float_to_float16(
        source, keep_io_types=False, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FLOAT32_OPS),
        node_block_list=keep,
    )
    drop_float16_round_trips(converted.graph)
    OnnxModel.graph_topological_sort(converted.graph)  # the converter appends its casts at the end
    return converted


def float32_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes that must compute in float32 (see the module docstring)."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    keep: set[str] = {node.name for node in graph.node if node.op_type in FLOAT32_OPS}
    for node in graph.node:
        if node.op_type == "ReduceMean":
            keep |= _norm_nodes(node, producers, consumers, constants)
        elif node.op_type == "Softmax":
            keep |= _score_path(node, producers)
    return keep


def _norm_nodes(reduce: onnx.NodeProto, producers, consumers, constants: set[str]) -> set[str]:
    """The ReduceMean, the square and upcast before it, and the statistic's chain up to where it meets the input."""
    keep = {reduce.name}
    square = producers.get(reduce.input[0])
    if square is not None and _is_square(square, constants):
        keep.add(square.name)
        upcast = producers.get(square.input[0])
        if upcast is not None and upcast.op_type == "Cast" and _cast_target(upcast) == TensorProto.FLOAT:
            keep.add(upcast.name)
    chain = {reduce.output[0]}
    frontier = [reduce]
    while frontier:
        node = frontier.pop()
        for user in consumers.get(node.output[0], []):
            if user.op_type not in _NORM_CHAIN_OPS or user.name in keep:
                continue
            keep.add(user.name)
            others = [name for name in user.input if name not in chain and name not in constants]
            if others:  # the statistic meets the activations (x * rsqrt, (x - mean) / std): the norm ends here
                continue
            chain.add(user.output[0])
            frontier.append(user)
    return keep


def _is_square(node: onnx.NodeProto, constants: set[str]) -> bool:
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    return node.op_type == "Pow" and node.input[1] in constants


def _score_path(softmax: onnx.NodeProto, producers) -> set[str]:
    """Element-wise float ops between the score MatMul (not included) and the softmax, mask branches included."""
    keep: set[str] = set()
    stack = [softmax.input[0]]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in keep:
            continue
        if node.op_type == "Cast":
            if _cast_target(node) == TensorProto.FLOAT:
                keep.add(node.name)  # e.g. the mask's upcast: stays float32, and the walk stops at its input
            continue
        if node.op_type in _SCORE_LAYOUT_OPS:
            keep.add(node.name)
            stack.append(node.input[0])  # the scores; a shape or axes input is not on the path
            continue
        if node.op_type not in _SCORE_PATH_OPS:
            continue  # MatMul, Concat, Gather, Pad, Constant ...: the path starts here
        keep.add(node.name)
        stack.extend(node.input[1:] if node.op_type == "Where" else node.input)  # a Where's condition is boolean
    return keep


def _cast_target(node: onnx.NodeProto) -> int | None:
    return next((attr.i for attr in node.attribute if attr.name == "to"), None)


def drop_float16_round_trips(graph: onnx.GraphProto) -> int:
    """Let float32 consumers read a float32 value directly where the converter casts it to float16 and back.

    Only pairs ``Cast(to=float16)`` -> ``Cast(to=float32)`` whose first input is float32 are bypassed: for them the
    round trip can only lose range and precision. Casts left unread are removed. Returns the number bypassed.
    """
    types = _elem_types(graph)
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    replace: dict[str, str] = {}
    candidates: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "Cast" or _cast_target(node) != TensorProto.FLOAT or node.output[0] in outputs:
            continue
        first = producers.get(node.input[0])
        if first is not None and first.op_type == "Cast" and _cast_target(first) == TensorProto.FLOAT16 \
                and types.get(first.input[0]) == TensorProto.FLOAT:
            replace[node.output[0]] = first.input[0]
            candidates.extend((node, first))
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in replace:
                node.input[index] = replace[name]
    used = _read_names(graph) | outputs
    unread = {node.name for node in candidates if node.output[0] not in used}  # every node is named by now
    if unread:
        kept = [node for node in graph.node if node.name not in unread]
        graph.ClearField("node")
        graph.node.extend(kept)
    return len(replace)


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:  # a Cast's output type is its target, value_info or not
        if node.op_type == "Cast":
            types[node.output[0]] = _cast_target(node)
    return types


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node reads, in subgraphs (If/Loop bodies read outer values by name) too."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for subgraph in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                names |= _read_names(subgraph) | {o.name for o in subgraph.output}
    return names


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes unique names: blocking works by node name."""
    taken = {node.name for node in graph.node if node.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"ptv2_{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)

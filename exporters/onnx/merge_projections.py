"""One GEMM instead of several: MatMuls that read the same activation with constant weights are merged.

Why: attention's query, key and value projections (and a gated MLP's gate and up projections, or cross-attention's
key and value) all multiply the same hidden states by a constant weight. As separate nodes they are separate GEMM
calls, each too narrow to use the CPU well at small batches, and each with its own dispatch cost: on
all-MiniLM-L6-v2 at batch 1 x 16 tokens, the base model's ORT-optimized graph (one packed QKV GEMM per layer) was
1.13x faster than our export before this rewrite (``python -m benchmarks.onnx_inference``). The rewrite is exact
in arithmetic: ``x @ [W1 | W2 | W3] = [x @ W1 | x @ W2 | x @ W3]``; the concatenated product is split back into
the original tensors, so nothing downstream changes. Per-channel int8 quantization (``quantize.py``) quantizes each
output column on its own, so it sees the same weights either way.

What is merged: two or more ``MatMul`` nodes with the same first input whose second input is a 2-D initializer with
the same number of rows, except initializers the exporter owns (``ptv2.*``: prefix and swappable heads) and those
that are also graph inputs (overridable). If every one of them is followed by an ``Add`` of a 1-D constant bias
(its only consumer), the biases are merged too.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .layout import OWNED_PREFIX

MIN_OPSET = 13  # Split takes its sizes as an input from opset 13


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def merge_shared_input_projections(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place; returns how many groups were merged (0 leaves the graph untouched)."""
    graph = model.graph
    if _opset(model) < MIN_OPSET:
        return 0
    weights = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}

    def weight_of(node: onnx.NodeProto):
        name = node.input[1]
        tensor = weights.get(name)
        if tensor is None or name in inputs or name.startswith(OWNED_PREFIX) or len(tensor.dims) != 2:
            return None
        return tensor

    groups: dict[tuple[str, int, int], list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            tensor = weight_of(node)
            if tensor is not None:
                groups[(node.input[0], int(tensor.dims[0]), int(tensor.data_type))].append(node)

    position = {id(node): index for index, node in enumerate(graph.node)}
    removed: set[int] = set()
    inserted: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    merged = 0
    replaced: set[str] = set()
    for (source, _, _), nodes in groups.items():
        if len(nodes) < 2 or any(n.output[0] in graph_outputs for n in nodes):
            continue
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        widths = [int(a.shape[1]) for a in arrays]
        biases = []
        for n in nodes:
            after = consumers.get(n.output[0], [])
            add = after[0] if len(after) == 1 and after[0].op_type == "Add" and after[0].domain in ("", "ai.onnx") \
                else None
            other = None if add is None else next((i for i in add.input if i != n.output[0]), None)
            bias = weights.get(other) if other is not None and other not in inputs else None
            if bias is None or list(bias.dims) != [widths[len(biases)]] or add.output[0] in graph_outputs:
                break
            biases.append((add, bias))
        with_bias = len(biases) == len(nodes)
        stem = f"{nodes[0].name or nodes[0].output[0]}_merged"
        weight_name, sizes_name = f"{stem}.weight", f"{stem}.sizes"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), weight_name))
        graph.initializer.append(numpy_helper.from_array(np.asarray(widths, dtype=np.int64), sizes_name))
        product = f"{stem}.product"
        new = [helper.make_node("MatMul", [source, weight_name], [product], name=f"{stem}/MatMul")]
        if with_bias:
            bias_name = f"{stem}.bias"
            graph.initializer.append(numpy_helper.from_array(
                np.concatenate([numpy_helper.to_array(b) for _, b in biases]), bias_name))
            new.append(helper.make_node("Add", [product, bias_name], [f"{stem}.biased"], name=f"{stem}/Add"))
            product = f"{stem}.biased"
            outputs = [add.output[0] for add, _ in biases]
            removed.update(id(add) for add, _ in biases)
        else:
            outputs = [n.output[0] for n in nodes]
        new.append(helper.make_node("Split", [product, sizes_name], outputs, name=f"{stem}/Split", axis=-1))
        removed.update(id(n) for n in nodes)
        replaced.update(n.input[1] for n in nodes)
        replaced.update(b.name for _, b in biases if with_bias)
        inserted[min(position[id(n)] for n in nodes)].extend(new)
        merged += 1
    if not merged:
        return 0
    rewritten = []
    for index, node in enumerate(graph.node):
        rewritten.extend(inserted.get(index, ()))
        if id(node) not in removed:
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    _drop_unused(graph, replaced)
    return merged


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs reads, and the graph's outputs."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                names |= names_read(sub)
    return names


def _drop_unused(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """The merged weights and biases nothing reads any more, and annotations of tensors that no longer exist."""
    used = names_read(graph)
    kept = [t for t in graph.initializer if t.name in used or t.name not in candidates]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    produced = {name for node in graph.node for name in node.output}
    annotations = [v for v in graph.value_info if v.name in produced or v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(annotations)

"""Fused prefixed layers packed onto their query/key/value GEMM as ``com.microsoft.Attention`` (packed_attention.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from exporters.onnx import export  # noqa: E402
from exporters.onnx.packed_attention import count_packed, pack_prefixed_attention  # noqa: E402
from tests.exporter_matrix import only  # noqa: E402
from tests.test_export_onnx import batch, peft_model  # noqa: E402
from tests.tiny_models import TRANSFORMERS_5  # noqa: E402

HIDDEN, HEADS, HEAD_DIM, PREFIX = 16, 2, 8, 3


def _layer(bias: bool = True, sizes: tuple[int, int, int] = (HIDDEN,) * 3, prefix_scale: float = 1.0):
    """One prefixed layer in the layout the exporter writes: merged GEMM -> Split -> query (BSD, via reshapes),
    keys/values (BNSH, prefix concatenated in front) -> MultiHeadAttention with a (batch, n + seq) int32 mask."""
    rng = np.random.default_rng(0)
    width = sum(sizes)
    init = [numpy_helper.from_array(rng.standard_normal((HIDDEN, width)).astype(np.float32) * 0.3, "W"),
            numpy_helper.from_array(np.array(sizes, np.int64), "sizes"),
            numpy_helper.from_array(np.array([0, 0, HEADS, HEAD_DIM], np.int64), "bnsh"),
            numpy_helper.from_array(np.array([0, 0, HIDDEN], np.int64), "bsd"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one")]
    for name in ("key", "value"):
        prefix = rng.standard_normal((HEADS, PREFIX, HEAD_DIM)).astype(np.float32) * prefix_scale
        init.append(numpy_helper.from_array(prefix, f"ptv2.prefix.0.{name}"))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["product"])]
    if bias:
        init.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["product", "b"], ["biased"]))
    nodes += [helper.make_node("Split", ["biased" if bias else "product", "sizes"], ["q3", "k3", "v3"], axis=-1),
              helper.make_node("Reshape", ["q3", "bnsh"], ["q4"]), helper.make_node("Reshape", ["q4", "bsd"], ["q"]),
              helper.make_node("Shape", ["x"], ["shape"], start=0, end=1),
              helper.make_node("Concat", ["shape", "one", "one", "one"], ["expand_to"], axis=0)]
    for name in ("k", "v"):
        source = "ptv2.prefix.0." + ("key" if name == "k" else "value")
        nodes += [helper.make_node("Unsqueeze", [source, "zero"], [f"{name}_prefix1"]),
                  helper.make_node("Expand", [f"{name}_prefix1", "expand_to"], [f"{name}_prefix"]),
                  helper.make_node("Reshape", [f"{name}3", "bnsh"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Concat", [f"{name}_prefix", f"{name}t"], [f"{name}_all"], axis=2)]
    nodes.append(helper.make_node("MultiHeadAttention", ["q", "k_all", "v_all", "", "mask"], ["y"],
                                  domain="com.microsoft", num_heads=HEADS, scale=HEAD_DIM ** -0.5))
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
         helper.make_tensor_value_info("mask", TensorProto.INT32, ["batch", "keys"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])], init)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def _run(model, x, mask):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "mask": mask})[0]


def _feeds(batch_size: int = 3, seq: int = 5):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch_size, seq, HIDDEN)).astype(np.float32)
    mask = np.ones((batch_size, PREFIX + seq), np.int32)
    mask[1, -2:] = 0  # a padded row: its last two keys must stay hidden
    return x, mask


def _ops(model) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("bias", [True, False])
def test_the_layer_becomes_one_attention_node_with_the_same_outputs(bias):
    model, x_mask = _layer(bias=bias), _feeds()
    expected = _run(model, *x_mask)
    packed = onnx.ModelProto.FromString(model.SerializeToString())
    assert pack_prefixed_attention(packed) == 1
    onnx.checker.check_model(packed)
    ops = _ops(packed)
    assert ops["Attention"] == count_packed(packed.graph) == 1
    assert not {"MultiHeadAttention", "Split", "Transpose"} & set(ops)  # the copies the rewrite exists to remove
    actual = _run(packed, *x_mask)
    # the prefix moves every output by far more than the tolerance, so a dropped or misplaced prefix fails here
    without_prefix = _run(_layer(bias=bias, prefix_scale=0.0), *x_mask)
    assert np.abs(expected - without_prefix).max() > 0.1
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_layers_outside_the_pattern_are_left_alone():
    unequal = _layer(sizes=(HIDDEN, HIDDEN, 2 * HIDDEN))  # a value width Attention's packed weight cannot express
    before = unequal.SerializeToString()
    assert pack_prefixed_attention(unequal) == 0
    assert unequal.SerializeToString() == before
    with_bias_input = _layer()
    mha = next(n for n in with_bias_input.graph.node if n.op_type == "MultiHeadAttention")
    mha.input[3] = "b"  # a MultiHeadAttention bias input: not the layout fused_attention writes
    assert pack_prefixed_attention(with_bias_input) == 0


@pytest.mark.parametrize("exporter", only("dynamo"))
def test_float32_exports_pack_and_int8_exports_keep_multihead_attention(tmp_path, exporter):
    model = peft_model("bert")
    layers = model.base_model.config.num_hidden_layers
    float_folder = export(model, tmp_path / "float", exporter=exporter)  # validates against PyTorch
    int8_folder = export(model, tmp_path / "int8", exporter=exporter, quantize="int8")

    def fused(folder):
        return json.loads((folder / "ptv2_export.json").read_text())["fused_attention"]

    # transformers 4.5x computes BERT attention inline; its fused layers take keys/values already prefixed in BSD
    # (fused_attention.py's "projection" path), a layout the rewrite leaves as MultiHeadAttention
    packed = "com.microsoft.Attention" if TRANSFORMERS_5 else "com.microsoft.MultiHeadAttention"
    assert fused(float_folder) == {"ops": {packed: layers}, "layers": layers}
    assert fused(int8_folder) == {"ops": {"com.microsoft.MultiHeadAttention": layers}, "layers": layers}
    assert json.loads((float_folder / "ptv2_export.json").read_text())["parity"]["ok"]
    inputs = batch(3, 7, right_pad=3)
    session = ort.InferenceSession(str(float_folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() if i.name in inputs else np.zeros_like(inputs["input_ids"].numpy())
             for i in session.get_inputs()}
    with torch.no_grad():
        reference = model.eval()(**inputs).logits.numpy()
    np.testing.assert_allclose(session.run(None, feeds)[0], reference, atol=1e-5, rtol=0)

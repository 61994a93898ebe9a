"""The outlier-channel split of int8 down projections (``exporters/onnx/outlier_channels.py``): exact in float32,
much closer to float32 than whole-tensor int8 when one channel is an outlier, and calibrated from the graph itself."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402

from exporters.onnx import quantize as Q  # noqa: E402
from exporters.onnx.outlier_channels import (  # noqa: E402
    OUTLIER_CHANNELS,
    as_matmul,
    channel_absmax,
    outlier_channels,
    split_outlier_channels,
)

K, N = 64, 16  # a down projection: more input channels than outputs
OUTLIER = 5


def _down_projection(weight: np.ndarray, residual: bool = False) -> onnx.ModelProto:
    """x @ w; ``residual``: added to a ``stream`` input as a transformer's residual connection does, so the product is
    not a task head's (whose product would reach the graph's output directly)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0" if residual else "y"], name="down")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])]
    if residual:
        nodes.append(helper.make_node("Add", ["y0", "stream"], ["y"], name="residual"))
        inputs.append(helper.make_tensor_value_info("stream", TensorProto.FLOAT, ["batch", "seq", N]))
    graph = helper.make_graph(
        nodes, "down", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feed(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": x, "stream": np.zeros((*x.shape[:-1], N), dtype=np.float32)}


def _activations(seed: int) -> np.ndarray:
    """GELU-like activations (mostly small, slightly negative allowed) with one channel 40x larger."""
    x = np.random.default_rng(seed).standard_normal((4, 8, K)).astype(np.float32)
    x = np.maximum(x, -0.17)
    x[..., OUTLIER] *= 40
    return x


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: _feed(x)[i.name] for i in session.get_inputs()})[0]


@pytest.fixture()
def weight():
    return np.random.default_rng(1).standard_normal((K, N)).astype(np.float32) / 8


def test_split_is_exact_in_float32(tmp_path, weight):
    proto = _down_projection(weight)
    split_outlier_channels(proto.graph, proto.graph.node[0], np.array([2, OUTLIER, 40], dtype=np.int64))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp_path / "split.onnx"))
    x = _activations(0)
    np.testing.assert_allclose(_run(tmp_path / "split.onnx", x), x @ weight, rtol=1e-5, atol=1e-5)
    ops = [node.op_type for node in proto.graph.node]
    assert ops == ["Mul", "Gather", "MatMul", "MatMul", "Add"]  # topologically ordered around the original


def test_calibration_finds_the_outlier_channel(tmp_path, weight):
    proto = _down_projection(weight)
    feeds = [{"x": _activations(seed)} for seed in range(3)]
    absmax = channel_absmax(proto, ["x"], feeds, tmp_path)["x"]
    np.testing.assert_allclose(absmax, np.max([np.abs(f["x"]).max(axis=(0, 1)) for f in feeds], axis=0))
    channels = outlier_channels(absmax)
    assert OUTLIER in channels and len(channels) == OUTLIER_CHANNELS and list(channels) == sorted(channels)
    assert outlier_channels(absmax[: 2 * OUTLIER_CHANNELS]).size == 0  # too narrow to split: left whole
    assert list(tmp_path.iterdir()) == []  # the probe graph is gone


def test_int8_with_the_split_is_much_closer_to_float32_than_whole_int8(tmp_path, weight):
    """The reason the split exists: one outlier channel sets the per-tensor activation scale of whole int8."""
    proto = _down_projection(weight, residual=True)
    onnx.save(proto, str(tmp_path / "float.onnx"))
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "whole.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, extra_options={"MatMulConstBOnly": True})
    onnx.save(proto, str(tmp_path / "split.onnx"))
    info = Q.quantize_graph(tmp_path / "split.onnx", [_feed(_activations(seed)) for seed in range(3)])
    assert info["down_projections_split"]["count"] == 1 and info["quantized_ops"]
    x = _activations(7)
    reference = x @ weight
    whole = np.abs(_run(tmp_path / "whole.onnx", x) - reference).mean()
    split = np.abs(_run(tmp_path / "split.onnx", x) - reference).mean()
    assert split < whole / 4, (split, whole)
    assert split > 0  # still an int8 computation


def test_a_task_head_stays_whole_and_float32():
    head = _down_projection(np.ones((K, N), dtype=np.float32))  # its product is the graph's output
    assert Q.task_heads(head.graph, ["down"]) == ["down"]
    # a residual connection (an Add of two activations) ends the search, even where the stream then becomes an
    # output through plain ops (T5's RMS norm is Pow/ReduceMean/Mul): a feed-forward down projection, not a head
    residual = _down_projection(np.ones((K, N), dtype=np.float32), residual=True)
    assert Q.task_heads(residual.graph, ["down"]) == []
    residual.graph.node[1].output[0] = "y1"
    residual.graph.node.append(helper.make_node("Mul", ["y1", "y1"], ["y"], name="norm_like"))
    assert Q.task_heads(residual.graph, ["down"]) == []


def test_a_gemm_becomes_matmul_and_add_with_the_same_result(tmp_path):
    rng = np.random.default_rng(3)
    weight_t, bias = rng.standard_normal((N, K)).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="down", transB=1)], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", N])],
        [numpy_helper.from_array(weight_t, "w"), numpy_helper.from_array(bias, "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    node = as_matmul(proto.graph, proto.graph.node[0])
    assert node is not None and [n.op_type for n in proto.graph.node] == ["MatMul", "Add"]
    onnx.save(proto, str(tmp_path / "m.onnx"))
    x = rng.standard_normal((5, K)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), x @ weight_t.T + bias, rtol=1e-5, atol=1e-5)
    scaled = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="scaled", alpha=2.0)
    assert as_matmul(proto.graph, scaled) is None  # anything but the plain form is left alone

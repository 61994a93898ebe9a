"""Feed-forward down projections in int8 without their outlier channels.

Why: a down projection reads the activation function's output, where a handful of input channels carry values an
order of magnitude above the rest (all-MiniLM-L6-v2 with a trained SST-2 prefix: one channel per layer reaches 13-24,
against a median channel maximum of about 1.4). Dynamic int8 quantizes each activation with one scale per tensor, so
those few channels set the scale and every other channel loses its precision. Kept float32 whole, the six down
projections took 37% of the int8 graph's kernel time at b32 x s64 (``benchmarks/results/onnx_inference``); quantized
whole, they doubled the predictions that flip against float32.

What this does instead (the decomposition of LLM.int8(), Dettmers et al. 2022, on ONNX Runtime's dynamic kernels):
the ``OUTLIER_CHANNELS`` input channels with the largest magnitude run as a float32 MatMul of ``k`` columns, the
rest as the usual int8 one::

    Y = MatMul(Mul(X, keep), W with the outlier rows zeroed)      # int8 (the quantizer rewrites it)
      + MatMul(Gather(X, outliers, axis=-1), W[outliers])          # float32, k input channels

``keep`` zeroes the outlier channels before ``DynamicQuantizeLinear`` sees them, so they no longer set the scale.

Which channels: the float graph is run on calibration batches and each down projection's input is read back; its
channels are ranked by their largest magnitude. Outlier channels are a property of the trained weights, not of the
text: on MiniLM, random token ids put the same largest channel first in every layer as 256 SST-2 sentences did, and
the two graphs agreed with float32 on the same share of dev predictions. So the export calibrates on its own sample
inputs and needs no data from the user. SmoothQuant-style per-channel scaling (alpha 0.3-0.7) was tried on the same
adapter and did worse than this split.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .postprocess import EXTERNAL_DATA_BYTES
from .providers import CPU

OUTLIER_CHANNELS = 4


def channel_absmax(proto: onnx.ModelProto, tensors: Sequence[str], feeds: Iterable[dict[str, np.ndarray]],
                   workdir: Path) -> dict[str, np.ndarray]:
    """Largest |value| per last-axis channel of each named intermediate tensor, over every feed.

    The float graph runs once per feed with those tensors added as outputs (a copy written to ``workdir``)."""
    if not tensors:
        return {}  # nothing to measure: no session, no copy of the graph
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for name in tensors:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory(dir=workdir, prefix="calibration-") as tmp:
        path = Path(tmp) / "probe.onnx"
        large = probe.ByteSize() > EXTERNAL_DATA_BYTES
        onnx.save_model(probe, str(path), save_as_external_data=large, location="probe.onnx_data" if large else None)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
        found: dict[str, np.ndarray] = {}
        for feed in feeds:
            for name, value in zip(tensors, session.run(list(tensors), feed)):
                flat = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                found[name] = flat if name not in found else np.maximum(found[name], flat)
        del session
    if len(found) != len(tensors):
        raise RuntimeError("Calibration ran no batch: no outlier channels could be measured.")
    return found


def outlier_channels(absmax: np.ndarray, count: int = OUTLIER_CHANNELS) -> np.ndarray:
    """Indices (ascending) of the ``count`` largest channels; none when that would leave no channel for int8."""
    if count <= 0 or absmax.shape[0] <= 2 * count:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.argsort(absmax, kind="stable")[::-1][:count]).astype(np.int64)


def as_matmul(graph: onnx.GraphProto, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """A ``Gemm`` (A @ B + C, B constant, the default alpha, beta and transA) rewritten in place as ``MatMul`` and
    ``Add``, the form ``split_outlier_channels`` takes (ONNX Runtime's quantizer rewrites a Gemm the same way);
    the MatMul keeps the Gemm's name. A MatMul is returned as it is; None for any other Gemm."""
    if node.op_type == "MatMul":
        return node
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type != "Gemm" or attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 \
            or attributes.get("beta", 1.0) != 1.0:
        return None
    if sum(node.input[1] in other.input for other in graph.node) > 1:
        return None  # a weight shared with another node (tied) is left as it is
    weights = {t.name: t for t in graph.initializer}
    if attributes.get("transB", 0):
        transposed = numpy_helper.to_array(weights[node.input[1]]).T.copy()
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(transposed, node.input[1]))
    output, bias = node.output[0], node.input[2] if len(node.input) > 2 and node.input[2] else None
    del node.attribute[:]
    node.op_type = "MatMul"
    if bias is not None:
        del node.input[2]
        node.output[0] = f"{node.name}/product"
        position = list(graph.node).index(node)
        graph.node.insert(position + 1, helper.make_node("Add", [node.output[0], bias], [output],
                                                         name=f"{node.name}/bias"))
    return node


def split_outlier_channels(graph: onnx.GraphProto, node: onnx.NodeProto, channels: np.ndarray) -> str:
    """Rewrite ``node`` (MatMul of an activation by a constant (K, N) weight) as the sum above; returns the name of
    the float32 MatMul over the outlier channels, which the quantizer must leave alone."""
    weights = {t.name: t for t in graph.initializer}
    weight = numpy_helper.to_array(weights[node.input[1]]).copy()
    tag = f"{node.name}/outliers"
    keep = np.ones(weight.shape[0], dtype=weight.dtype)
    keep[channels] = 0
    outlier_rows = weight[channels]
    weight[channels] = 0
    weights[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
    graph.initializer.extend([numpy_helper.from_array(keep, f"{tag}/keep"),
                              numpy_helper.from_array(channels, f"{tag}/index"),
                              numpy_helper.from_array(outlier_rows, f"{tag}/weight")])
    activation, output = node.input[0], node.output[0]
    float_matmul = f"{tag}/MatMul"
    before = [
        helper.make_node("Mul", [activation, f"{tag}/keep"], [f"{tag}/inliers"], name=f"{tag}/Mul"),
        helper.make_node("Gather", [activation, f"{tag}/index"], [f"{tag}/outliers"], name=f"{tag}/Gather", axis=-1),
        helper.make_node("MatMul", [f"{tag}/outliers", f"{tag}/weight"], [f"{tag}/outlier_product"],
                         name=float_matmul),
    ]
    node.input[0], node.output[0] = f"{tag}/inliers", f"{tag}/inlier_product"
    after = helper.make_node("Add", [f"{tag}/inlier_product", f"{tag}/outlier_product"], [output], name=f"{tag}/Add")
    position = list(graph.node).index(node)
    graph.node.insert(position + 1, after)
    for offset, new in enumerate(before):
        graph.node.insert(position + offset, new)
    return float_matmul

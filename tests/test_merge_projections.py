"""Projections that share an input become one GEMM (``exporters/onnx/merge_projections.py``), exactly."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from exporters.onnx import export  # noqa: E402
from exporters.onnx.merge_projections import merge_shared_input_projections  # noqa: E402
from tests.exporter_matrix import only  # noqa: E402
from tests.test_export_onnx import peft_model  # noqa: E402

HIDDEN = 8


def _graph(opset: int = 17, protected: bool = False, biases: tuple[bool, ...] = (True, True, True)):
    """x -> three MatMuls (optionally + bias) -> three outputs through Relu (so the MatMuls are not graph outputs)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])
    nodes, inits, outputs = [], [], []
    for k, width in enumerate((HIDDEN, HIDDEN, 4)):
        weight = ("ptv2.head.weight" if protected and k == 2 else f"w{k}")
        inits.append(numpy_helper.from_array(rng.standard_normal((HIDDEN, width)).astype(np.float32), weight))
        nodes.append(helper.make_node("MatMul", ["x", weight], [f"m{k}"], name=f"mm{k}"))
        last = f"m{k}"
        if biases[k]:
            inits.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{k}"))
            nodes.append(helper.make_node("Add", [last, f"b{k}"], [f"a{k}"]))
            last = f"a{k}"
        nodes.append(helper.make_node("Relu", [last], [f"y{k}"]))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, ["batch", "sequence", width]))
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _ops(model) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("biases", [(True, True, True), (True, False, True)])
def test_three_projections_become_one_matmul_with_the_same_outputs(biases):
    x = np.random.default_rng(1).standard_normal((2, 5, HIDDEN)).astype(np.float32)
    model = _graph(biases=biases)
    reference = _run(model, x)
    assert merge_shared_input_projections(model) == 1
    onnx.checker.check_model(model)
    ops = _ops(model)
    assert ops["MatMul"] == 1 and ops["Split"] == 1
    assert ops["Add"] == (1 if all(biases) else sum(biases))  # biases merge only when every projection has one
    assert {t.name for t in model.graph.initializer}.isdisjoint({"w0", "w1", "w2"})
    for expected, actual in zip(reference, _run(model, x)):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def test_exporter_owned_weights_and_old_opsets_are_left_alone():
    model = _graph(protected=True)
    assert merge_shared_input_projections(model) == 1  # w0 and w1 only
    assert "ptv2.head.weight" in {t.name for t in model.graph.initializer} and _ops(model)["MatMul"] == 2
    untouched = _graph(opset=12)
    assert merge_shared_input_projections(untouched) == 0 and _ops(untouched)["MatMul"] == 3


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("exporter", only("dynamo", "torchscript"))
def test_exports_carry_one_projection_gemm_per_shared_input_and_validate(tmp_path, arch, exporter):
    """BERT: query/key/value per layer; Llama: query/key/value and gate/up per layer. The export validates against
    PyTorch (parity), so the merged graph computes what the model does."""
    model = peft_model(arch)
    folder = export(model, tmp_path / arch, exporter=exporter)
    layers = model.base_model.config.num_hidden_layers
    ops = _ops(onnx.load(str(folder / "model.onnx")))
    # a merged query/key/value GEMM feeds a Split, or is packed into one Attention node (packed_attention.py)
    assert ops["Split"] + ops["Attention"] >= layers * (2 if arch == "llama" else 1)

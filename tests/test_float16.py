"""Mixed-precision float16 export: norms, softmax and attention scores stay float32, everything else is half.

ONNX Runtime's CPU provider runs most float16 ops by casting to float32 internally, so CPU parity alone cannot show
what a GPU computes. The ONNX reference evaluator runs every op in the dtype the graph declares, as a GPU kernel
does: on it, a norm converted to float16 overflows (x**2 above 65504) and its layer outputs zeros.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from exporters.onnx import ORTModelForCausalLM, ORTModelForSequenceClassification, export  # noqa: E402
from exporters.onnx.float16 import convert_to_float16, float32_nodes  # noqa: E402
from tests.parity import assert_parity  # noqa: E402
from tests.test_export_onnx import batch, peft_model  # noqa: E402

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


# ------------------------------------------------------------------------------------- which nodes stay float32
def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=helper.make_tensor(name, FLOAT, [], [float(value)]))


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, FLOAT, None) for n in outputs], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _rms_norm_model() -> onnx.ModelProto:
    """LlamaRMSNorm as the tracer writes it (upcast, x**2, mean, + eps, sqrt, 1 / ., x * ., downcast, * weight),
    then a projection and a gelu_new-style cube that must stay half."""
    weight = onnx.numpy_helper.from_array(np.full(4, 0.5, np.float32), "weight")
    proj = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "proj")
    nodes = [
        _const("two", 2), _const("eps", 1e-6), _const("one", 1), _const("three", 3),
        helper.make_node("Cast", ["x"], ["up"], name="upcast", to=FLOAT),
        helper.make_node("Pow", ["up", "two"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="mean", axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt"),
        helper.make_node("Div", ["one", "std"], ["inv"], name="inverse"),
        helper.make_node("Mul", ["up", "inv"], ["normed"], name="apply"),
        helper.make_node("Cast", ["normed"], ["down"], name="downcast", to=FLOAT),
        helper.make_node("Mul", ["weight", "down"], ["scaled"], name="weight_mul"),
        helper.make_node("MatMul", ["scaled", "proj"], ["y"], name="projection"),
        helper.make_node("Pow", ["y", "three"], ["cube"], name="cube"),
    ]
    return _model(nodes, [("x", [2, 4])], ["y", "cube"], [weight, proj])


def test_rms_norm_chain_stays_float32_up_to_where_it_meets_the_activations():
    keep = float32_nodes(_rms_norm_model().graph)
    assert keep == {"upcast", "square", "mean", "add_eps", "sqrt", "inverse", "apply"}


def test_manual_layer_norm_and_attention_scores_stay_float32():
    gamma = onnx.numpy_helper.from_array(np.ones(4, np.float32), "gamma")
    nodes = [
        _const("two", 2), _const("eps", 1e-5), _const("scale", 2), _const("one", 1), _const("min", -3.4e38),
        helper.make_node("ReduceMean", ["x"], ["mu"], name="mean", axes=[-1], keepdims=1),
        helper.make_node("Sub", ["x", "mu"], ["centered"], name="center"),
        helper.make_node("Pow", ["centered", "two"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="variance", axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt"),
        helper.make_node("Div", ["centered", "std"], ["normed"], name="normalize"),
        helper.make_node("Mul", ["normed", "gamma"], ["h"], name="gamma_mul"),
        # attention scores: q k^T / scale + (1 - mask) * min -> softmax -> @ v
        helper.make_node("Transpose", ["h"], ["hT"], name="transpose"),
        helper.make_node("MatMul", ["h", "hT"], ["scores"], name="qk"),
        helper.make_node("Div", ["scores", "scale"], ["scaled"], name="scale_scores"),
        helper.make_node("Cast", ["mask"], ["mask_f"], name="mask_cast", to=FLOAT),
        helper.make_node("Sub", ["one", "mask_f"], ["inverted"], name="mask_invert"),
        helper.make_node("Mul", ["inverted", "min"], ["bias"], name="mask_bias"),
        helper.make_node("Add", ["scaled", "bias"], ["masked"], name="mask_add"),
        helper.make_node("Constant", [], ["shape"], name="shape_const",
                         value=helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2])),
        helper.make_node("Reshape", ["masked", "shape"], ["viewed"], name="scores_view"),  # as DeBERTa does
        helper.make_node("Softmax", ["viewed"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "h"], ["y"], name="pv"),
    ]
    model = _model(nodes, [("x", [2, 4])], ["y"], [gamma])
    model.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.INT64, [2]))
    assert float32_nodes(model.graph) == {
        "mean", "center", "square", "variance", "add_eps", "sqrt", "normalize",  # the norm
        "scale_scores", "mask_cast", "mask_invert", "mask_bias", "mask_add", "scores_view", "softmax",  # scores
    }


def test_converted_norm_is_finite_where_a_half_norm_overflows():
    x = np.array([[300.0, -400.0, 250.0, 10.0], [1.0, 2.0, 3.0, 4.0]], np.float32)  # x**2 > 65504
    model = _rms_norm_model()
    expected = ReferenceEvaluator(model).run(["y"], {"x": x})[0]
    converted = convert_to_float16(model)
    onnx.checker.check_model(converted)
    graph = onnx.shape_inference.infer_shapes(converted).graph
    types, nodes = _types(graph), {n.name: n for n in graph.node}
    producer = {out: n.name for n in graph.node for out in n.output}
    # the chain reads float32 straight from the node before it: no float32 -> float16 -> float32 round trip
    for name, previous in [("square", "upcast"), ("mean", "square"), ("add_eps", "mean"), ("sqrt", "add_eps"),
                           ("inverse", "sqrt")]:
        assert producer[nodes[name].input[0 if name != "inverse" else 1]] == previous, name
        assert types[nodes[name].output[0]] == FLOAT, name
    assert types["y"] == types["cube"] == HALF and _initializer("proj", graph).data_type == HALF
    for result in (ReferenceEvaluator(converted).run(["y"], {"x": x.astype(np.float16)})[0],
                   _ort(converted, {"x": x.astype(np.float16)})):
        np.testing.assert_allclose(result.astype(np.float32), expected, rtol=2e-3, atol=1e-3)


# --------------------------------------------------------------------------------------- exported float16 graphs
SCALE = {"llama": 7500.0, "bert": 2000.0}  # embeddings x this: activations far past float16's square root


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """arch -> (model, folder, inputs, max |activation| in PyTorch) for a model whose activations exceed 300."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model = peft_model(arch)
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(SCALE[arch])
            inputs = batch(3, 6, right_pad=2 if arch == "bert" else 0, seed=5)
            if arch == "llama":
                inputs["position_ids"] = torch.arange(6).expand(3, 6)
            folder = export(model, tmp_path_factory.mktemp(arch) / "fp16", dtype="float16")  # validation passes
            cache[arch] = (model, folder, inputs, _max_activation(model, inputs))
        return cache[arch]

    return get


def _max_activation(model, inputs) -> float:
    """Largest value that enters a norm: the residual stream (Llama) or the summed embeddings (BERT)."""
    inner = model.base_model.model
    with torch.no_grad():
        if hasattr(inner, "bert"):
            embeddings = inner.bert.embeddings
            summed = embeddings.word_embeddings(inputs["input_ids"]) + embeddings.position_embeddings.weight[:6]
            return summed.abs().max().item()
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        return max(h.abs().max().item() for h in hidden)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_float16_graph_survives_activations_beyond_half_range(scaled, arch):
    model, folder, inputs, activation = scaled(arch)
    assert activation > 300  # its square is past float16's 65504
    with torch.no_grad():
        expected = model(**inputs).logits
    runtime = (ORTModelForCausalLM if arch == "llama" else ORTModelForSequenceClassification).from_pretrained(folder)
    assert_parity(runtime(**inputs).logits, expected, dtype="float16", context="onnxruntime")
    # every op in the dtype the graph declares, as on a GPU
    evaluator = ReferenceEvaluator(str(folder / "model.onnx"))
    feed = {k: v.numpy() for k, v in inputs.items() if k in evaluator.input_names}
    if "token_type_ids" in evaluator.input_names:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    for name in evaluator.input_names:
        if name.startswith("past_key_values."):
            feed[name] = np.zeros((3, runtime._kv_heads, 0, runtime._head_dim), np.float16)
    assert_parity(evaluator.run(["logits"], feed)[0], expected, dtype="float16", context="reference evaluator")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_written_float16_graph_keeps_norms_and_softmax_in_float32(scaled, arch):
    _, folder, _, _ = scaled(arch)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(folder / "model.onnx"))).graph
    types = _types(graph)

    def float_types(node) -> set[int]:
        return {types.get(name) for name in [*node.input, *node.output] if types.get(name) in (FLOAT, HALF)}

    producer = {out: n for n in graph.node for out in n.output}

    def fed_by(node, op_type: str) -> bool:
        return any(getattr(producer.get(name), "op_type", None) == op_type for name in node.input)

    kept = [n for n in graph.node if n.op_type in ("Softmax", "LayerNormalization", "ReduceMean")]
    kept += [n for n in graph.node if n.op_type == "Pow" and any(  # x**2 of a norm
        c.op_type == "ReduceMean" for c in graph.node if n.output[0] in c.input)]
    kept += [n for n in graph.node if n.op_type == "Add" and fed_by(n, "ReduceMean")]  # variance + eps
    kept += [n for n in graph.node if n.op_type == "Sqrt" and any(fed_by(producer[i], "ReduceMean")
                                                                   for i in n.input if i in producer)]
    assert {"Softmax"} < {n.op_type for n in kept}  # a norm and the softmax are there to check
    for node in kept:
        assert float_types(node) == {FLOAT}, (node.name, node.op_type)
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert matmuls and all(float_types(n) == {HALF} for n in matmuls)
    prefix = [t for t in graph.initializer if t.name.startswith("ptv2.prefix.")]
    assert prefix and all(t.data_type == HALF for t in prefix)
    assert {o.type.tensor_type.elem_type for o in graph.output} == {HALF}


def _types(graph) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _initializer(name: str, graph):
    return next(t for t in graph.initializer if t.name == name)


def _ort(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feed)[0]


def test_float16_export_of_a_graph_over_the_protobuf_limit(tmp_path, monkeypatch):
    """Over 2 GB the weights go to a side file and the converter works from the file (shape inference needs it);
    the threshold is lowered so a tiny model takes that path."""
    monkeypatch.setattr(importlib.import_module("exporters.onnx.postprocess"), "EXTERNAL_DATA_BYTES", 0)
    model = peft_model("llama")
    folder = export(model, tmp_path / "fp16", dtype="float16")  # validated on the written files
    assert (folder / "model.onnx_data").is_file() and not list(folder.glob("float32-*"))
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(folder / "model.onnx"))).graph
    types = _types(graph)
    kept = [n for n in graph.node if n.op_type in ("Softmax", "ReduceMean")]
    assert kept and all(types[n.input[0]] == types[n.output[0]] == FLOAT for n in kept)

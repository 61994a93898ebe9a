"""Fused prefix attention in exported encoder graphs (``com.microsoft.MultiHeadAttention``) and its fallbacks."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from exporters.cli import build_parser  # noqa: E402
from exporters.onnx import export  # noqa: E402
from exporters.onnx.fused_attention import (  # noqa: E402
    _TRACE,
    FUSED_OP,
    FusedTrace,
    _fused_forward,
    _fused_or,
    count_fused,
    parse_option,
    unsupported_reason,
)
from ptv2_plugin import PTuningV2Config  # noqa: E402
from ptv2_plugin.attention import ActivePrefix, active_prefix  # noqa: E402
from tests.exporter_matrix import DYNAMO, TORCHSCRIPT, only, over_exporters  # noqa: E402
from tests.parity import assert_parity  # noqa: E402
from tests.test_export_onnx import N, batch, peft_model, without_prefix  # noqa: E402
from tests.tiny_models import TRANSFORMERS_5  # noqa: E402


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, inputs: dict, **extra) -> np.ndarray:
    values = {**{k: v.numpy() for k, v in inputs.items()}, **extra}
    if "token_type_ids" in {i.name for i in session.get_inputs()}:
        values["token_type_ids"] = np.zeros_like(values["input_ids"])
    return session.run(None, {i.name: values[i.name] for i in session.get_inputs()})[0]


def _graph(folder):
    return onnx.load(str(folder / "model.onnx")).graph


# ------------------------------------------------------------------------------------------ the fused graph
@pytest.mark.parametrize("arch,exporter", over_exporters(["bert", "roberta", "electra", "distilbert"], dynamo={"bert"}))
def test_every_prefixed_layer_is_one_fused_node_with_parity(tmp_path, arch, exporter):
    model, messages = peft_model(arch), []
    folder = export(model, tmp_path / arch, task="SEQ_CLS", progress=messages.append)
    graph = _graph(folder)
    slots = len(model.base_model.prefix_encoder().all_key_values())
    if arch == "distilbert" and not TRANSFORMERS_5:  # its 4.x attention is neither interface nor BERT-style inline
        assert count_fused(graph) == 0 and any("0 of 2 prefixed layers fused" in m for m in messages)
    else:
        assert count_fused(graph) == slots == 2
        assert "Softmax" not in {node.op_type for node in graph.node}  # no plain attention left
        assert json.loads((folder / "ptv2_export.json").read_text())["fused_attention"]["layers"] == slots
    # The prefix is still exactly the named constant initializers the plain graph has.
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for slot, (key, value) in enumerate(model.base_model.prefix_encoder().all_key_values()):
        np.testing.assert_array_equal(initializers[f"ptv2.prefix.{slot}.key"], key.numpy())
        np.testing.assert_array_equal(initializers[f"ptv2.prefix.{slot}.value"], value.numpy())
    session = _session(folder / "model.onnx")
    for size, length, pad in [(1, 1, {}), (1, 9, {}), (3, 6, {"right_pad": 4}), (4, 11, {"left_pad": 3})]:
        inputs = batch(size, length, seed=length, **pad)
        with torch.no_grad():
            expected = model(**inputs).logits
        assert_parity(_run(session, inputs), expected, without_prefix=without_prefix(model, **inputs).logits,
                      context=(arch, size, length, pad))


@pytest.mark.parametrize("exporter", only(DYNAMO, TORCHSCRIPT))
def test_fused_graph_survives_ort_transformer_optimizer(tmp_path, exporter):
    from onnxruntime.transformers.optimizer import optimize_model

    model = peft_model("bert")
    folder = export(model, tmp_path / "bert", task="SEQ_CLS")
    config = model.base_model.model.config
    optimized = optimize_model(str(folder / "model.onnx"), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=1)
    path = tmp_path / "optimized.onnx"
    optimized.save_model_to_file(str(path))
    ops = [node.op_type for node in optimized.model.graph.node]
    assert count_fused(optimized.model.graph) == 2
    assert ops.count("SkipLayerNormalization") == 4  # the rest of BERT still fuses around our attention
    inputs = batch(3, 7, right_pad=2, seed=5)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert_parity(_run(_session(path), inputs), expected, without_prefix=without_prefix(model, **inputs).logits)


@pytest.mark.parametrize("exporter", only(DYNAMO, TORCHSCRIPT))
def test_multi_adapter_graph_fuses_with_per_row_prefix(tmp_path, exporter):
    model = peft_model("bert", name="a")
    torch.manual_seed(1)
    model.add_adapter("b", PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=N, prefix_init_std=1.0))
    model.eval()
    folder = export(model, tmp_path / "multi", adapters=["a", "b"], fused_attention=True)
    assert count_fused(_graph(folder)) == 2
    inputs = batch(3, 6, right_pad=2, seed=2)
    expected = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        with torch.no_grad():
            expected[name] = model(**inputs).logits.numpy()
    actual = _run(_session(folder / "model.onnx"), inputs, adapter_ids=np.array([1, 0, 1]))
    base = without_prefix(model, **inputs).logits
    for row, name in enumerate("bab"):
        assert_parity(actual[row], expected[name][row], without_prefix=base[row], context=(row, name))
    assert not np.allclose(expected["a"], expected["b"])


def test_only_prefixed_layers_fuse(tmp_path):
    torch.manual_seed(0)
    from peft import get_peft_model

    from tests.tiny_models import tiny_model

    config = PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=N, prefix_init_std=1.0, layers_to_transform=[1])
    model = get_peft_model(tiny_model("bert", "SEQ_CLS"), config).eval()
    folder = export(model, tmp_path / "one", fused_attention=True)
    graph = _graph(folder)
    assert count_fused(graph) == 1
    assert [n.op_type for n in graph.node].count("Softmax") == 1  # the unprefixed layer keeps its own attention
    inputs = batch(2, 5, right_pad=1)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert_parity(_run(_session(folder / "model.onnx"), inputs), expected,
                  without_prefix=without_prefix(model, **inputs).logits)


# ----------------------------------------------------------------------------------------------- fallbacks
@pytest.mark.parametrize("exporter", only(DYNAMO, TORCHSCRIPT))
def test_disabled_writes_plain_ops_only(tmp_path, exporter):
    folder = export(peft_model("bert"), tmp_path / "plain", fused_attention=False, validate=False)
    graph = _graph(folder)
    assert count_fused(graph) == 0 and not any(node.domain for node in graph.node)
    assert json.loads((folder / "ptv2_export.json").read_text())["fused_attention"] is None


def test_decoder_keeps_plain_graph_with_logged_reason(tmp_path, caplog):
    model = peft_model("gpt2")
    with caplog.at_level(logging.INFO, logger="exporters.onnx.export"):
        folder = export(model, tmp_path / "gpt2", with_past=False, validate=False)
    assert count_fused(_graph(folder)) == 0
    assert "Fused attention off: task CAUSAL_LM is generative" in caplog.text
    with pytest.raises(ValueError, match="fused_attention=True cannot apply: task CAUSAL_LM"):
        export(model, tmp_path / "forced", with_past=False, fused_attention=True)
    assert not (tmp_path / "forced").exists()


def test_unsupported_encoder_and_float16_fall_back(tmp_path):
    messages = []
    folder = export(peft_model("deberta-v2"), tmp_path / "deberta", validate=False, progress=messages.append)
    assert count_fused(_graph(folder)) == 0
    assert any("Fused attention off: model type 'deberta-v2'" in m for m in messages)
    reason = unsupported_reason(task="SEQ_CLS", model_type="bert", dtype=torch.float16)
    assert reason is not None and "float32-only" in reason
    with pytest.raises(ValueError, match="float32-only"):
        export(peft_model("bert"), tmp_path / "fp16", dtype="float16", fused_attention=True)


def test_calls_the_op_cannot_express_go_to_the_plugin():
    """A per-row visible prefix (mixed-adapter batches in PyTorch), cross-attention or a cache are not expressible:
    the plugin's own code path runs and the reason is recorded (both interception points)."""
    calls = []

    def original(*args, **kwargs):
        calls.append(args[2].shape if len(args) > 2 else kwargs)
        return args[1] if len(args) > 2 else args[0], None

    trace = FusedTrace(attention_mask=torch.ones(2, 4, dtype=torch.long))
    attention, inline = _fused_or(original), _fused_forward(torch.nn.Module(), original)
    q = torch.zeros(2, 4, 4, 8)
    prefix = ActivePrefix(torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8), torch.ones(2, 3, dtype=torch.bool))
    token = _TRACE.set(trace)
    try:
        with active_prefix(prefix):
            attention(torch.nn.Module(), q, q, q, None)
            inline(torch.zeros(2, 4, 32), None)
        with active_prefix(ActivePrefix(prefix.key, prefix.value)):
            attention(torch.nn.Module(), q, q[:, :, :2], q[:, :, :2], None)  # cross-attention shape
            inline(torch.zeros(2, 4, 32), None, past_key_values=object())
    finally:
        _TRACE.reset(token)
    assert len(calls) == 4 and trace.fused == 0
    assert "different parts of the prefix" in trace.skipped[0] and "different parts of the prefix" in trace.skipped[1]
    assert "cross-attention" in trace.skipped[2] and "past_key_values" in trace.skipped[3]


def test_option_parsing_and_cli_flag():
    assert parse_option("auto") == "auto" and parse_option("off") is False and parse_option(True) is True
    with pytest.raises(ValueError, match="fused_attention"):
        parse_option("sometimes")
    parser = build_parser()
    base = ["--model", "m", "--adapter", "a", "--output", "o"]
    assert parser.parse_args(base).fused_attention == "auto"
    assert parser.parse_args([*base, "--no-fused-attention"]).fused_attention is False
    assert parser.parse_args([*base, "--fused-attention"]).fused_attention is True
    assert FUSED_OP == "MultiHeadAttention"

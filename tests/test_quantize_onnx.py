"""int8 exports (``export(..., quantize="int8")``): quantized ops in the graph, the prefix untouched, validation by
prediction agreement, loading through the runtime classes, and clear errors for what is not supported."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from exporters.cli import main as cli_main  # noqa: E402
from exporters.onnx import ExportValidationError, export, load  # noqa: E402
from exporters.onnx import quantize as Q  # noqa: E402
from exporters.onnx.outlier_channels import OUTLIER_CHANNELS  # noqa: E402
from tests.test_export_onnx import RUNTIME, batch, peft_model  # noqa: E402
from tests.tiny_models import tiny_model  # noqa: E402

CASES = [("bert", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("gpt2", "CAUSAL_LM")]
_FOLDERS: dict = {}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(arch, task) -> (model, float32 folder, int8 folder), exported once per module."""

    def get(arch: str, task: str):
        if (arch, task) not in _FOLDERS:
            model = peft_model(arch, task)
            root = tmp_path_factory.mktemp(f"int8-{arch}-{task}")
            _FOLDERS[(arch, task)] = (model, export(model, root / "float", validate=False),
                                      export(model, root / "int8", quantize="int8"))
        return _FOLDERS[(arch, task)]

    yield get
    _FOLDERS.clear()


def _graph(folder):
    return onnx.load(str(folder / "model.onnx")).graph


def _initializers(graph, prefix: str) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.startswith(prefix)}


@pytest.mark.parametrize("arch,task", CASES)
def test_graph_runs_weight_matmuls_in_int8_and_keeps_the_prefix_float32(exports, arch, task):
    _, float_folder, int8_folder = exports(arch, task)
    graph = _graph(int8_folder)
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulInteger") >= 4 and "DynamicQuantizeLinear" in ops
    weights = {t.name: list(t.dims) for t in graph.initializer}
    float_weight_matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    outlier_parts = [n for n in float_weight_matmuls if n.name.endswith("/outliers/MatMul")]
    downs = Q.down_projections(_graph(float_folder))
    feed_forward_downs = [n for n in downs if n not in Q.task_heads(_graph(float_folder), downs)]
    # each feed-forward down projection keeps exactly its outlier channels in float32; the rest of it is int8
    assert feed_forward_downs and len(outlier_parts) == len(feed_forward_downs)
    assert all(weights[n.input[1]][0] == OUTLIER_CHANNELS for n in outlier_parts)
    # the only other float32 weight MatMuls: classifier heads (more weight rows than columns)
    heads = [n for n in float_weight_matmuls if n not in outlier_parts]
    assert all(weights[n.input[1]][0] > weights[n.input[1]][1] for n in heads)
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == ops.count("MatMulInteger")  # QInt8 weights, one per quantized MatMul

    prefix, reference = _initializers(graph, "ptv2.prefix."), _initializers(_graph(float_folder), "ptv2.prefix.")
    assert prefix and sorted(prefix) == sorted(reference)
    for name, array in prefix.items():
        assert array.dtype == np.float32 and np.array_equal(array, reference[name]), name


@pytest.mark.parametrize("arch,task", CASES)
def test_metadata_records_quantization_and_agreement(exports, arch, task):
    _, _, folder = exports(arch, task)
    metadata = json.loads((folder / "ptv2_export.json").read_text())
    quantized = metadata["quantization"]["files"]["model.onnx"]
    assert metadata["quantization"]["scheme"] == "int8" and quantized["weight_type"] == "QInt8"
    assert quantized["quantized_ops"]["MatMulInteger"] >= 4
    split = quantized["down_projections_split"]
    assert split["count"] == 2 and split["float32_input_channels"] == 2 * OUTLIER_CHANNELS  # 2 layers in tiny models
    parity = metadata["parity"]
    assert parity["kind"] == "agreement" and parity["ok"]
    if task != "CAUSAL_LM":  # encoders: the rate rests on the wider batches too (decoders: every token of each step)
        assert parity["rows"] >= 1024  # AGREEMENT_BATCHES x 64: one batch of 64 refused healthy graphs by chance
    assert parity["agreement"] >= parity["min_agreement"] == Q.DEFAULT_MIN_AGREEMENT
    assert 0 < parity["max_abs_logit_diff"] < 0.2 * parity["max_abs_logit"]  # int8 rounding: not zero, not large
    float_metadata = json.loads((folder.parent / "float" / "ptv2_export.json").read_text())
    assert float_metadata["quantization"] is None


@pytest.mark.parametrize("arch,task", CASES)
def test_runtime_classes_load_the_int8_graph_and_it_predicts_like_pytorch(exports, arch, task):
    model, _, folder = exports(arch, task)
    ort_model = RUNTIME[task].from_pretrained(folder)
    assert type(load(folder)) is RUNTIME[task]
    inputs = batch(16, 9, right_pad=3) if task != "CAUSAL_LM" else batch(16, 9, left_pad=3)
    if task == "CAUSAL_LM":
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(**inputs).logits
    actual = torch.as_tensor(ort_model(**inputs).logits)
    assert (expected.argmax(-1) == actual.argmax(-1)).float().mean() >= 0.9
    assert (expected - actual).abs().max() > 1e-4  # really a different (quantized) computation


def test_int8_decoder_generates_with_its_cache(exports):
    model, float_folder, folder = exports("gpt2", "CAUSAL_LM")
    prompt = batch(2, 4, left_pad=1)
    tokens = RUNTIME["CAUSAL_LM"].from_pretrained(folder).generate(**prompt, max_new_tokens=5, do_sample=False)
    reference = RUNTIME["CAUSAL_LM"].from_pretrained(float_folder).generate(**prompt, max_new_tokens=5,
                                                                            do_sample=False)
    assert tokens.shape == reference.shape == (2, 9)
    assert (tokens == reference).float().mean() >= 0.8


def test_fused_attention_composes_with_int8(exports):
    _, float_folder, folder = exports("bert", "SEQ_CLS")
    fused = json.loads((float_folder / "ptv2_export.json").read_text())["fused_attention"]
    ops = [node.op_type for node in _graph(folder).node]
    if fused:  # the float32 MultiHeadAttention stays; its projections run in int8
        assert ops.count("MultiHeadAttention") == fused["layers"]
        assert json.loads((folder / "ptv2_export.json").read_text())["fused_attention"] == fused


def test_encoder_decoder_graphs_split_every_feed_forward_down_projection(tmp_path):
    """T5: the encoder's residual stream reaches its output through plain ops, yet its down projections are found
    as such (not as heads) in all three graphs, and the int8 model still agrees with PyTorch."""
    folder = export(peft_model("t5", "SEQ_2_SEQ_LM"), tmp_path / "t5", quantize="int8")
    metadata = json.loads((folder / "ptv2_export.json").read_text())
    files = metadata["quantization"]["files"]
    assert sorted(files) == ["decoder_model.onnx", "decoder_with_past_model.onnx", "encoder_model.onnx"]
    for info in files.values():
        assert info["down_projections_split"]["count"] == 2 and info["float32_nodes"]["heads"] == 0
    assert metadata["parity"]["ok"]


def test_validation_fails_when_predictions_disagree(tmp_path, monkeypatch):
    """A quantized graph whose logits are negated (every argmax flips) is refused, and nothing is written."""
    original = Q.quantize_graph

    def broken(path, *args, **kwargs):
        info = original(path, *args, **kwargs)
        proto = onnx.load(str(path))
        output = proto.graph.output[0].name
        for node in proto.graph.node:
            node.output[:] = [f"{name}.raw" if name == output else name for name in node.output]
        proto.graph.node.append(onnx.helper.make_node("Neg", [f"{output}.raw"], [output]))
        onnx.save(proto, str(path))
        return info

    monkeypatch.setattr(importlib.import_module("exporters.onnx.export"), "quantize_graph", broken)  # the pipeline's
    target = tmp_path / "out"
    with pytest.raises(ExportValidationError, match="argmax agreement"):
        export(peft_model("bert", "SEQ_CLS"), target, quantize="int8")
    assert not target.exists()


def test_agreement_threshold_is_configurable(tmp_path):
    model = peft_model("bert", "TOKEN_CLS")
    folder = export(model, tmp_path / "loose", quantize="int8", min_agreement=0.5)
    assert json.loads((folder / "ptv2_export.json").read_text())["parity"]["min_agreement"] == 0.5
    with pytest.raises(ExportValidationError, match=r"needs >= 100\.00%"):
        # 1.0 demands every token's argmax unchanged: int8 rounding flips some near-tied tokens (measured 99.3%)
        export(model, tmp_path / "strict", quantize="int8", min_agreement=1.0)
    assert not (tmp_path / "strict").exists()


def test_agreement_report_counts_rows_and_judges_by_threshold():
    report = Q.AgreementReport(min_agreement=0.75)
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    flipped = reference.clone()
    flipped[0] = torch.tensor([0.0, 1.0])
    report.add("[a] logits batch=4 len=1", reference, flipped)
    assert (report.rows, report.agreeing, report.agreement, report.ok) == (4, 3, 0.75, True)
    report.add("present batch=4 len=1", reference, reference + 5)  # caches: reported, not judged
    assert report.max_other_diff == 5 and report.ok
    report.add("logits batch=4 len=1", reference, -reference)
    assert report.agreement == 3 / 8 and not report.ok and "37.50%" in report.worst_detail()
    report = Q.AgreementReport(min_agreement=0.9)
    report.add("logits batch=1", reference, reference.clone().fill_(float("nan")))
    assert not report.ok and "non-finite" in report.worst_detail()


def test_bad_quantize_options_get_clear_errors(tmp_path):
    model = peft_model("bert", "SEQ_CLS")
    target = tmp_path / "never"
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        export(model, target, quantize="int4")
    with pytest.raises(ValueError, match="cannot combine with dtype='float16'"):
        export(model, target, quantize="int8", dtype="float16")
    with pytest.raises(ValueError, match="not supported with prefix_as='adapter_inputs'"):
        export(model, target, quantize="int8", prefix_as="adapter_inputs")
    with pytest.raises(ValueError, match="min_agreement applies to quantized exports"):
        export(model, target, min_agreement=0.9)
    with pytest.raises(ValueError, match=r"min_agreement must be in \(0, 1\]"):
        export(model, target, quantize="int8", min_agreement=1.5)
    assert not target.exists()


def test_cli_quantize_int8(tmp_path, capsys):
    tiny_model("bert", "SEQ_CLS").save_pretrained(tmp_path / "base")
    peft_model("bert", "SEQ_CLS").save_pretrained(tmp_path / "adapter")
    args = ["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "o")]
    assert cli_main([*args, "--quantize", "int8", "--min-agreement", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "Agreement report (int8 graph): argmax agreement" in out and "-> OK" in out
    assert "MatMulInteger" in [n.op_type for n in _graph(tmp_path / "o").node]
    with pytest.raises(SystemExit):
        cli_main([*args, "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err

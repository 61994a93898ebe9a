"""Exporter choice (``exporter="dynamo" | "torchscript"``): the dynamo path is torch.export-based and warns nothing,
the fallback is logged with its reason, and both write the same graph signature."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from exporters.cli import build_parser  # noqa: E402
from exporters.onnx import export, graph_export  # noqa: E402
from exporters.onnx.graph_export import DEFAULT_EXPORTER, DYNAMO_DEFAULT_OPSET, resolve_exporter  # noqa: E402
from tests.test_export_onnx import peft_model  # noqa: E402

_LEGACY_WARNING = "legacy TorchScript-based ONNX export"


def _deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    """Every deprecation-type warning raised during an export (the model is built before recording starts, so
    PEFT's and transformers' construction-time notices are not among them)."""
    kinds = (DeprecationWarning, FutureWarning, PendingDeprecationWarning)
    return [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught if issubclass(w.category, kinds)]


def _signature(path: Path) -> list[tuple[str, list]]:
    graph = onnx.load(str(path)).graph
    return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in (*graph.input, *graph.output)]


@pytest.mark.library_default
def test_the_default_export_is_dynamo_warns_nothing_and_matches_the_legacy_signature(tmp_path, caplog):
    """Decoder with a KV cache (the widest signature): the default export (no ``exporter`` named) goes through
    dynamo, validates, and neither warns nor logs a warning from torch, while the legacy one warns (so the check can
    see the warning it guards against); inputs, outputs, axis labels and prefix initializers are the same in both."""
    model = peft_model("llama")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        default = export(model, tmp_path / "default")
    assert _deprecations(caught) == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("torch")] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = export(model, tmp_path / "legacy", validate=False, exporter="torchscript")
    assert any(_LEGACY_WARNING in line for line in _deprecations(caught))

    assert _signature(default / "model.onnx") == _signature(legacy / "model.onnx")
    labels = dict(_signature(default / "model.onnx"))
    assert labels["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert labels["present.0.key"][2] == "past_sequence_length + sequence_length"
    prefix = [sorted(t.name for t in onnx.load(str(folder / "model.onnx")).graph.initializer
                     if t.name.startswith("ptv2.")) for folder in (default, legacy)]
    assert prefix[0] == prefix[1] == [f"ptv2.prefix.{s}.{k}" for s in range(2) for k in ("key", "value")]
    meta = [json.loads((folder / "ptv2_export.json").read_text()) for folder in (default, legacy)]
    assert (meta[0]["exporter"], meta[0]["opset"]) == ("dynamo", DYNAMO_DEFAULT_OPSET)
    assert (meta[1]["exporter"], meta[1]["opset"]) == ("torchscript", 17)
    assert meta[0]["parity"]["max_abs_diff"] < meta[0]["parity"]["atol"]  # the default export validated
    same = {k for k in meta[0] if k not in ("exporter", "opset", "written_files", "parity")}
    assert {k: meta[0][k] for k in same} == {k: meta[1][k] for k in same}


def test_the_default_is_dynamo_at_opset_20():
    assert (DEFAULT_EXPORTER, DYNAMO_DEFAULT_OPSET) == ("dynamo", 20)  # graph_export's docstring says why


def test_with_a_dynamo_default_an_opset_below_18_falls_back_to_torchscript_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(graph_export, "DEFAULT_EXPORTER", "dynamo")
    messages: list[str] = []
    assert resolve_exporter(None, None, messages.append) == ("dynamo", DYNAMO_DEFAULT_OPSET)
    assert resolve_exporter(None, 17, messages.append) == ("torchscript", 17)
    assert len(messages) == 1 and "Exporter: torchscript (fallback): opset 17 was requested" in messages[0]
    assert resolve_exporter("torchscript", None, messages.append) == ("torchscript", 17)
    assert resolve_exporter("dynamo", 19, messages.append) == ("dynamo", 19)
    with pytest.raises(ValueError, match="exporter='dynamo' cannot apply: opset 17"):
        resolve_exporter("dynamo", 17, messages.append)
    with pytest.raises(ValueError, match="exporter must be one of"):
        export(peft_model("bert"), tmp_path / "bad", exporter="jit")
    assert not (tmp_path / "bad").exists()


def test_cli_exporter_flag():
    parser = build_parser()
    base = ["--model", "m", "--adapter", "a", "--output", "o"]
    assert parser.parse_args(base).exporter is None
    assert parser.parse_args([*base, "--exporter", "torchscript"]).exporter == "torchscript"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--exporter", "jit"])

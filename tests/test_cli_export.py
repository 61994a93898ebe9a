"""``ptv2-export`` end to end: from saved base + adapter folders to a validated ONNX folder."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.lane_independent  # no transformers-version dependence: one lane runs it

pytest.importorskip("onnxruntime")

from exporters.cli import main  # noqa: E402
from tests.child_process import run_python  # noqa: E402
from tests.test_export_onnx import peft_model  # noqa: E402
from tests.tiny_models import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(root / "base")
    peft_model("llama").save_pretrained(root / "adapter")
    return root


def test_cli_subprocess_exports_validates_and_reports(saved):
    out = saved / "out"
    output = run_python(module="exporters.cli", timeout=300, args=[
        "--model", str(saved / "base"), "--adapter", str(saved / "adapter"), "--output", str(out), "--validate"])
    assert "[ptv2-export" in output and "Tracing" in output  # progress output
    assert "Parity report: max abs diff" in output and "-> OK" in output
    metadata = json.loads((out / "ptv2_export.json").read_text())
    assert metadata["task"] == "CAUSAL_LM" and metadata["parity"]["ok"]
    assert (out / "model.onnx").is_file() and (out / "config.json").is_file()


def test_cli_refuses_non_empty_output_without_force(saved, capsys):
    out = saved / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["--model", str(saved / "base"), "--adapter", str(saved / "adapter"), "--output", str(out)]
    fast = ["--no-validate", "--no-past", "--task", "text-generation"]
    assert main(args) == 1
    assert "not empty" in capsys.readouterr().err and (out / "notes.txt").is_file()
    assert main([*args, "--force", *fast]) == 1  # --force replaces an earlier export, never a user's files
    assert "notes.txt, which no export wrote" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()
    assert main([*args, *fast]) == 0
    capsys.readouterr()
    assert main([*args, "--force", *fast]) == 0
    report = capsys.readouterr().out
    assert "validation skipped" in report
    assert json.loads((out / "ptv2_export.json").read_text())["with_past"] is False


def test_cli_reports_validation_failure_and_bad_input(saved, capsys):
    args = ["--model", str(saved / "base"), "--adapter", str(saved / "adapter"), "--output", str(saved / "fail")]
    assert main([*args, "--atol", "-1"]) == 2
    assert "validation failed" in capsys.readouterr().err and not (saved / "fail").exists()
    assert main([*args[:2], "--adapter", str(saved / "base"), *args[4:]]) == 1
    assert "adapter_config.json" in capsys.readouterr().err

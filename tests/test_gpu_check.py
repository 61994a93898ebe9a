"""scripts/gpu_check.sh and benchmarks/gpu_check.py: a clear early stop without CUDA, and a CPU smoke run of every
section (the GPU run itself cannot happen in CI)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.lane_independent  # no transformers-version dependence: one lane runs it

pytest.importorskip("onnxruntime")

from benchmarks import gpu_check  # noqa: E402
from tests.child_process import run_python  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing stops early")


@no_cuda
def test_script_stops_early_without_cuda_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PTV2_GPU_REPORT_DIR": str(tmp_path / "out")}
    script = "import subprocess, sys\nsys.exit(subprocess.run(['bash', 'scripts/gpu_check.sh'], timeout=150)" \
             ".returncode)"
    output = run_python(script, timeout=180, env=env, expected_returncode=gpu_check.EXIT_NO_CUDA)
    assert "no CUDA device visible to PyTorch" in output and "run this on a GPU machine" in output
    assert not (tmp_path / "out").exists()


@no_cuda
def test_module_stops_early_without_cuda(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == gpu_check.EXIT_NO_CUDA
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_every_section_runs_in_a_cpu_smoke_run(tmp_path):
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["not_done"] == []
    assert [(r["model"], r["tf32"]) for r in result["parity"]][::2] == [
        ("bert SEQ_CLS", False), ("llama CAUSAL_LM", False), ("t5 SEQ_2_SEQ_LM", False),
        ("bert SEQ_CLS adapters a+b", False)]
    for row in result["parity"]:
        assert row["ok"] and row["max_abs_diff"] < row["allowed_at_worst"]
        assert row["prefix_effect"] is None or row["prefix_effect"] > 100 * row["allowed_at_worst"]
    generation = result["float16_generation"][0]
    assert generation["teacher_forced_argmax_agreement"] >= 0.9 and 0 <= generation["token_agreement"] <= 1
    shapes = result["timings"]["shapes"]
    assert len(shapes) == 2 and all(len(row["median_ms"]) == 6 for row in shapes)
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "float32 parity" in markdown and "float16 Llama generation" in markdown and "Latency" in markdown

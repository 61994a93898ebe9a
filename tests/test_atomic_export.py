"""A process killed in the middle of an export leaves the previous export or the new one, whole and loadable.

The fault-injection test kills the exporter at every file-system step (k = 1..N). The two exports differ in
num_virtual_tokens, so a folder whose metadata does not match its graph is caught.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.child_process import GO, start_python
from tests.fault_injection import inspect_every_kill

pytestmark = pytest.mark.lane_independent  # no transformers-version dependence: one lane runs it

pytest.importorskip("onnxruntime")

from exporters.onnx import ORTModelForSequenceClassification  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

STALLED_EXPORTER = textwrap.dedent(
    """
    import sys, torch, onnx
    import ptv2_plugin
    from peft import get_peft_model
    from ptv2_plugin import PTuningV2Config
    from exporters.onnx import export
    from tests.tiny_models import tiny_model

    output = sys.argv[1]
    model = get_peft_model(tiny_model("bert"), PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3,
                                                                prefix_init_std=1.0)).eval()
    export(model, output, validate=False, exporter="torchscript")  # folder handling is exporter-agnostic
    print("first export done", flush=True)
    assert sys.stdin.readline().strip() == "go"  # the parent has loaded the first export
    with torch.no_grad():
        model.base_model.prefix_encoder().transform[2].bias.add_(1.0)

    def stalled_save(proto, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\\x08\\x07")  # the first bytes of a graph that never gets finished
        print("writing", flush=True)
        sys.stdin.readline()  # stalls until the parent kills us

    onnx.save_model = stalled_save
    export(model, output, validate=False, force=True, exporter="torchscript")
    """
)


def run_logits(folder) -> np.ndarray:
    model = ORTModelForSequenceClassification.from_pretrained(folder)
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    return np.asarray(model(input_ids=ids, attention_mask=np.ones_like(ids)).logits)


def test_killed_export_leaves_the_previous_export(tmp_path):
    output = tmp_path / "onnx"
    child = start_python(STALLED_EXPORTER, args=[str(output)], timeout=300, env=ENV)
    try:
        child.read_until("first export done")
        before = sorted(p.name for p in output.iterdir())
        first = run_logits(output)
        child.send(GO)  # only now may the child start the second export
        child.read_until("writing")
    except BaseException:
        child.kill()
        raise
    assert child.kill() == -signal.SIGKILL  # our kill ended it, mid-write
    assert sorted(p.name for p in output.iterdir()) == before
    np.testing.assert_array_equal(run_logits(output), first)


# ------------------------------------------------------------------------------------- kill at every step
FAULT_DRIVER = textwrap.dedent(
    """
    import shutil, sys, torch
    torch.set_num_threads(1)
    from peft import get_peft_model
    from ptv2_plugin import PTuningV2Config
    from exporters.onnx import export
    from tests.fault_injection import drive
    from tests.tiny_models import tiny_model

    root = sys.argv[1]

    def model(n, seed):
        torch.manual_seed(seed)
        config = PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=n, prefix_init_std=1.0)
        return get_peft_model(tiny_model("bert", num_hidden_layers=1), config).eval()

    def quiet(message):
        pass

    old, new = model(3, 0), model(5, 1)
    # folder handling is exporter-agnostic: the fast exporter (each step below runs a whole export)
    export(old, f"{root}/ref-old", validate=False, progress=quiet, exporter="torchscript")
    export(new, f"{root}/ref-new", validate=False, progress=quiet, exporter="torchscript")
    print("refs ready", flush=True)
    assert sys.stdin.readline().strip() == "go"

    def prepare():
        shutil.rmtree(f"{root}/work", ignore_errors=True)
        shutil.copytree(f"{root}/ref-old", f"{root}/work/onnx")

    drive(prepare, lambda: export(new, f"{root}/work/onnx", validate=False, force=True, progress=quiet,
                                  exporter="torchscript"))
    """
)


def snapshot(folder: Path) -> tuple[list[str], dict, np.ndarray]:
    """File names, metadata and ORT logits of an export; the graph's prefix length must match the metadata's."""
    metadata = json.loads((folder / "ptv2_export.json").read_text())
    graph = onnx.load(str(folder / "model.onnx"))
    key = next(t for t in graph.graph.initializer if t.name == "ptv2.prefix.0.key")
    assert key.dims[1] == metadata["num_virtual_tokens"], "graph and metadata are from different exports"
    return sorted(p.name for p in folder.iterdir()), metadata, run_logits(folder)


def test_export_killed_at_every_step_leaves_the_old_or_the_new_export_whole(tmp_path):
    target = tmp_path / "work" / "onnx"
    child = start_python(FAULT_DRIVER, args=[str(tmp_path)], timeout=300, env=ENV)
    try:
        child.read_until("refs ready")
        states = {"old": snapshot(tmp_path / "ref-old"), "new": snapshot(tmp_path / "ref-new")}
        assert states["old"][1]["num_virtual_tokens"] == 3 and states["new"][1]["num_virtual_tokens"] == 5
        child.send(GO)

        def inspect(k: int) -> str:
            names, metadata, logits = snapshot(target)
            state = "old" if metadata["num_virtual_tokens"] == 3 else "new"
            assert names == states[state][0] and metadata == states[state][1], f"killed at step {k}"
            np.testing.assert_array_equal(logits, states[state][2])
            return state

        steps = inspect_every_kill(child, inspect)
    finally:
        child.kill()
    assert any(step.startswith("exchange(") for step in steps), steps
    assert any(step.startswith("open(") and "model.onnx" in step for step in steps), steps
    assert [p.name for p in target.parent.iterdir()] == ["onnx"]

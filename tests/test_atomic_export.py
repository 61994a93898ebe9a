"""A process killed in the middle of an export leaves the previous export intact and loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPORTER = textwrap.dedent(
    """
    import sys, time, torch, onnx
    import ptv2_plugin
    from peft import get_peft_model
    from ptv2_plugin import PTuningV2Config
    from exporters.onnx import export
    from tests.tiny_models import tiny_model

    output = sys.argv[1]
    model = get_peft_model(tiny_model("bert"), PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3,
                                                                prefix_init_std=1.0)).eval()
    export(model, output, validate=False)
    print("first export done", flush=True)
    with torch.no_grad():
        model.base_model.prefix_encoder().transform[2].bias.add_(1.0)

    def stalled_save(proto, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\\x08\\x07")  # the first bytes of a graph that never gets finished
        print("writing", flush=True)
        time.sleep(120)

    onnx.save_model = stalled_save
    export(model, output, validate=False, force=True)
    """
)


def run_logits(folder) -> np.ndarray:
    from exporters.onnx import ORTModelForSequenceClassification

    model = ORTModelForSequenceClassification.from_pretrained(folder)
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    return np.asarray(model(input_ids=ids, attention_mask=np.ones_like(ids)).logits)


def test_killed_export_leaves_the_previous_export(tmp_path):
    output = tmp_path / "onnx"
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, str(output)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        before = None
        for line in process.stdout:
            if line.strip() == "first export done":
                before = sorted(p.name for p in output.iterdir())
                first = run_logits(output)
            if line.strip() == "writing":
                break
        else:
            raise AssertionError("the exporter never reached the write")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert sorted(p.name for p in output.iterdir()) == before
    np.testing.assert_array_equal(run_logits(output), first)

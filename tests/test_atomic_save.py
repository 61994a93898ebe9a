"""A process killed while saving an adapter leaves the previous adapter intact and loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITER = textwrap.dedent(
    """
    import os, sys, time, torch
    import peft.peft_model
    import ptv2_plugin
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from ptv2_plugin import PTuningV2Config

    base_folder, adapter_folder, mode = sys.argv[1:]
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_folder),
                           PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3))
    model.save_pretrained(adapter_folder)
    print("first save done", flush=True)
    with torch.no_grad():
        for p in model.base_model.prefix_encoder().parameters():
            p.add_(1.0)

    def stalled_write(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\\x00" * 64)  # the first bytes of a file that never gets finished
            handle.flush()
            os.fsync(handle.fileno())
        print("writing", flush=True)
        time.sleep(120)

    peft.peft_model.safe_save_file = stalled_write
    save = PeftModel.save_pretrained if mode == "atomic" else PeftModel.save_pretrained.__wrapped__
    save(model, adapter_folder)
    """
)


def kill_mid_save(tmp_path, mode: str):
    from tests.tiny_models import tiny_model

    tiny_model("bert").save_pretrained(tmp_path / "base")
    adapter = tmp_path / "adapter"
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "base"), str(adapter), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line.strip())
            if line.strip() == "first save done":
                first = {k: v.clone() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
            if line.strip() == "writing":
                break
        assert lines[-1] == "writing", lines
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    return tmp_path / "base", adapter, first


def test_killed_save_leaves_the_old_adapter_intact(tmp_path):
    base, adapter, first = kill_mid_save(tmp_path, "atomic")
    assert load_file(adapter / "adapter_model.safetensors").keys() == first.keys()
    for key, value in load_file(adapter / "adapter_model.safetensors").items():
        assert torch.equal(value, first[key])
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), adapter)
    assert model.base_model.prefix_encoder().embedding.weight.shape == (3, 32)


def test_without_atomic_writes_the_same_kill_corrupts_the_adapter(tmp_path):
    """Control: proves the scenario above really interrupts a write."""
    _, adapter, _ = kill_mid_save(tmp_path, "plain")
    with pytest.raises(Exception):  # noqa: B017 - any failure to read shows the file was corrupted
        load_file(adapter / "adapter_model.safetensors")

"""A process killed while saving an adapter leaves the old adapter or the new one, whole, and nothing of a user's.

The fault-injection test kills the writer at every file-system step of a save (k = 1..N) and loads the folder after
each kill. The two adapters differ in num_virtual_tokens, so a folder mixing their config and weights cannot load.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from ptv2_plugin import PTuningV2Config, atomic_folder
from tests.child_process import GO, start_python
from tests.fault_injection import inspect_every_kill
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.lane_independent  # no transformers-version dependence: one lane runs it

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

STALLED_WRITER = textwrap.dedent(
    """
    import os, sys, torch
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
    assert sys.stdin.readline().strip() == "go"  # the parent has read the first save
    with torch.no_grad():
        for p in model.base_model.prefix_encoder().parameters():
            p.add_(1.0)

    def stalled_write(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\\x00" * 64)  # the first bytes of a file that never gets finished
            handle.flush()
            os.fsync(handle.fileno())
        print("writing", flush=True)
        sys.stdin.readline()  # stalls until the parent kills us

    peft.peft_model.safe_save_file = stalled_write
    save = PeftModel.save_pretrained if mode == "atomic" else PeftModel.save_pretrained.__wrapped__
    save(model, adapter_folder)
    """
)


def kill_mid_save(tmp_path, mode: str):
    tiny_model("bert").save_pretrained(tmp_path / "base")
    adapter = tmp_path / "adapter"
    child = start_python(STALLED_WRITER, args=[str(tmp_path / "base"), str(adapter), mode], timeout=300, env=ENV)
    try:
        child.read_until("first save done")
        first = {k: v.clone() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
        child.send(GO)  # only now may the child overwrite what we just read
        child.read_until("writing")
    except BaseException:
        child.kill()
        raise
    assert child.kill() == -signal.SIGKILL  # our kill ended it, mid-write
    return tmp_path / "base", adapter, first


def test_killed_save_leaves_the_old_adapter_intact_and_the_next_save_cleans_up(tmp_path):
    base, adapter, first = kill_mid_save(tmp_path, "atomic")
    assert load_file(adapter / "adapter_model.safetensors").keys() == first.keys()
    for key, value in load_file(adapter / "adapter_model.safetensors").items():
        assert torch.equal(value, first[key])
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), adapter)
    assert model.base_model.prefix_encoder().embedding.weight.shape == (3, 32)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter."))
    assert len(leftovers) == 2 and leftovers[0].startswith(".adapter.ptv2-lock")  # the kill left them behind
    assert leftovers[1].startswith(".adapter.ptv2-new-")
    model.save_pretrained(adapter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_without_atomic_writes_the_same_kill_corrupts_the_adapter(tmp_path):
    """Control: proves the scenario above really interrupts a write."""
    _, adapter, _ = kill_mid_save(tmp_path, "plain")
    with pytest.raises(SafetensorError, match="header"):
        load_file(adapter / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------- kill at every step
FAULT_DRIVER = textwrap.dedent(
    """
    import os, shutil, sys, torch
    torch.set_num_threads(1)
    import peft.peft_model
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification
    from ptv2_plugin import PTuningV2Config
    from tests.fault_injection import drive

    root = sys.argv[1]

    def adapters(n, seed):  # "default" in the folder, "other" in its subfolder
        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(f"{root}/base")
        model = get_peft_model(base, PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=n))
        model.add_adapter("other", PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=n + 1))
        return model

    old, new = adapters(3, 0), adapters(5, 1)
    old.save_pretrained(f"{root}/ref-old")
    new.save_pretrained(f"{root}/ref-new")
    print("refs ready", flush=True)
    assert sys.stdin.readline().strip() == "go"

    def prepare():
        shutil.rmtree(f"{root}/work", ignore_errors=True)
        shutil.copytree(f"{root}/ref-old", f"{root}/work/adapter")
        with open(f"{root}/work/adapter/notes.txt", "w") as handle:
            handle.write("a user's file")

    drive(prepare, lambda: new.save_pretrained(f"{root}/work/adapter"), extra=[(peft.peft_model, "safe_save_file")])
    """
)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def loaded_lengths(base: Path, folder: Path) -> tuple[int, int]:
    """Load both adapters of a folder; prefix lengths of "default" and "other" (loading checks every shape)."""
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), folder)
    model.load_adapter(folder / "other", adapter_name="other")
    encoders = model.base_model.ptv2_prefix_encoder
    return encoders["default"].embedding.num_embeddings, encoders["other"].embedding.num_embeddings


def test_save_killed_at_every_step_leaves_the_old_or_the_new_adapters_whole(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path / "base")
    target = tmp_path / "work" / "adapter"
    child = start_python(FAULT_DRIVER, args=[str(tmp_path)], timeout=300, env=ENV)
    try:
        child.read_until("refs ready")
        notes = {"notes.txt": b"a user's file"}
        states = {"old": {**tree(tmp_path / "ref-old"), **notes}, "new": {**tree(tmp_path / "ref-new"), **notes}}
        child.send(GO)

        def inspect(k: int) -> str:
            found = tree(target)
            state = next((name for name, files in states.items() if files == found), None)
            assert state is not None, f"killed at step {k}: the folder is neither adapter: {sorted(found)}"
            assert loaded_lengths(tmp_path / "base", target) == {"old": (3, 4), "new": (5, 6)}[state]
            return state

        # kills before the swap keep the old adapters, after it the new ones (checked by inspect_every_kill)
        steps = inspect_every_kill(child, inspect)
    finally:
        child.kill()
    assert any(step.startswith("exchange(") for step in steps), steps  # the swap itself was a kill point
    assert any(step.startswith("safe_save_file(") for step in steps), steps
    assert [p.name for p in target.parent.iterdir()] == ["adapter"]  # the completed save left nothing beside it


# ------------------------------------------------------------------------------------- the swap, in process
@pytest.fixture()
def two_models():
    def make(n):
        return get_peft_model(tiny_model("bert"), PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=n))

    return make(3), make(5)


def prefix_length(folder: Path) -> int:
    return load_file(folder / "adapter_model.safetensors")[
        "base_model.ptv2_prefix_encoder.embedding.weight"].shape[0]


def test_save_keeps_a_users_files_and_drops_only_the_old_adapter_files(tmp_path, two_models):
    old, new = two_models
    folder = tmp_path / "adapter"
    old.save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "runs" / "1").mkdir(parents=True)
    (folder / "runs" / "1" / "events").write_text("log")
    (folder / "adapter_model.bin").write_bytes(b"stale pickle")  # would shadow nothing, but must not survive
    with open(folder / "README.md", "a") as handle:
        handle.write("\nMy notes about this adapter.\n")
    new.save_pretrained(folder)
    assert prefix_length(folder) == 5
    assert (folder / "tokenizer.json").read_text() == "{}" and (folder / "runs" / "1" / "events").read_text() == "log"
    assert not (folder / "adapter_model.bin").exists()
    assert "My notes about this adapter." in (folder / "README.md").read_text()  # PEFT updated the model card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_next_save_cleans_up_only_what_a_killed_save_left(tmp_path, two_models):
    old, new = two_models
    folder = tmp_path / "adapter"
    old.save_pretrained(folder)
    stale = [tmp_path / ".adapter.ptv2-new-0123456789ab", tmp_path / ".adapter.ptv2-old-ba9876543210"]
    for path in stale:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"partial")
    (tmp_path / ".adapter.ptv2-lock").write_text("")  # a killed save's lock file
    others = [tmp_path / ".adapter.backup", tmp_path / "adapter-copy", tmp_path / ".adapter.ptv2-new-mine",
              tmp_path / ".other.ptv2-new-0123456789ab"]
    for path in others:
        path.mkdir()
        (path / "keep.txt").write_text("user data")
    new.save_pretrained(folder)
    assert prefix_length(folder) == 5
    assert not any(path.exists() for path in stale) and not (tmp_path / ".adapter.ptv2-lock").exists()
    assert all((path / "keep.txt").read_text() == "user data" for path in others)


def test_a_save_killed_between_the_fallback_renames_is_restored_first(tmp_path, two_models):
    """Without RENAME_EXCHANGE the old folder is renamed aside first; a kill right after leaves it there."""
    old, new = two_models
    old.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    aside = tmp_path / ".adapter.ptv2-old-00000000abcd"
    (tmp_path / "adapter").rename(aside)
    new.save_pretrained(tmp_path / "adapter")  # puts the old folder back, then replaces it
    assert prefix_length(tmp_path / "adapter") == 5 and (tmp_path / "adapter" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_fallback_without_rename_exchange(tmp_path, two_models, monkeypatch):
    old, new = two_models
    calls = []

    def unsupported(first, second):
        calls.append((first, second))
        raise OSError(errno.EINVAL, "RENAME_EXCHANGE not supported")

    old.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    monkeypatch.setattr(atomic_folder, "exchange", unsupported)
    new.save_pretrained(tmp_path / "adapter")
    assert calls and prefix_length(tmp_path / "adapter") == 5
    assert (tmp_path / "adapter" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_into_the_working_directory_and_through_a_symlink(tmp_path, two_models, monkeypatch):
    old, new = two_models
    real = tmp_path / "real"
    old.save_pretrained(real)
    (tmp_path / "link").symlink_to(real)
    new.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and prefix_length(real) == 5
    monkeypatch.chdir(real)
    old.save_pretrained(".")
    assert os.getcwd() == str(real) and prefix_length(Path(".")) == 3  # we stand in the new folder, not the old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_non_main_process_and_mount_point_are_not_swapped(tmp_path, two_models, monkeypatch, caplog):
    old, new = two_models
    folder = tmp_path / "adapter"
    old.save_pretrained(folder)
    new.save_pretrained(folder, is_main_process=False)  # DDP ranks > 0 write nothing
    assert prefix_length(folder) == 3
    monkeypatch.setattr(atomic_folder.os.path, "ismount", lambda path: str(path) == str(folder))
    with caplog.at_level(logging.WARNING, logger="ptv2_plugin.persistence"):
        new.save_pretrained(folder)
    assert "is a mount point" in caplog.text and prefix_length(folder) == 5


def test_adapters_are_saved_as_safetensors_even_when_asked_for_a_pickle(tmp_path, two_models, caplog):
    """Loading accepts safetensors only, so a pickle would be a file nobody may load (e.g. the Trainer's best
    checkpoint with save_safetensors=False)."""
    old, _ = two_models
    with caplog.at_level(logging.WARNING, logger="ptv2_plugin.persistence"):
        old.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert "safe_serialization=False is ignored" in caplog.text
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    model = PeftModel.from_pretrained(tiny_model("bert"), tmp_path / "adapter")
    assert model.base_model.prefix_encoder().embedding.weight.shape == (3, 32)

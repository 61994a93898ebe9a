"""Saving and loading adapters safely: atomic writes, safetensors only, and shape checks with useful messages.

PEFT writes adapter files in place and, when no safetensors file is present, falls back to unpickling. An adapter is
a production artefact that may come from elsewhere, so for P-Tuning v2 adapters we (1) write every file under a
temporary name and ``os.replace`` it into place, so a crash leaves the previous files intact; (2) refuse folders
whose weights exist only as a pickle; (3) check every tensor's shape against the model before loading and say
which dimension of the base model differs.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch

SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def _is_ptuning_v2(model) -> bool:
    from .config import PTuningV2Config

    return any(isinstance(config, PTuningV2Config) for config in getattr(model, "peft_config", {}).values())


def _replace_tree(source: Path, destination: Path) -> None:
    """Move every file of ``source`` into ``destination`` with an atomic rename each (same filesystem)."""
    for root, _, files in os.walk(source):
        target_root = destination / Path(root).relative_to(source)
        target_root.mkdir(parents=True, exist_ok=True)
        for name in files:
            with open(Path(root) / name, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(Path(root) / name, target_root / name)


def atomic_save_pretrained(save_pretrained):
    """Wrap ``PeftModel.save_pretrained``: P-Tuning v2 adapters are written to a sibling temporary folder first."""

    @functools.wraps(save_pretrained)
    def wrapper(self, save_directory, *args, **kwargs):
        if not _is_ptuning_v2(self) or os.path.isfile(save_directory):
            return save_pretrained(self, save_directory, *args, **kwargs)
        destination = Path(save_directory)
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
        try:
            result = save_pretrained(self, str(staging), *args, **kwargs)
            _replace_tree(staging, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return result

    wrapper._ptv2_atomic = True
    return wrapper


def install_atomic_save() -> None:
    """Idempotently route ``PeftModel.save_pretrained`` through ``atomic_save_pretrained`` (ours only)."""
    from peft import PeftModel

    if not getattr(PeftModel.save_pretrained, "_ptv2_atomic", False):
        PeftModel.save_pretrained = atomic_save_pretrained(PeftModel.save_pretrained)


def refuse_pickled_weights(folder: str | os.PathLike) -> None:
    """Adapters are loaded from safetensors only: a pickle can run code when it is read."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / SAFE_WEIGHTS).is_file():
        return
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
    if pickled:
        raise ValueError(
            f"{folder} holds P-Tuning v2 weights only as {pickled[0]} (a pickle, which can execute code when "
            f"loaded). Only {SAFE_WEIGHTS} is accepted; re-save the adapter with save_pretrained()."
        )


def check_adapter_shapes(model_state: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> None:
    """Compare a loaded prefix encoder with the model's before PyTorch's terse size-mismatch error can happen."""
    problems = []
    for key, tensor in loaded.items():
        if "ptv2_prefix_encoder." not in key or key not in model_state:
            continue
        expected = tuple(model_state[key].shape)
        if tuple(tensor.shape) != expected:
            name = key.split("ptv2_prefix_encoder.", 1)[1].split(".", 1)[1]  # drop the adapter name
            problems.append(f"{name}: adapter {tuple(tensor.shape)}, model {expected}")
    if problems:
        raise ValueError(
            "This P-Tuning v2 adapter does not fit the base model: "
            + "; ".join(problems)
            + ". The first dimension of embedding.weight is the prefix length n; the other dimensions follow the base "
            "model's hidden size and, for the last layer, (prefixed layers x 2 x key/value heads x head size). "
            "Load the adapter onto the base model it was trained on."
        )

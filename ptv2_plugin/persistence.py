"""Saving and loading adapters safely: whole-folder atomic saves, safetensors only, shape checks that explain.

PEFT writes adapter files in place and, when no safetensors file is present, falls back to unpickling. An adapter is
a production artefact that may come from elsewhere, so for P-Tuning v2 adapters we
(1) save through ``atomic_folder.replace_folder``: the adapter folder (every adapter in it, each non-default one in
its subfolder) is written beside the destination and swapped in whole, and whatever else the old folder held is
carried over; see that module for the swap and why;
(2) refuse local folders whose weights exist only as a pickle, because a pickle can run code when it is read;
(3) check every tensor's shape against the model before loading and say which dimension of the base model differs.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import torch
from peft import PeftModel

from .atomic_folder import replace_folder, unswappable_reason
from .config import PTuningV2Config

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# Files of one adapter: where a save writes one of them, the old folder's others are not carried over.
ADAPTER_FILES = ("adapter_config.json", SAFE_WEIGHTS, *PICKLED_WEIGHTS)


def _is_ptuning_v2(model) -> bool:
    return any(isinstance(config, PTuningV2Config) for config in getattr(model, "peft_config", {}).values())


def atomic_save_pretrained(save_pretrained):
    """Wrap ``PeftModel.save_pretrained``: a P-Tuning v2 save replaces the folder in one step."""

    @functools.wraps(save_pretrained)
    def wrapper(self, save_directory, *args, **kwargs):
        bound = inspect.signature(save_pretrained).bind_partial(self, save_directory, *args, **kwargs)
        writes = bound.arguments.get("is_main_process", True)  # other DDP ranks write nothing: no swap either
        if not _is_ptuning_v2(self) or not writes or os.path.isfile(save_directory):
            return save_pretrained(self, save_directory, *args, **kwargs)
        reason = unswappable_reason(save_directory)
        if reason is not None:
            logger.warning("%s; saving the adapter file by file instead (not atomic). Save into a subfolder.", reason)
            return save_pretrained(self, save_directory, *args, **kwargs)
        # README.md is copied first because PEFT updates the model card it finds rather than replacing it.
        with replace_folder(save_directory, keep_old_entries=True, copy_first=("README.md",),
                            group=ADAPTER_FILES) as staging:
            return save_pretrained(self, str(staging), *args, **kwargs)

    wrapper._ptv2_wrapped = True
    return wrapper


def install_peft_wrappers() -> None:
    """Idempotently route ``PeftModel.save_pretrained`` through the wrapper above."""
    for name, wrap in (("save_pretrained", atomic_save_pretrained),):
        if not getattr(getattr(PeftModel, name), "_ptv2_wrapped", False):
            setattr(PeftModel, name, wrap(getattr(PeftModel, name)))


def refuse_pickled_weights(folder: str | os.PathLike) -> None:
    """Adapters are loaded from safetensors only: a pickle can run code when it is read."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, SAFE_WEIGHTS)):
        return
    pickled = [name for name in PICKLED_WEIGHTS if os.path.isfile(os.path.join(folder, name))]
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

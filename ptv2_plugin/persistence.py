"""Saving and loading adapters safely: whole-folder atomic saves, safetensors only, shape checks that explain.

PEFT writes adapter files in place and, when no safetensors file is present, falls back to unpickling. An adapter is
a production artefact that may come from elsewhere, so for P-Tuning v2 adapters we
(1) save through ``atomic_folder.replace_folder``: the adapter folder (every adapter in it, each non-default one in
its subfolder) is written beside the destination and swapped in whole, and whatever else the old folder held is
carried over; see that module for the swap and why;
(2) load weights from ``adapter_model.safetensors`` only, for local folders and hub ids alike, because a pickle can
run code when it is read;
(3) check every tensor's shape against the model before loading and say which dimension of the base model differs.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import file_exists, try_to_load_from_cache
from peft import PeftConfig, PeftModel

from .atomic_folder import replace_folder, unswappable_reason
from .config import PTuningV2Config
from .peft_type import PEFT_TYPE_NAME

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# Files of one adapter: where a save writes one of them, the old folder's others are not carried over.
ADAPTER_FILES = ("adapter_config.json", SAFE_WEIGHTS, *PICKLED_WEIGHTS)
CONVERSION_HINT = (
    "If you trust the file, convert it once: state = torch.load('adapter_model.bin', weights_only=True); "
    "safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, 'adapter_model.safetensors')."
)


class UnsafeWeightsError(ValueError):
    """An adapter's weights exist only in a format that can execute code when loaded (a pickle)."""


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
        if bound.arguments.get("safe_serialization") is False:
            logger.warning("P-Tuning v2 adapters are saved as safetensors (they are loaded from safetensors only); "
                           "safe_serialization=False is ignored.")
            bound.arguments["safe_serialization"] = True
        reason = unswappable_reason(save_directory)
        if reason is not None:
            logger.warning("%s; saving the adapter file by file instead (not atomic). Save into a subfolder.", reason)
            return save_pretrained(*bound.args, **bound.kwargs)
        # README.md is copied first because PEFT updates the model card it finds rather than replacing it.
        with replace_folder(save_directory, keep_old_entries=True, copy_first=("README.md",),
                            group=ADAPTER_FILES) as staging:
            bound.arguments["save_directory"] = str(staging)
            return save_pretrained(*bound.args, **bound.kwargs)

    wrapper._ptv2_wrapped = True
    return wrapper


def safetensors_only_load_adapter(load_adapter):
    """Wrap ``PeftModel.load_adapter`` (which every PEFT load path goes through) to refuse pickled P-Tuning v2
    weights before PEFT could fall back to them."""

    @functools.wraps(load_adapter)
    def wrapper(self, model_id, adapter_name, *args, **kwargs):
        hub_kwargs, _ = self._split_kwargs(kwargs)
        config = self.peft_config.get(adapter_name)
        peft_type = config.peft_type if config is not None else PeftConfig._get_peft_type(model_id, **hub_kwargs)
        if peft_type == PEFT_TYPE_NAME:
            require_safetensors(
                model_id,
                subfolder=hub_kwargs.get("subfolder"),
                revision=hub_kwargs.get("revision"),
                cache_dir=hub_kwargs.get("cache_dir"),
                token=hub_kwargs.get("token") or hub_kwargs.get("use_auth_token"),
                repo_type=hub_kwargs.get("repo_type"),
            )
        return load_adapter(self, model_id, adapter_name, *args, **kwargs)

    wrapper._ptv2_wrapped = True
    return wrapper


def install_peft_wrappers() -> None:
    """Idempotently route ``PeftModel.save_pretrained`` and ``load_adapter`` through the wrappers above."""
    for name, wrap in (("save_pretrained", atomic_save_pretrained), ("load_adapter", safetensors_only_load_adapter)):
        if not getattr(getattr(PeftModel, name), "_ptv2_wrapped", False):
            setattr(PeftModel, name, wrap(getattr(PeftModel, name)))


def require_safetensors(
    model_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    repo_type: str | None = None,
) -> None:
    """Raise ``UnsafeWeightsError`` unless the adapter's weights exist as ``adapter_model.safetensors``.

    Local folders are looked at directly. Hub ids are looked up in the local cache first and, when online, on the
    hub; offline, an id whose safetensors file is not cached is refused (PEFT would fall back to a cached pickle).
    """
    folder = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
    if os.path.isdir(folder):
        if os.path.isfile(os.path.join(folder, SAFE_WEIGHTS)):
            return
        pickled = [name for name in PICKLED_WEIGHTS if os.path.isfile(os.path.join(folder, name))]
        found = f"holds its weights only as {pickled[0]} (a pickle)" if pickled else f"has no {SAFE_WEIGHTS}"
        raise UnsafeWeightsError(
            f"The P-Tuning v2 adapter folder {folder} {found}. Adapters are loaded from {SAFE_WEIGHTS} only, because "
            f"unpickling can execute code. {CONVERSION_HINT}"
        )
    filename = f"{subfolder}/{SAFE_WEIGHTS}" if subfolder else SAFE_WEIGHTS
    if _hub_has_file(os.fspath(model_id), filename, revision, cache_dir, token, repo_type):
        return
    where = "in the local cache (offline mode)" if hub_constants.HF_HUB_OFFLINE else "on the hub"
    raise UnsafeWeightsError(
        f"The P-Tuning v2 adapter {model_id} has no {filename} {where}. Adapters are loaded from safetensors only; "
        f"PEFT's fallback to adapter_model.bin (a pickle, which can execute code when loaded) is refused. "
        f"{CONVERSION_HINT} Then upload adapter_model.safetensors."
    )


def _hub_has_file(repo_id: str, filename: str, revision, cache_dir, token, repo_type) -> bool:
    cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision, repo_type=repo_type)
    if isinstance(cached, str):
        return True
    if cached is not None or hub_constants.HF_HUB_OFFLINE:  # cached as "does not exist", or we cannot ask
        return False
    return file_exists(repo_id, filename, revision=revision, repo_type=repo_type, token=token)


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

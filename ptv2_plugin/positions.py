"""Optional PEFT-compatible position numbering (real tokens numbered from n).

By default P-Tuning v2 leaves position ids alone: the prefix has no position, so the model keeps its whole context
and the numbering it was pretrained with. PEFT's prefix tuning and the original P-Tuning v2 code instead number the
real tokens from n (a side effect of passing the prefix as ``past_key_values``); ``shift_position_ids=True``
reproduces that, e.g. to load a prefix trained with them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .layer import PTuningV2Layer
from .transformers_compat import cached_length


def default_position_ids(model: nn.Module, kwargs: dict) -> torch.Tensor:
    """The position ids the base model would build itself for this call."""
    input_ids = kwargs.get("input_ids")
    reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if reference is None:
        raise ValueError("shift_position_ids needs input_ids or inputs_embeds to number the tokens.")
    batch, length = reference.shape[:2]
    past = cached_length(kwargs)
    padding_idx = getattr(model.config, "pad_token_id", None)
    if model.config.model_type in ("roberta", "xlm-roberta") and input_ids is not None and padding_idx is not None:
        # RoBERTa numbers real tokens from padding_idx + 1 and gives padding the padding index.
        mask = input_ids.ne(padding_idx).int()
        return (torch.cumsum(mask, dim=1) + past) * mask + padding_idx
    positions = torch.arange(past, past + length, device=reference.device)
    return positions.unsqueeze(0).expand(batch, -1)


def shifted_position_ids(model: nn.Module, kwargs: dict, n: int) -> torch.Tensor:
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = default_position_ids(model, kwargs)
        if model.config.model_type in ("roberta", "xlm-roberta") and kwargs.get("input_ids") is not None:
            real = kwargs["input_ids"].ne(model.config.pad_token_id)
            return torch.where(real, position_ids + n, position_ids)
    return position_ids + n


def install_position_shift(model: nn.Module, tuner: nn.Module, adapter_name: str):
    """Pre-hook on the base model that shifts position ids by the adapter's n while that adapter is active."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "position_ids" not in parameters:
        raise ValueError(
            f"shift_position_ids=True needs a model whose forward takes position_ids; {type(model).__name__} does not."
        )

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if adapter_name not in tuner.active_adapters or not _adapter_enabled(tuner):
            return None
        if args:
            raise ValueError("With shift_position_ids=True, call the model with keyword arguments.")
        n = tuner.peft_config[adapter_name].num_virtual_tokens
        return args, {**kwargs, "position_ids": shifted_position_ids(module, kwargs, n)}

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _adapter_enabled(tuner: nn.Module) -> bool:
    for module in tuner.model.modules():
        if isinstance(module, PTuningV2Layer):
            return not module.disable_adapters
    return False

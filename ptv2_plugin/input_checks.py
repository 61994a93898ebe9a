"""Checks on a forward call's inputs that turn silent garbage or deep tracebacks into errors that name the problem."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .transformers_compat import cached_length

# Families with learned absolute position embeddings, and how many positions are reserved (RoBERTa numbers from
# padding_idx + 1). Rotary and relative models have no hard table limit, so they are not checked.
LEARNED_POSITIONS_OFFSET = {
    "bert": 0,
    "electra": 0,
    "distilbert": 0,
    "gpt2": 0,
    "bart": 0,
    "roberta": None,  # padding_idx + 1, read from the config
    "xlm-roberta": None,
}


def max_real_tokens(config) -> int | None:
    """How many real tokens (cache included) the model's position table holds, or None if it has no hard limit."""
    if config.model_type not in LEARNED_POSITIONS_OFFSET:
        return None
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is None:
        return None
    offset = LEARNED_POSITIONS_OFFSET[config.model_type]
    if offset is None:
        offset = (getattr(config, "pad_token_id", None) or 0) + 1
    return positions - offset


def check_forward_inputs(model: nn.Module, kwargs: dict[str, Any], shift: int) -> None:
    """Validate a forward call of the base model; ``shift`` is the position shift of the active adapter (or 0)."""
    input_ids = kwargs.get("input_ids")
    attention_mask = kwargs.get("attention_mask")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}.")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}.")
        vocab = getattr(model.config, "vocab_size", None)
        if vocab and input_ids.numel():
            low, high = torch.aminmax(input_ids)
            low, high = int(low), int(high)
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"input_ids hold ids in [{low}, {high}] but the vocabulary has {vocab} entries: was the text "
                    "tokenized for another model?"
                )
    if attention_mask is not None and input_ids is not None:
        if attention_mask.shape != input_ids.shape and attention_mask.dim() == 2:
            past = cached_length(kwargs)
            if attention_mask.shape != (input_ids.shape[0], past + input_ids.shape[1]):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}"
                    + (f" with {past} cached tokens" if past else "")
                    + "; they must describe the same tokens."
                )
        if attention_mask.device != input_ids.device:
            raise ValueError(
                f"attention_mask is on {attention_mask.device} but input_ids on {input_ids.device}; move both to the "
                "model's device."
            )
    if input_ids is not None and attention_mask is None and _has_padding(model, input_ids):
        raise ValueError(
            f"input_ids contain the padding id {model.config.pad_token_id} but no attention_mask was given, so real "
            "tokens would attend to padding. Pass the attention_mask your tokenizer returned."
        )
    limit = max_real_tokens(model.config)
    reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if limit is not None and reference is not None:
        length = cached_length(kwargs) + reference.shape[1] + shift
        if length > limit:
            counted = (
                f" plus the prefix's {shift} positions (shift_position_ids=True)"
                if shift
                else "; the prefix does not count, it has no position"
            )
            raise ValueError(
                f"The input has {length - shift} tokens{counted}, but this {model.config.model_type} model has "
                f"{limit} positions. Truncate the input (tokenizer(..., truncation=True, max_length={limit - shift}))."
            )
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        weight = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
        if weight is not None and (embeds.dtype != weight.dtype or embeds.device != weight.device):
            raise TypeError(
                f"inputs_embeds are {embeds.dtype} on {embeds.device} but the model is {weight.dtype} on "
                f"{weight.device}."
            )


def _has_padding(model: nn.Module, input_ids: torch.Tensor) -> bool:
    config = model.config
    pad = getattr(config, "pad_token_id", None)
    if pad is None or pad in (getattr(config, "eos_token_id", None), getattr(config, "bos_token_id", None)):
        return False  # the pad id is also a real token: cannot tell
    decoder_only = not getattr(config, "is_encoder_decoder", False) and getattr(model, "can_generate", bool)()
    if decoder_only:
        return False  # a language model may generate the pad id as a token
    return bool((input_ids == pad).any())


def tracing() -> bool:
    """Exporters and compilers trace the model: data-dependent checks would end up in (or break) the graph."""
    return (
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or (hasattr(torch, "compiler") and torch.compiler.is_compiling())
    )

"""Split-softmax prefix attention for exported graphs: the prefix's scores are concatenated, not its keys and values.

Why: at inference the plugin prepends the prefix to every layer's keys and values (``cat``), which in a decoder graph
copies the whole KV cache once more per layer and step (past + new keys are already concatenated for the ``present``
outputs). ``benchmarks/onnx_inference.py`` measured the decoder graph at 0.915x the base model's tokens/s at batch 8
with that copy as its extra cost. Here, while tracing, a prefixed causal self-attention call whose base attention is
SDPA is written as

    scores = [q . prefix_keys^T * scale (+ visibility) ; q . keys^T * scale + mask]
    out    = softmax(scores)[:, :, :, :n] . prefix_values + softmax(scores)[:, :, :, n:] . values

which is the same attention (one softmax over prefix and real keys together), but concatenates the (batch, heads,
queries, n + keys) scores, which for a decoding step (one query) are ``head_dim`` times smaller than the keys. The
prefix keys and values stay (1, heads, n, head_dim): MatMul broadcasts them over the batch, and after export they are
initializers, so ONNX Runtime folds their head repetition and transposition once at session start.

Only causal self-attention (decoders, and the decoder stack of encoder-decoders) is rewritten: there the cache copy
is what it saves. Bidirectional encoder layers keep the concatenation: with s real tokens their scores (s x (n + s))
are larger than their keys ((n + s) x head_dim) once s exceeds head_dim, and the fused ``MultiHeadAttention``
(``fused_attention.py``) takes them anyway. For a long prompt the same holds in a decoder's first call; the decoding
steps that follow (one query each) are where generation spends its time. Only calls this expresses exactly are
rewritten: SDPA as the base attention, no dropout, no relative-position bias, soft-capping or attention sinks (those
models run eager attention and keep the plugin's path).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ptv2_plugin.attention import PTUNING_V2_ATTENTION, ActivePrefix, base_attention_function, current_prefix

UNSUPPORTED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks", "head_mask")


def _repeat_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, kv_heads, length, head_dim) -> (batch, heads, length, head_dim), as grouped-query attention reads it."""
    groups = heads // states.shape[1]
    if groups == 1:
        return states
    batch, kv_heads, length, head_dim = states.shape
    expanded = states[:, :, None].expand(batch, kv_heads, groups, length, head_dim)
    return expanded.reshape(batch, kv_heads * groups, length, head_dim)


def _skip_reason(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> str | None:
    if not getattr(module, "is_causal", False):
        return "not causal self-attention"
    if base_attention_function(module) is not ALL_ATTENTION_FUNCTIONS.get("sdpa"):
        return "base attention is not SDPA"
    if query.shape[1] % key.shape[1]:
        return "query heads are not a multiple of key/value heads"
    if float(kwargs.get("dropout") or 0.0) > 0.0:
        return "attention dropout is active"
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"the call passes {name}"
    return None


def split_softmax_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, prefix: ActivePrefix,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA over ``[prefix; keys]`` without concatenating keys or values; returns (batch, queries, heads, head_dim)
    like transformers' attention functions."""
    heads, head_dim = query.shape[1], query.shape[-1]
    scale = kwargs.get("scaling") or head_dim**-0.5
    prefix_key = _repeat_heads(prefix.key.to(query.dtype), heads)
    prefix_value = _repeat_heads(prefix.value.to(query.dtype), heads)
    keys, values = _repeat_heads(key, heads), _repeat_heads(value, heads)
    floor = torch.finfo(query.dtype).min
    real = torch.matmul(query, keys.transpose(-1, -2)) * scale
    if attention_mask is not None:
        mask = attention_mask[..., : keys.shape[-2]]
        real = real.masked_fill(~mask, floor) if mask.dtype == torch.bool else real + mask
    elif _causal(module, query, kwargs):
        queries, length = query.shape[-2], keys.shape[-2]
        positions = torch.arange(queries, device=query.device)[:, None] + (length - queries)
        real = real.masked_fill(torch.arange(length, device=query.device)[None, :] > positions, floor)
    scores = torch.matmul(query, prefix_key.transpose(-1, -2)) * scale
    if prefix.visible is not None:
        scores = scores.masked_fill(~prefix.visible.to(torch.bool)[:, None, None, :], floor)
    n = prefix_key.shape[-2]
    probs = torch.softmax(torch.cat([scores.expand(*real.shape[:-1], n), real], dim=-1), dim=-1, dtype=torch.float32)
    probs = probs.to(query.dtype)
    out = torch.matmul(probs[..., :n], prefix_value) + torch.matmul(probs[..., n:], values)
    return out.transpose(1, 2).contiguous(), None


def _causal(module: torch.nn.Module, query: torch.Tensor, kwargs: dict) -> bool:
    """Whether SDPA would have applied its own causal mask (transformers passes ``is_causal`` or sets it on the
    module); with one query the causal mask hides nothing."""
    if query.shape[-2] <= 1:
        return False
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def _split_or(original):
    def attention(module, query, key, value, attention_mask, *args: Any, **kwargs: Any):
        prefix = current_prefix()
        if prefix is None or args or _skip_reason(module, query, key, kwargs) is not None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        prefix.check_batch(key.shape[0])
        return split_softmax_attention(module, query, key, value, attention_mask, prefix, **kwargs)

    return attention


@contextmanager
def split_prefix_attention() -> Iterator[None]:
    """While tracing, write prefixed causal SDPA self-attention as split-softmax attention (restored on exit)."""
    original = ALL_ATTENTION_FUNCTIONS[PTUNING_V2_ATTENTION]
    AttentionInterface.register(PTUNING_V2_ATTENTION, _split_or(original))
    try:
        yield
    finally:
        AttentionInterface.register(PTUNING_V2_ATTENTION, original)

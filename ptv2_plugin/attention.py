"""Putting prefix keys and values into attention.

Two ways in, chosen per attention module by ``injection_kind``:

* ``"interface"``: modules that call ``ALL_ATTENTION_FUNCTIONS`` (every supported family on transformers 5, decoders
  on 4.57). The module's config is replaced by a view whose ``_attn_implementation`` names our function, which
  prepends the prefix to the keys and values it is handed (after RoPE and after any KV-cache update, so the cache
  never holds the prefix), widens the mask, and calls the model's own eager or SDPA function.
* ``"projection"``: BERT-family self-attention on transformers 4.57, which computes attention inline. Forward hooks
  prepend the prefix to the key/value projections, and the mask argument is widened.

The prefix of the running layer travels in a ``ContextVar`` set by ``PTuningV2Layer.forward``: nothing is stored on
the base modules, and concurrent threads each see their own.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PTUNING_V2_ATTENTION = "ptv2_prefixed"
SUPPORTED_BASE_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class ActivePrefix:
    """Prefix of the layer being run: keys and values of shape (batch or 1, kv_heads, n, head_dim).

    ``visible`` (batch, n) is set for mixed-adapter batches, where rows carry prefixes of different lengths (padded
    to the longest) or none at all; hidden prefix columns are masked out of that row's attention.
    """

    key: torch.Tensor
    value: torch.Tensor
    visible: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.key.shape[-2]

    def check_batch(self, batch: int) -> None:
        if self.key.shape[0] not in (1, batch):
            raise ValueError(
                f"adapter_names names {self.key.shape[0]} rows but the batch has {batch}; pass one adapter name per "
                "row (use '__base__' for rows without an adapter)."
            )


_ACTIVE: ContextVar[ActivePrefix | None] = ContextVar("ptv2_active_prefix", default=None)
ROW_ADAPTERS: ContextVar[list[str] | None] = ContextVar("ptv2_row_adapters", default=None)


@contextmanager
def active_prefix(prefix: ActivePrefix):
    token = _ACTIVE.set(prefix)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ------------------------------------------------------------------------------------------------------ masks
def widen_mask(mask: torch.Tensor, n: int, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Prepend ``n`` prefix key columns to a 4-D mask: boolean/integer (1 = attend) or additive float.

    Without ``visible`` every query sees the whole prefix; with it (batch, n), only the columns marked visible.
    """
    if visible is None:
        block = torch.ones((*mask.shape[:-1], n), dtype=torch.bool, device=mask.device)
    else:
        batch = max(mask.shape[0], visible.shape[0])
        mask = mask.expand(batch, *mask.shape[1:])
        block = visible.to(mask.device)[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], n)
    if mask.dtype.is_floating_point:
        zeros = torch.zeros(block.shape, dtype=mask.dtype, device=mask.device)
        block = zeros.masked_fill(~block, torch.finfo(mask.dtype).min)
    else:
        block = block.to(mask.dtype)
    return torch.cat([block, mask], dim=-1)


def prefix_mask(
    query_len: int, key_len: int, n: int, *, causal: bool, visible: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean (batch or 1, 1, q, n + k) mask for calls that had none: the prefix (or its visible part) for every
    query, then all real keys, or those up to the query's own position when ``causal``."""
    real = torch.ones(query_len, key_len, dtype=torch.bool, device=device)
    if causal:
        q_pos = torch.arange(query_len, device=device).unsqueeze(-1) + (key_len - query_len)
        real = torch.arange(key_len, device=device).unsqueeze(0) <= q_pos
    return widen_mask(real[None, None], n, visible)


# ------------------------------------------------------------------------------------------- interface injection
class PrefixedAttentionConfig:
    """A view of a model config that routes one attention module to ``prefixed_attention``.

    Everything else reads and writes through to the real config, so ``set_attn_implementation`` and friends keep
    working, and the base model's own masks are built exactly as without an adapter.
    """

    def __init__(self, base_config: Any) -> None:
        self.__dict__["_base"] = base_config

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_base":
            raise AttributeError(name)
        return getattr(self.__dict__["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_base"], name, value)

    @property
    def _attn_implementation(self) -> str:
        return PTUNING_V2_ATTENTION

    @property
    def base_config(self) -> Any:
        return self.__dict__["_base"]

    def __repr__(self) -> str:
        return f"PrefixedAttentionConfig({self.base_config!r})"


def base_attention_function(module: nn.Module) -> Callable:
    """The function the module would call without us: its own file's eager function, or the registered one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = module.config.base_config if isinstance(module.config, PrefixedAttentionConfig) else module.config
    implementation = config._attn_implementation or "eager"
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    if implementation not in SUPPORTED_BASE_IMPLEMENTATIONS:
        raise NotImplementedError(
            f"P-Tuning v2 runs on attn_implementation 'eager' or 'sdpa'; this model uses {implementation!r}. "
            "Load it with attn_implementation='sdpa'."
        )
    return ALL_ATTENTION_FUNCTIONS[implementation]


def prefixed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
):
    """Registered attention function: the model's own attention over ``[prefix; keys]`` and ``[prefix; values]``."""
    attend = base_attention_function(module)
    prefix = _ACTIVE.get()
    if prefix is None:
        return attend(module, query, key, value, attention_mask, *args, **kwargs)
    n = prefix.length
    batch = key.shape[0]
    prefix.check_batch(batch)
    key = torch.cat([prefix.key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix.value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    if attention_mask is not None:
        attention_mask = widen_mask(attention_mask, n, prefix.visible)
    else:
        # SDPA's is_causal aligns top-left and would hide real keys behind the prefix: make the mask explicit.
        causal = _sdpa_would_be_causal(module, attend, query, kwargs)
        if causal or prefix.visible is not None:
            attention_mask = prefix_mask(
                query.shape[2], key.shape[2] - n, n, causal=causal, visible=prefix.visible, device=query.device
            )
            if "is_causal" in kwargs:
                kwargs["is_causal"] = False
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        # Prefix keys have no position, so no relative-position bias (T5); visibility is already in the mask.
        kwargs["position_bias"] = widen_mask(position_bias, n)
    return attend(module, query, key, value, attention_mask, *args, **kwargs)


def _sdpa_would_be_causal(module: nn.Module, attend: Callable, query: torch.Tensor, kwargs: dict) -> bool:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if attend is not ALL_ATTENTION_FUNCTIONS.get("sdpa") or query.shape[2] <= 1:
        return False
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def register_attention_function() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(PTUNING_V2_ATTENTION, prefixed_attention)


# ------------------------------------------------------------------------------------------ projection injection
# Key/value projection names of attention modules that compute attention inline (no attention interface).
PROJECTION_NAMES = (("key", "value"), ("key_proj", "value_proj"))


def projection_names(module: nn.Module) -> tuple[str, str] | None:
    for key_name, value_name in PROJECTION_NAMES:
        if isinstance(getattr(module, key_name, None), nn.Linear) and isinstance(
            getattr(module, value_name, None), nn.Linear
        ):
            return key_name, value_name
    return None


def _prepend_projected(output: torch.Tensor, which: int) -> torch.Tensor:
    prefix = _ACTIVE.get()
    if prefix is None:
        return output
    prefix.check_batch(output.shape[0])
    tensor = prefix.key if which == 0 else prefix.value  # (b, kv_heads, n, head_dim)
    b, heads, n, head_dim = tensor.shape
    flat = tensor.permute(0, 2, 1, 3).reshape(b, n, heads * head_dim).to(output.dtype)
    return torch.cat([flat.expand(output.shape[0], -1, -1), output], dim=1)


def _relative_bias_without_prefix(original: Callable) -> Callable:
    """DeBERTa's content-to-position and position-to-content terms exist only between real tokens: prefix keys have
    no position. The bias is computed on the real keys and the prefix columns get zero (content-to-content only)."""

    def disentangled_attention_bias(query_layer, key_layer, relative_pos, rel_embeddings, scale_factor):
        prefix = _ACTIVE.get()
        if prefix is None:
            return original(query_layer, key_layer, relative_pos, rel_embeddings, scale_factor)
        n = prefix.length
        bias = original(query_layer, key_layer[:, n:], relative_pos, rel_embeddings, scale_factor)
        return nn.functional.pad(bias, (n, 0))

    return disentangled_attention_bias


def install_projection_hooks(module: nn.Module) -> list:
    """Hooks that prepend the running prefix to the key/value projections (BERT family on transformers 4.57,
    DeBERTa-v2 everywhere). Returns handles whose ``remove()`` restores the module."""
    if getattr(module, "position_embedding_type", "absolute") != "absolute":
        raise NotImplementedError(
            f"{type(module).__name__} uses position_embedding_type={module.position_embedding_type!r}; P-Tuning v2 "
            "supports absolute positions on this transformers version (prefix keys have no relative position)."
        )
    if getattr(module, "is_decoder", False):
        raise NotImplementedError(
            f"{type(module).__name__} is configured as a decoder; on transformers 4.57 P-Tuning v2 supports "
            "BERT-family models as encoders only. Upgrade to transformers 5 for decoder use."
        )
    key_name, value_name = projection_names(module)
    handles = [
        getattr(module, key_name).register_forward_hook(lambda m, a, o: _prepend_projected(o, 0)),
        getattr(module, value_name).register_forward_hook(lambda m, a, o: _prepend_projected(o, 1)),
    ]
    if hasattr(module, "disentangled_attention_bias"):
        module.disentangled_attention_bias = _relative_bias_without_prefix(module.disentangled_attention_bias)
        handles.append(_InstanceAttributeHandle(module, "disentangled_attention_bias"))
    return handles


class _InstanceAttributeHandle:
    """Undo of an instance-level method override, with the same ``remove()`` as a hook handle."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name

    def remove(self) -> None:
        self.module.__dict__.pop(self.name, None)


def widen_mask_argument(args: tuple, kwargs: dict, prefix: ActivePrefix) -> tuple[tuple, dict]:
    """Widen the ``attention_mask`` argument of an inline self-attention call (positional slot 1 or keyword).

    A missing mask means "attend everywhere"; it is materialised (additive, in the hidden states' dtype) only when
    some rows must not see part of the prefix.
    """
    n = prefix.length
    hidden = args[0] if args else kwargs["hidden_states"]
    prefix.check_batch(hidden.shape[0])
    in_kwargs = "attention_mask" in kwargs
    mask = kwargs["attention_mask"] if in_kwargs else (args[1] if len(args) > 1 else None)
    if mask is not None:
        mask = widen_mask(mask, n, prefix.visible)
    elif prefix.visible is not None:
        real = torch.zeros(1, 1, 1, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        mask = widen_mask(real, n, prefix.visible)
    else:
        return args, kwargs
    if in_kwargs or len(args) <= 1:
        return args, {**kwargs, "attention_mask": mask}
    return (args[0], mask, *args[2:]), kwargs


# ---------------------------------------------------------------------------------------------------- dispatch
def injection_kind(module: nn.Module) -> str:
    """How a prefix gets into ``module``: through the attention interface, or through its key/value projections."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        source = ""
    if "ALL_ATTENTION_FUNCTIONS" in source and hasattr(module, "config"):
        return "interface"
    if projection_names(module) is not None:
        return "projection"
    import transformers

    looks_like_attention = "attention" in type(module).__name__.lower()
    if int(transformers.__version__.split(".")[0]) < 5 and looks_like_attention:
        raise NotImplementedError(
            f"{type(module).__name__} computes attention inline on transformers {transformers.__version__}, in a way "
            "a prefix cannot enter without copying its code; transformers >= 5 routes it through the attention "
            "interface that P-Tuning v2 uses. Upgrade with: pip install 'transformers>=5'."
        )
    raise NotImplementedError(
        f"{type(module).__name__} is not a self-attention module P-Tuning v2 knows how to prefix: it neither uses "
        "transformers' attention interface nor has key/value projections. Check `target_modules`."
    )

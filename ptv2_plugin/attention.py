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
    """Prefix of the layer being run: keys and values of shape (batch or 1, kv_heads, n, head_dim)."""

    key: torch.Tensor
    value: torch.Tensor

    @property
    def length(self) -> int:
        return self.key.shape[-2]


_ACTIVE: ContextVar[ActivePrefix | None] = ContextVar("ptv2_active_prefix", default=None)


@contextmanager
def active_prefix(prefix: ActivePrefix):
    token = _ACTIVE.set(prefix)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ------------------------------------------------------------------------------------------------------ masks
def widen_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Prepend ``n`` always-visible key columns to a 4-D boolean or additive float mask."""
    shape = (*mask.shape[:-1], n)
    if mask.dtype == torch.bool:
        visible = torch.ones(shape, dtype=torch.bool, device=mask.device)
    else:
        visible = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask], dim=-1)


def causal_mask_with_prefix(query_len: int, key_len: int, n: int, device: torch.device) -> torch.Tensor:
    """Boolean (1, 1, q, n + k) mask: every query sees the prefix and the real keys up to its own position."""
    q_pos = torch.arange(query_len, device=device).unsqueeze(-1) + (key_len - query_len)
    k_pos = torch.arange(key_len, device=device).unsqueeze(0)
    real = k_pos <= q_pos
    prefix = torch.ones(query_len, n, dtype=torch.bool, device=device)
    return torch.cat([prefix, real], dim=-1)[None, None]


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
    key = torch.cat([prefix.key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix.value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    if attention_mask is not None:
        attention_mask = widen_mask(attention_mask, n)
    elif _sdpa_would_be_causal(module, attend, query, kwargs):
        # SDPA's is_causal aligns top-left and would hide real keys behind the prefix: make the mask explicit.
        attention_mask = causal_mask_with_prefix(query.shape[2], key.shape[2] - n, n, query.device)
        if "is_causal" in kwargs:
            kwargs["is_causal"] = False
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
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
def _prepend_projected(module: nn.Module, args: tuple, output: torch.Tensor, which: int) -> torch.Tensor:
    prefix = _ACTIVE.get()
    if prefix is None:
        return output
    tensor = prefix.key if which == 0 else prefix.value  # (b, kv_heads, n, head_dim)
    b, heads, n, head_dim = tensor.shape
    flat = tensor.permute(0, 2, 1, 3).reshape(b, n, heads * head_dim).to(output.dtype)
    return torch.cat([flat.expand(output.shape[0], -1, -1), output], dim=1)


def install_projection_hooks(module: nn.Module) -> list:
    """Hooks on ``module.key`` / ``module.value`` that prepend the running prefix (BERT family, transformers 4.57)."""
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
    return [
        module.key.register_forward_hook(lambda m, a, o: _prepend_projected(m, a, o, 0)),
        module.value.register_forward_hook(lambda m, a, o: _prepend_projected(m, a, o, 1)),
    ]


def widen_mask_argument(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    """Widen the ``attention_mask`` argument of a BERT-style self-attention call (positional slot 1 or keyword)."""
    if "attention_mask" in kwargs:
        if kwargs["attention_mask"] is not None:
            kwargs = {**kwargs, "attention_mask": widen_mask(kwargs["attention_mask"], n)}
    elif len(args) > 1 and args[1] is not None:
        args = (args[0], widen_mask(args[1], n), *args[2:])
    return args, kwargs


# ---------------------------------------------------------------------------------------------------- dispatch
def injection_kind(module: nn.Module) -> str:
    """How a prefix gets into ``module``: through the attention interface, or through its key/value projections."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        source = ""
    if "ALL_ATTENTION_FUNCTIONS" in source and hasattr(module, "config"):
        return "interface"
    if isinstance(getattr(module, "key", None), nn.Linear) and isinstance(getattr(module, "value", None), nn.Linear):
        return "projection"
    raise NotImplementedError(
        f"{type(module).__name__} is not a self-attention module P-Tuning v2 knows how to prefix: it neither uses "
        "transformers' attention interface nor has key/value projections. Check `target_modules`."
    )

"""Putting prefix keys and values into attention.

Each wrapped attention module gets one ``Injection``: set up once, it then wraps every call of the module. The one
here, ``InterfaceInjection``, serves modules that call ``ALL_ATTENTION_FUNCTIONS`` (every supported family on
transformers 5, decoders on 4.57): the module's config is replaced by a view whose ``_attn_implementation`` names our
function, which prepends the prefix to the keys and values it is handed (after RoPE and after any KV-cache update, so
the cache never holds the prefix), widens the mask, and calls the model's own eager or SDPA function. Modules that
compute attention inline get the injections of ``inline_attention.py``.

The prefix of the running layer travels in a ``ContextVar`` set around the module's call: nothing is stored on the
base modules, and concurrent threads each see their own. Under torch.compile, whose dynamo cannot trace a ContextVar
(each access would break the graph), modules that hand their ``**kwargs`` on to the attention function get the
prefix as the call argument ``ptv2_prefix`` instead; the others keep the ContextVar and compile with graph breaks.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

PTUNING_V2_ATTENTION = "ptv2_prefixed"
SUPPORTED_BASE_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)  # cached and shared across calls while serving: never mutated
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
# Eval fast path (serving_plan.py): each prefixed layer's prefix, resolved once for the whole forward.
PLANNED_PREFIXES: ContextVar[dict | None] = ContextVar("ptv2_planned_prefixes", default=None)
# Under torch.compile (dynamo), which cannot trace a ContextVar, the prefix goes to the attention function as this
# call argument instead, through modules that hand their ``**kwargs`` on to it (``InterfaceInjection``).
PREFIX_KWARG = "ptv2_prefix"


class RowBatches:
    """How many mixed-adapter forwards are running, in any thread. Compiled layers read ``ROW_ADAPTERS`` (a graph
    break) only while this is not zero, so an ordinary compiled forward never touches a ContextVar."""

    running = 0
    _lock = threading.Lock()

    @classmethod
    @contextmanager
    def open(cls):
        with cls._lock:
            cls.running += 1
        try:
            yield
        finally:
            with cls._lock:
                cls.running -= 1


def current_prefix() -> ActivePrefix | None:
    """The prefix of the attention layer running now (None outside a prefixed layer): what exporters read."""
    return _ACTIVE.get()


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
        # An instance entry, not a property: the module reads it on every call, and this costs no Python frame.
        # Writes still go to the real config (``__setattr__``).
        self.__dict__["_attn_implementation"] = PTUNING_V2_ATTENTION

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_base":
            raise AttributeError(name)
        return getattr(self.__dict__["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_base"], name, value)

    @property
    def base_config(self) -> Any:
        return self.__dict__["_base"]

    def __repr__(self) -> str:
        return f"PrefixedAttentionConfig({self.base_config!r})"


def unsupported_backend(implementation: str, module_name: str) -> NotImplementedError:
    return NotImplementedError(
        f"P-Tuning v2 runs on attn_implementation 'eager' or 'sdpa'; {module_name} uses {implementation!r}. "
        "Load the model with attn_implementation='sdpa'."
    )


def base_attention_function(module: nn.Module) -> Callable:
    """The function the module would call without us: its own file's eager function, or the registered one."""
    return _resolve_base_attention(module)[1]


def _resolve_base_attention(module: nn.Module) -> tuple[str, Callable]:
    """``(implementation name, function)`` of the module's own attention.

    Resolved once per implementation name and remembered on the module's config view (this runs in every layer of
    every forward); ``set_attn_implementation`` changes the name and so the answer.
    """
    config = module.config
    view = config if isinstance(config, PrefixedAttentionConfig) else None
    if view is not None:
        config = view.__dict__["_base"]
    implementation = config._attn_implementation or "eager"
    resolved = view.__dict__.get("_resolved") if view is not None else None
    if resolved is not None and resolved[0] == implementation:
        return resolved
    if implementation == "eager":
        function = sys.modules[type(module).__module__].eager_attention_forward
    elif implementation in SUPPORTED_BASE_IMPLEMENTATIONS:
        function = ALL_ATTENTION_FUNCTIONS[implementation]
    else:
        raise unsupported_backend(implementation, type(module).__name__)
    resolved = (implementation, function)
    if view is not None:
        view.__dict__["_resolved"] = resolved
    return resolved


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
    implementation, attend = _resolve_base_attention(module)
    prefix = kwargs.pop(PREFIX_KWARG, None) or _ACTIVE.get()
    if prefix is None:
        return attend(module, query, key, value, attention_mask, *args, **kwargs)
    n = prefix.length
    prefix.check_batch(key.shape[0])
    key, value = prepend_prefix(prefix, key, value)
    if attention_mask is not None:
        attention_mask = widen_mask(attention_mask, n, prefix.visible)
    else:
        # SDPA's is_causal aligns top-left and would hide real keys behind the prefix: make the mask explicit.
        is_causal = kwargs.get("is_causal")
        causal = implementation == "sdpa" and query.shape[2] > 1 and bool(
            getattr(module, "is_causal", True) if is_causal is None else is_causal
        )
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


def prepend_prefix(prefix: ActivePrefix, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[prefix; key]`` and ``[prefix; value]`` along the sequence axis of (batch, kv_heads, seq, head_dim) states."""
    return torch.cat([_match(prefix.key, key), key], dim=2), torch.cat([_match(prefix.value, value), value], dim=2)


def _match(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The prefix in the states' dtype and batch (no-op views in the common case: this runs in every layer)."""
    if prefix.dtype != states.dtype:
        prefix = prefix.to(states.dtype)
    if prefix.shape[0] != states.shape[0]:
        prefix = prefix.expand(states.shape[0], -1, -1, -1)
    return prefix


def register_attention_function() -> None:
    AttentionInterface.register(PTUNING_V2_ATTENTION, prefixed_attention)


# ---------------------------------------------------------------------------------------------------- injections
class Injection:
    """How one attention module takes a prefix: ``install`` once; every call runs ``before``, the module with the
    prefix active, then ``after``; ``remove`` gives the module back untouched."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.handles: list = []
        self.install()

    def install(self) -> None:
        pass

    def before(self, prefix: ActivePrefix, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def after(self, prefix: ActivePrefix, outputs: Any) -> Any:
        return outputs

    def __call__(self, prefix: ActivePrefix, args: tuple, kwargs: dict) -> Any:
        args, kwargs = self.before(prefix, args, kwargs)
        token = _ACTIVE.set(prefix)
        try:
            outputs = self.module(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)
        return self.after(prefix, outputs)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class InterfaceInjection(Injection):
    """Modules that call transformers' attention interface: their config view names ``prefixed_attention``."""

    def install(self) -> None:
        base_attention_function(self.module)  # fail now, not mid-forward, on an unsupported attention backend
        if not isinstance(self.module.config, PrefixedAttentionConfig):
            self.module.config = PrefixedAttentionConfig(self.module.config)
        self.forwards_kwargs = forwards_kwargs_to_attention(self.module)

    def __call__(self, prefix: ActivePrefix, args: tuple, kwargs: dict) -> Any:
        # Nothing to do before or after the module: only the prefix for its attention function (every layer, every
        # forward, so without the general path's two extra calls).
        if self.forwards_kwargs and torch.compiler.is_dynamo_compiling():
            return self.module(*args, **kwargs, **{PREFIX_KWARG: prefix})
        token = _ACTIVE.set(prefix)
        try:
            return self.module(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    def remove(self) -> None:
        if isinstance(getattr(self.module, "config", None), PrefixedAttentionConfig):
            self.module.config = self.module.config.base_config


def forwards_kwargs_to_attention(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes ``**kwargs`` and hands them on to the attention function: read from its
    source, where the call ``attention_interface(...)`` must pass ``**kwargs`` at its own level (not inside a nested
    call). Anything else counts as no, and the module gets its prefix through the ContextVar."""
    forward = type(module).forward
    try:
        source, parameters = inspect.getsource(forward), inspect.signature(forward).parameters.values()
    except (OSError, TypeError, ValueError):
        return False
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return False
    start = source.find("attention_interface(")
    if start < 0:
        return False
    depth = 0
    for position in range(start + len("attention_interface"), len(source)):
        depth += {"(": 1, ")": -1}.get(source[position], 0)
        if depth == 0:
            break
        if depth == 1 and source.startswith("**kwargs", position):
            return True
    return False


def uses_attention_interface(module: nn.Module) -> bool:
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source and hasattr(module, "config")

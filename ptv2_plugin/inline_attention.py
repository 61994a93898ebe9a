"""Prefixes for attention modules that compute attention inline instead of calling the attention interface.

transformers 4.57 computes attention inside these modules' ``forward`` (BERT family, DistilBERT, ModernBERT, T5), and
DeBERTa-v2 does so on every version. We never copy their code: each injection enters through what the module exposes
(a projection's output, a call argument, the cache object it is handed, a bias method) and lets the module's own code
do the attention:

* ``ProjectionInjection`` (BERT family on 4.57, DeBERTa-v2): key/value projection outputs get the prefix in front;
  the ``attention_mask`` argument is widened.
* ``PaddedInputInjection`` (DistilBERT on 4.57): the module sizes its mask from its ``key`` input, so that input is
  padded by n rows whose projections are replaced by the prefix.
* ``FusedQKVInjection`` (ModernBERT on 4.57): the fused QKV projection gets n extra rows (zero queries, the prefix as
  keys/values) at position 0, where rotary embedding is the identity, so the prefix enters unrotated; the n extra
  output rows are dropped.
* ``CacheInjection`` (T5 on 4.57): the module stores projected keys in the cache it is given and reads them back, so
  it is handed a cache view that stores only the real keys and returns them with the prefix in front (also when
  there is no cache); its relative-position bias gets zero columns for the prefix keys, which have no position.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from .attention import (
    _ACTIVE,
    SUPPORTED_BASE_IMPLEMENTATIONS,
    ActivePrefix,
    Injection,
    unsupported_backend,
    widen_mask,
)
from .transformers_compat import cache_parameter

# Key/value projection names of attention modules whose keys come straight from their projections.
PROJECTION_NAMES = (("key", "value"), ("key_proj", "value_proj"))


def _flat(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, heads, n, head_dim) -> (b, n, heads * head_dim), the layout of a projection's output."""
    b, heads, n, head_dim = tensor.shape
    return tensor.permute(0, 2, 1, 3).reshape(b, n, heads * head_dim).to(dtype)


def _check_backend(module: nn.Module) -> None:
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_BASE_IMPLEMENTATIONS:
        raise unsupported_backend(implementation, type(module).__name__)


class _Bound:
    """A call's arguments by parameter name, so an injection can rewrite ``mask`` or ``key`` however it was passed."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        signature = inspect.signature(module.forward)
        self.bound = signature.bind_partial(*args, **kwargs)
        # Arguments that land in ``**kwargs`` (ModernBERT passes its masks that way) are looked up there.
        var_keyword = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        self.extra = self.bound.arguments.setdefault(var_keyword[0], {}) if var_keyword else {}

    def get(self, name: str) -> Any:
        return self.bound.arguments[name] if name in self.bound.arguments else self.extra.get(name)

    def set(self, name: str, value: Any) -> None:
        if name in self.bound.arguments or name in self.bound.signature.parameters:
            self.bound.arguments[name] = value
        else:
            self.extra[name] = value

    def call(self) -> tuple[tuple, dict]:
        return self.bound.args, self.bound.kwargs


def _additive_visibility_mask(prefix: ActivePrefix, like: torch.Tensor, keys: int) -> torch.Tensor:
    """An all-visible additive (1, 1, 1, keys) mask widened by the prefix, for calls that had no mask but whose rows
    must not see every prefix column (mixed-adapter batches)."""
    real = torch.zeros(1, 1, 1, keys, dtype=like.dtype, device=like.device)
    return widen_mask(real, prefix.length, prefix.visible)


# ------------------------------------------------------------------------------------------------- projections
def _prepend_projected(output: torch.Tensor, which: int) -> torch.Tensor:
    prefix = _ACTIVE.get()
    if prefix is None:
        return output
    prefix.check_batch(output.shape[0])
    flat = _flat(prefix.key if which == 0 else prefix.value, output.dtype)
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


class _InstanceAttributeHandle:
    """Undo of an instance-level method override, with the same ``remove()`` as a hook handle."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name

    def remove(self) -> None:
        self.module.__dict__.pop(self.name, None)


def _override(module: nn.Module, name: str, replacement: Callable) -> _InstanceAttributeHandle:
    setattr(module, name, replacement)
    return _InstanceAttributeHandle(module, name)


def projection_names(module: nn.Module) -> tuple[str, str] | None:
    for key_name, value_name in PROJECTION_NAMES:
        if isinstance(getattr(module, key_name, None), nn.Linear) and isinstance(
            getattr(module, value_name, None), nn.Linear
        ):
            return key_name, value_name
    return None


class ProjectionInjection(Injection):
    """BERT-family self-attention on transformers 4.57 and DeBERTa-v2: prefix in front of the projected keys."""

    def install(self) -> None:
        module = self.module
        if getattr(module, "position_embedding_type", "absolute") != "absolute":
            raise NotImplementedError(
                f"{type(module).__name__} uses position_embedding_type={module.position_embedding_type!r}; "
                "P-Tuning v2 supports absolute positions on this transformers version (prefix keys have no relative "
                "position)."
            )
        if getattr(module, "is_decoder", False):
            raise NotImplementedError(
                f"{type(module).__name__} is configured as a decoder; on transformers 4.57 P-Tuning v2 supports "
                "BERT-family models as encoders only. Upgrade to transformers 5 for decoder use."
            )
        key_name, value_name = projection_names(module)
        self.handles += [
            getattr(module, key_name).register_forward_hook(lambda m, a, o: _prepend_projected(o, 0)),
            getattr(module, value_name).register_forward_hook(lambda m, a, o: _prepend_projected(o, 1)),
        ]
        if hasattr(module, "disentangled_attention_bias"):
            bias = _relative_bias_without_prefix(module.disentangled_attention_bias)
            self.handles.append(_override(module, "disentangled_attention_bias", bias))

    def before(self, prefix: ActivePrefix, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Widen ``attention_mask`` (positional slot 1 or keyword); a missing mask means "attend everywhere" and is
        materialised only when some rows must not see part of the prefix."""
        hidden = args[0] if args else kwargs["hidden_states"]
        prefix.check_batch(hidden.shape[0])
        in_kwargs = "attention_mask" in kwargs
        mask = kwargs["attention_mask"] if in_kwargs else (args[1] if len(args) > 1 else None)
        if mask is not None:
            mask = widen_mask(mask, prefix.length, prefix.visible)
        elif prefix.visible is not None:
            mask = _additive_visibility_mask(prefix, hidden, hidden.shape[1])
        else:
            return args, kwargs
        if in_kwargs or len(args) <= 1:
            return args, {**kwargs, "attention_mask": mask}
        return (args[0], mask, *args[2:]), kwargs


# ------------------------------------------------------------------------------------------------- DistilBERT
def _replace_leading(output: torch.Tensor, which: int) -> torch.Tensor:
    prefix = _ACTIVE.get()
    if prefix is None:
        return output
    flat = _flat(prefix.key if which == 0 else prefix.value, output.dtype)
    return torch.cat([flat.expand(output.shape[0], -1, -1), output[:, prefix.length :]], dim=1)


class PaddedInputInjection(Injection):
    """DistilBERT on transformers 4.57: ``forward(query, key, value, mask)`` reshapes its mask to the length of
    ``key``, so ``key`` and ``value`` get n leading rows and the projections' outputs for those rows become the
    prefix. The mask is widened in whichever form it comes: (batch, keys) for eager, 4-D additive or None for SDPA."""

    def install(self) -> None:
        _check_backend(self.module)
        self.handles += [
            self.module.k_lin.register_forward_hook(lambda m, a, o: _replace_leading(o, 0)),
            self.module.v_lin.register_forward_hook(lambda m, a, o: _replace_leading(o, 1)),
        ]

    def before(self, prefix: ActivePrefix, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = _Bound(self.module, args, kwargs)
        n, key = prefix.length, call.get("key")
        prefix.check_batch(key.shape[0])
        for name in ("key", "value"):
            call.set(name, nn.functional.pad(call.get(name), (0, 0, n, 0)))
        mask = call.get("mask")
        if mask is not None and mask.dim() == 2:
            visible = prefix.visible if prefix.visible is not None else mask.new_ones(1, n)
            mask = torch.cat([visible.to(mask.dtype).expand(mask.shape[0], n), mask], dim=1)
        elif mask is not None:
            mask = widen_mask(mask, n, prefix.visible)
        elif prefix.visible is not None:
            mask = _additive_visibility_mask(prefix, key, key.shape[1])
        call.set("mask", mask)
        return call.call()


# ------------------------------------------------------------------------------------------------- ModernBERT
def _fused_rows(output: torch.Tensor) -> torch.Tensor:
    prefix = _ACTIVE.get()
    if prefix is None:
        return output
    key, value = _flat(prefix.key, output.dtype), _flat(prefix.value, output.dtype)
    rows = torch.cat([torch.zeros_like(key), key, value], dim=-1).expand(output.shape[0], -1, -1)
    return torch.cat([rows, output], dim=1)


class FusedQKVInjection(Injection):
    """ModernBERT on transformers 4.57: one fused QKV projection, rotary applied inside its attention function.

    The n prefix rows sit at position 0 (rotary is the identity there), their queries are zero and their outputs
    are dropped; every real query sees them in global and sliding-window layers alike.
    """

    def install(self) -> None:
        _check_backend(self.module)
        self.handles.append(self.module.Wqkv.register_forward_hook(lambda m, a, o: _fused_rows(o)))

    def before(self, prefix: ActivePrefix, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = _Bound(self.module, args, kwargs)
        n, hidden = prefix.length, call.get("hidden_states")
        prefix.check_batch(hidden.shape[0])
        for name in ("attention_mask", "sliding_window_mask"):
            mask = call.get(name)
            if mask is None:
                mask = _additive_visibility_mask(prefix, hidden, hidden.shape[1])
            # Prefix columns for every query; n extra query rows (the prefix's own, discarded) that see everything.
            call.set(name, nn.functional.pad(widen_mask(mask, n, prefix.visible), (0, 0, n, 0)))
        positions = call.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        call.set("position_ids", nn.functional.pad(positions, (n, 0)))
        return call.call()

    def after(self, prefix: ActivePrefix, outputs: tuple) -> tuple:
        n = prefix.length
        rest = tuple(weights[:, :, n:] for weights in outputs[1:])
        return (outputs[0][:, n:], *rest)


# ---------------------------------------------------------------------------------------------------------- T5
class _PrefixedLayer:
    """One cache layer as the module reads it back: keys/values with the prefix in front."""

    def __init__(self, layer: Any, prefix: ActivePrefix) -> None:
        self._layer, self._prefix = layer, prefix

    @property
    def keys(self) -> torch.Tensor:
        return _prepend(self._prefix.key, self._layer.keys)

    @property
    def values(self) -> torch.Tensor:
        return _prepend(self._prefix.value, self._layer.values)


def _prepend(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return torch.cat([prefix.to(states.dtype).expand(states.shape[0], -1, -1, -1), states], dim=2)


class _PrefixingCache:
    """What a T5 attention module is handed as its cache: real keys/values go to the real cache (if any); what the
    module gets back has the prefix in front. The prefix itself is never stored."""

    def __init__(self, cache: Any, prefix: ActivePrefix) -> None:
        self._cache, self._prefix = cache, prefix

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self._cache is not None:
            key_states, value_states = self._cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        return _prepend(self._prefix.key, key_states), _prepend(self._prefix.value, value_states)

    @property
    def layers(self) -> list[_PrefixedLayer]:
        return [_PrefixedLayer(layer, self._prefix) for layer in self._cache.layers]


@functools.cache
def _prefixing_encoder_decoder_cache_class() -> type:
    class PrefixingEncoderDecoderCache(EncoderDecoderCache):
        """A view of an ``EncoderDecoderCache`` (T5 checks the type) whose two caches prefix what they return."""

        def __init__(self, cache: Any, prefix: ActivePrefix) -> None:  # a view: the real cache keeps all state
            self._cache, self._prefix = cache, prefix

        @property
        def self_attention_cache(self) -> _PrefixingCache:
            return _PrefixingCache(self._cache.self_attention_cache, self._prefix)

        @property
        def cross_attention_cache(self) -> _PrefixingCache:
            return _PrefixingCache(self._cache.cross_attention_cache, self._prefix)

        @property
        def is_updated(self) -> dict:
            return self._cache.is_updated

    return PrefixingEncoderDecoderCache


def _bias_without_prefix(original: Callable) -> Callable:
    """T5's relative-position bias among real tokens only; prefix keys (no position) get zero bias."""

    def compute_bias(query_length, key_length, device=None, cache_position=None):
        prefix = _ACTIVE.get()
        if prefix is None:
            return original(query_length, key_length, device=device, cache_position=cache_position)
        bias = original(query_length, key_length - prefix.length, device=device, cache_position=cache_position)
        return nn.functional.pad(bias, (prefix.length, 0))

    return compute_bias


class CacheInjection(Injection):
    """T5 on transformers 4.57 (self- and cross-attention): see ``_PrefixingCache`` and ``_bias_without_prefix``.

    The module returns the position bias it used (mask included) for the next layers to reuse; it leaves with the
    prefix columns cut off and comes in widened again, so layers with and without a prefix can follow each other.
    """

    def install(self) -> None:
        if getattr(self.module, "has_relative_attention_bias", False):
            self.handles.append(_override(self.module, "compute_bias", _bias_without_prefix(self.module.compute_bias)))

    def before(self, prefix: ActivePrefix, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = _Bound(self.module, args, kwargs)
        hidden, n = call.get("hidden_states"), prefix.length
        prefix.check_batch(hidden.shape[0])
        name = cache_parameter(inspect.signature(self.module.forward).parameters)
        cache = call.get(name)
        if isinstance(cache, EncoderDecoderCache):
            call.set(name, _prefixing_encoder_decoder_cache_class()(cache, prefix))
        else:
            call.set(name, _PrefixingCache(cache, prefix))
        mask = call.get("mask")
        if mask is not None:
            call.set("mask", widen_mask(mask, n, prefix.visible))
        elif prefix.visible is not None:
            source = call.get("key_value_states")
            keys = (source if source is not None else hidden).shape[1]
            call.set("mask", _additive_visibility_mask(prefix, hidden, keys))
        bias = call.get("position_bias")
        if bias is not None:
            call.set("position_bias", widen_mask(bias, n, prefix.visible))
        return call.call()

    def after(self, prefix: ActivePrefix, outputs: tuple) -> tuple:
        return (outputs[0], outputs[1][..., prefix.length :], *outputs[2:])


def inline_injection(module: nn.Module) -> type[Injection] | None:
    """The injection for a module that computes attention inline, or None if it is not one we know."""
    if projection_names(module) is not None:
        return ProjectionInjection
    parameters = inspect.signature(module.forward).parameters
    if isinstance(getattr(module, "k_lin", None), nn.Linear) and {"key", "value", "mask"} <= set(parameters):
        return PaddedInputInjection
    if isinstance(getattr(module, "Wqkv", None), nn.Linear) and hasattr(module, "rotary_emb"):
        return FusedQKVInjection
    if cache_parameter(parameters) and {"position_bias", "mask"} <= set(parameters) and isinstance(
        getattr(module, "k", None), nn.Linear
    ):
        return CacheInjection
    return None

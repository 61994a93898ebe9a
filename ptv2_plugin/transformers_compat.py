"""The one place that knows what transformers calls things that it renamed between the versions we support.

* The KV cache: transformers 5.24 renamed the forward argument and the output field ``past_key_values`` to
  ``cache``. The old name keeps working until 5.40, but warns: a ``FutureWarning`` when passed as an argument, a
  logged warning when read from an output.
* Checkpointing: transformers 5 calls gradient checkpointing "activation checkpointing" (``activation_checkpointing``
  in ``TrainingArguments`` and ``activation_checkpointing_enable`` on models); the old names warn.

Every place in this project that reads or passes these goes through the helpers below, so the same code runs on
transformers 4.57 and on every 5.x, and none of it triggers a deprecation warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

LEGACY_CACHE_NAME = "past_key_values"
# Read from the output classes rather than from a version number: whatever transformers declares is what it passes.
CACHE_NAME = "cache" if "cache" in {field.name for field in fields(CausalLMOutputWithPast)} else LEGACY_CACHE_NAME
# Both names a call may use, the current one first (callers of our own runtime may use either).
CACHE_NAMES = ("cache", LEGACY_CACHE_NAME)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``model(**inputs, **cache_kwargs(cache))``: the cache under the name the installed transformers expects."""
    return {CACHE_NAME: cache}


def cache_from_call(kwargs: Mapping[str, Any]) -> Any:
    """The cache a forward call was given, under either name (None when there is none)."""
    for name in CACHE_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def cached_length(kwargs: Mapping[str, Any]) -> int:
    """How many tokens the call's cache already holds (0 without a cache, or a legacy tuple cache)."""
    cache = cache_from_call(kwargs)
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


def cache_from_output(output: Any) -> Any:
    """The cache a model returned, read without the deprecated property."""
    return getattr(output, CACHE_NAME, None)


def checkpointing_arguments(enabled: bool = True, use_reentrant: bool | None = None) -> dict[str, Any]:
    """``TrainingArguments(**checkpointing_arguments(...))`` under the names the installed transformers uses."""
    from transformers import TrainingArguments  # heavy (pulls in accelerate): only when a Trainer is set up

    names = {field.name for field in fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    arguments: dict[str, Any] = {name: enabled}
    if use_reentrant is not None:
        arguments[f"{name}_kwargs"] = {"use_reentrant": use_reentrant}
    return arguments


def enable_checkpointing(model: Any, use_reentrant: bool | None = None) -> None:
    """Turn checkpointing on for a transformers model or a ``PeftModel`` through its current entry point."""
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(type(base), "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_enabled(model: Any) -> bool:
    """Whether a transformers model checkpoints activations, read without the deprecated property."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def cache_parameter(parameters: Mapping[str, Any]) -> str | None:
    """Which of the two names a function signature takes, or None if it takes neither."""
    return next((name for name in CACHE_NAMES if name in parameters), None)

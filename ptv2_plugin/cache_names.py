"""The one place that knows what transformers calls the KV cache.

transformers 5.24 renamed the forward argument and the output field ``past_key_values`` to ``cache``. The old name
keeps working until 5.40, but warns: a ``FutureWarning`` when passed as an argument, a logged warning when read from
an output. Every place in this project that reads or passes a cache goes through these helpers, so the same code runs
on transformers 4.57 and on every 5.x, and none of it triggers that warning.
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


def cache_parameter(parameters: Mapping[str, Any]) -> str | None:
    """Which of the two names a function signature takes, or None if it takes neither."""
    return next((name for name in CACHE_NAMES if name in parameters), None)

"""Eval fast path: every layer's prefix resolved once per forward, not once per layer.

While serving (eval, no gradient wanted for the prefix), each adapter's encoder already computes all of its layers'
keys and values in one MLP run and caches them (``PrefixEncoder._serving_prefixes``). Fetching them from every layer
still cost Python per layer on every forward: finding the encoder and slot, checking that the cache is fresh. Here
the tuner's pre-hook on the base model (the same hook that checks the inputs, so a forward pays for one hook) does
that check once per forward and publishes a ``{layer: prefix}`` table (``PLANNED_PREFIXES``) that the layers read
with one lookup; a post-hook that also runs on errors clears it. The
table itself is rebuilt only when something it depends on changes: the active adapters, the set of adapters, or an
encoder's cache (new weights, ``train()``, ``to()``, ``load_state_dict``) -- the encoders' own freshness check decides.

Everything the table does not cover takes the general per-layer path, unchanged: training, a prefix that needs
gradients, mixed-adapter batches, tracing, a layer whose ``prefix_source`` is set (exporters redirect where layers
take their prefix from; the table is built from ``own_prefix``, so it never holds a redirected prefix), adapters
turned off with ``disable_adapter()``, and any call of a layer outside its model's forward.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import PLANNED_PREFIXES, ROW_ADAPTERS, ActivePrefix
from .layer import PTuningV2Layer


@dataclass(frozen=True)
class _Plan:
    """A table and what it was built from (compared by identity: a fresh encoder cache is a new list)."""

    adapters: tuple[str, ...]
    active: tuple[str, ...]
    sources: tuple[list[ActivePrefix], ...]
    layers: dict[PTuningV2Layer, ActivePrefix | None]

    def matches(self, adapters: tuple[str, ...], active: tuple[str, ...], sources: tuple[list, ...]) -> bool:
        return (
            self.adapters == adapters
            and self.active == active
            and len(self.sources) == len(sources)
            and all(map(operator.is_, self.sources, sources))
        )


class ServingPlanner:
    """Owned by the tuner: builds (and keeps) the per-layer prefix table of the model's eval forwards."""

    def __init__(self, tuner: nn.Module) -> None:
        self.tuner = tuner
        self._plan: _Plan | None = None

    def table(self) -> dict[PTuningV2Layer, ActivePrefix | None] | None:
        """The ``{layer: prefix}`` table for a forward starting now, or None where the general path must run
        (the caller has already ruled out tracing)."""
        tuner = self.tuner
        if ROW_ADAPTERS.get() is not None:
            return None
        encoders = tuner.__dict__["_modules"].get("ptv2_prefix_encoder")
        active = tuple(tuner.active_adapters)
        if encoders is None or not active:
            return None
        chosen = []
        for name in active:  # a loop, not generators: this runs on every forward
            encoder = encoders._modules.get(name)
            if encoder is None or not encoder._uses_cache():
                return None
            chosen.append(encoder)
        sources = tuple([encoder._serving_prefixes() for encoder in chosen])
        adapters = tuple(tuner.peft_config)
        plan = self._plan
        if plan is None or not plan.matches(adapters, active, sources):
            layers = [m for m in tuner.model.modules() if isinstance(m, PTuningV2Layer)]
            plan = _Plan(adapters, active, sources, {layer: layer.own_prefix(list(active)) for layer in layers})
            self._plan = plan
        return plan.layers

    def publish(self, traced: bool) -> None:
        """Called by the tuner's pre-hook at the start of every forward of the base model."""
        PLANNED_PREFIXES.set(None if traced else self.table())

    def withdraw(self, module: nn.Module, args: Any, output: Any) -> None:
        """Post-hook (``always_call=True``): no table outlives its forward, also when the forward raises. A compiled
        forward publishes none (see ``PTuningV2Model._before_forward``)."""
        if not torch.compiler.is_dynamo_compiling():
            PLANNED_PREFIXES.set(None)

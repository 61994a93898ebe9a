"""The tuner layer: wraps one self-attention module and feeds it the active adapters' prefix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .attention import (
    PLANNED_PREFIXES,
    ROW_ADAPTERS,
    ActivePrefix,
    Injection,
    InterfaceInjection,
    RowBatches,
    uses_attention_interface,
)
from .inline_attention import inline_injection

BASE_ROW = "__base__"  # adapter name of mixed-batch rows that run the base model, as in PEFT's LoRA
_UNPLANNED = object()


class PTuningV2Layer(nn.Module, BaseTunerLayer):
    """Self-attention with prefix keys and values in front of the real ones.

    The layer owns no parameters: the prefix encoders live once per adapter on the tuner (``PTuningV2Model``) and
    this layer only knows which slot of each encoder is its own. They are held in a plain attribute so the module
    tree (and the state dict) lists them once.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("ptv2_slot",)
    # Where ``prefix`` takes keys/values from: None (default) reads the adapters' prefix encoders. A callable
    # ``(adapter_names) -> ActivePrefix | None`` replaces that source; exporters set it while tracing, so the prefix
    # arrives as graph inputs, and reset it to None afterwards. Everything else (injection, masks, caches) is unchanged.
    prefix_source: Callable[[list[str]], ActivePrefix | None] | None = None

    def __init__(self, base_layer: nn.Module, encoders: nn.ModuleDict) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ptv2_slot: dict[str, int] = {}
        self.__dict__["_encoders"] = encoders
        self._disable_adapters = False
        self.merged_adapters = []
        self.injection = injection_for(base_layer)

    def update_layer(self, adapter_name: str, slot: int) -> None:
        self.ptv2_slot[adapter_name] = slot

    def _encoder_slot(self, name: str):
        """The adapter's prefix encoder and this layer's slot in it, or None if the adapter does not prefix this
        layer (e.g. other layers_to_transform)."""
        if name not in self.ptv2_slot or name not in self.__dict__["_encoders"]:
            return None
        return self.__dict__["_encoders"][name], self.ptv2_slot[name]

    def _key_value(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        found = self._encoder_slot(name)
        return None if found is None else found[0].slot_key_value(found[1])

    def prefix(self, adapter_names: list[str]) -> ActivePrefix | None:
        """Keys/values of the given adapters, concatenated along the prefix axis, shaped (1, kv_heads, n, head_dim)."""
        if self.prefix_source is not None:
            return self.prefix_source(adapter_names)
        return self.own_prefix(adapter_names)

    def own_prefix(self, adapter_names: list[str]) -> ActivePrefix | None:
        """``prefix`` from the adapters' own encoders, whatever ``prefix_source`` says (the serving table's source)."""
        if len(adapter_names) == 1:  # the common case, served from the encoder's cache without a copy
            found = self._encoder_slot(adapter_names[0])
            return None if found is None else found[0].slot_prefix(found[1])
        parts = [kv for kv in map(self._key_value, adapter_names) if kv is not None]
        if not parts:
            return None
        key = torch.cat([k for k, _ in parts], dim=1)
        value = torch.cat([v for _, v in parts], dim=1)
        return ActivePrefix(key.unsqueeze(0), value.unsqueeze(0))

    def row_prefix(self, row_adapters: list[str]) -> ActivePrefix | None:
        """Mixed-adapter batch: row i gets the prefix of ``row_adapters[i]`` ("__base__": none).

        Prefixes are padded to the longest; the padding and base rows are hidden through ``visible``, so each row
        computes exactly what its adapter alone would, and backward reaches only the adapters named in the batch.
        """
        names = [name for name in dict.fromkeys(row_adapters) if name != BASE_ROW]
        parts = {name: kv for name in names if (kv := self._key_value(name)) is not None}
        if not parts:
            return None
        n = max(k.shape[1] for k, _ in parts.values())
        heads, head_dim = next(iter(parts.values()))[0].shape[::2]
        reference = next(iter(parts.values()))[0]
        empty = reference.new_zeros(heads, n, head_dim)
        keys, values, visible = [empty], [empty], [torch.zeros(n, dtype=torch.bool, device=reference.device)]
        table_index = {}
        for name, (key, value) in parts.items():
            pad = n - key.shape[1]
            keys.append(torch.nn.functional.pad(key, (0, 0, 0, pad)))
            values.append(torch.nn.functional.pad(value, (0, 0, 0, pad)))
            visible.append(torch.arange(n, device=reference.device) < key.shape[1])
            table_index[name] = len(keys) - 1
        rows = torch.tensor([table_index.get(name, 0) for name in row_adapters], device=reference.device)
        return ActivePrefix(torch.stack(keys)[rows], torch.stack(values)[rows], torch.stack(visible)[rows])

    def forward(self, *args: Any, **kwargs: Any):
        compiling = torch.compiler.is_dynamo_compiling()  # dynamo cannot trace ContextVars (RowBatches)
        planned = None if compiling else PLANNED_PREFIXES.get()
        if planned is not None and not self._disable_adapters and self.prefix_source is None:  # see serving_plan.py
            prefix = planned.get(self, _UNPLANNED)
            if prefix is not _UNPLANNED:
                return self.base_layer(*args, **kwargs) if prefix is None else self.injection(prefix, args, kwargs)
        if self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        row_adapters = None if compiling and not RowBatches.running else ROW_ADAPTERS.get()
        prefix = self.prefix(self.active_adapters) if row_adapters is None else self.row_prefix(row_adapters)
        if prefix is None:
            return self.base_layer(*args, **kwargs)
        return self.injection(prefix, args, kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "A P-Tuning v2 prefix cannot be merged into the model weights: it adds keys and values, not a weight "
            "delta. Export it with exporters.onnx.export(...) to serve it without PEFT."
        )

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.detach_from_base()
        return self.base_layer

    def detach_from_base(self) -> None:
        """Give the base module back exactly as it was: real config, no hooks."""
        self.injection.remove()

    def __repr__(self) -> str:
        return f"ptv2.{super().__repr__()}"


def injection_for(module: nn.Module) -> Injection:
    """How a prefix gets into ``module``: the attention interface where it uses it, else through what it exposes."""
    if uses_attention_interface(module):
        return InterfaceInjection(module)
    inline = inline_injection(module)
    if inline is not None:
        return inline(module)
    raise NotImplementedError(
        f"{type(module).__name__} is not a self-attention module P-Tuning v2 knows how to prefix: it neither uses "
        "transformers' attention interface nor exposes key/value projections we can reach. Check `target_modules`."
    )

"""What one adapter contributes to an exported graph, as named tensors: its prefix and its task head.

Shared by the graph export (which bakes them in, or makes them overridable inputs) and the prefix adapter writer
(which stores the same names in an ``.onnx_adapter`` file), so both always agree on names and shapes. The base
model's fingerprint ties an adapter file to the graph it was made for.
"""

from __future__ import annotations

import hashlib

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from . import layout as L


def frozen_prefix(peft_model, names: list[str], capacity: int | None = None) -> dict[str, torch.Tensor]:
    """Initializer name -> tensor; with several adapters each slot stacks them along a new first axis, shorter
    prefixes zero-padded to the longest (``prefix_visibility`` hides the padding), or to ``capacity`` tokens."""
    per_adapter = [peft_model.base_model.prefix_encoder(name).all_key_values() for name in names]
    slots = {len(kv) for kv in per_adapter}
    if len(slots) > 1:
        raise ValueError(f"Adapters {names} prefix different numbers of layers; one graph needs the same layers.")
    prefix = {}
    for slot in range(len(per_adapter[0])):
        for index, kind in enumerate(("key", "value")):
            tensors = [kv[slot][index].detach().to("cpu", torch.float32) for kv in per_adapter]
            longest = max([t.shape[1] for t in tensors] + [capacity or 0])  # (kv_heads, n, head_dim)
            tensors = [torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[1])) for t in tensors]
            tensor = tensors[0] if len(names) == 1 else torch.stack(tensors)
            prefix[L.PREFIX_INITIALIZER.format(slot=slot, kind=kind)] = tensor.contiguous()
    return prefix


def prefix_visibility(peft_model, names: list[str]) -> torch.Tensor | None:
    """(adapters, longest n) bool: which prefix columns are real for each adapter of a multi-adapter graph; None
    when all prefixes have the same length (then nothing is masked and fused attention stays possible)."""
    lengths = [peft_model.base_model.prefix_encoder(name).all_key_values()[0][0].shape[1] for name in names]
    if len(set(lengths)) <= 1:
        return None
    return torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]


def head_wrappers(model: nn.Module) -> dict[str, ModulesToSaveWrapper]:
    """Qualified name (in the transformers model) -> PEFT's wrapper of a task head (``modules_to_save``)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)}


def head_module(wrapper: ModulesToSaveWrapper, name: str) -> nn.Module:
    """The head an adapter runs: its own trained copy, else the frozen original (as PEFT does)."""
    return wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module


def head_tensors(peft_model, name: str) -> dict[str, torch.Tensor]:
    """``ptv2.head.{module}.{param}`` -> float32 tensor of the adapter's task heads (empty without heads)."""
    tensors = {}
    for module_name, wrapper in head_wrappers(peft_model.base_model.model).items():
        for param_name, param in head_module(wrapper, name).named_parameters():
            key = L.HEAD_INITIALIZER.format(module=module_name, param=param_name)
            tensors[key] = param.detach().to("cpu", torch.float32).contiguous()
    return tensors


def prefix_length(peft_model, name: str) -> int:
    return int(peft_model.base_model.prefix_encoder(name).all_key_values()[0][0].shape[1])


def swappable_extras(peft_model, name: str, capacity: int | None = None) -> dict[str, torch.Tensor]:
    """The swappable inputs besides the prefix: its real length (graphs with a ``capacity``), then the task heads."""
    if capacity is not None and capacity < prefix_length(peft_model, name):
        raise ValueError(f"Adapter {name!r} has {prefix_length(peft_model, name)} virtual tokens, more than the "
                         f"prefix_capacity {capacity}.")
    length = {L.PREFIX_LENGTH: torch.tensor([prefix_length(peft_model, name)])} if capacity else {}
    return {**length, **head_tensors(peft_model, name)}


def adapter_tensors(peft_model, name: str, capacity: int | None = None) -> dict[str, torch.Tensor]:
    """Everything that differs between two adapters on the same base: the prefix (padded to ``capacity``), its
    length (with a capacity), then the task heads."""
    extras = swappable_extras(peft_model, name, capacity)
    return {**frozen_prefix(peft_model, [name], capacity), **extras}


def base_fingerprint(peft_model) -> str:
    """SHA-256 over the frozen base weights (names, shapes, float32 bytes), without prefix encoders and task heads:
    the identity of the backbone every prefix adapter of a deployment has to share."""
    digest = hashlib.sha256()
    for name, param in peft_model.base_model.model.named_parameters():
        if ".modules_to_save." in name or ".original_module." in name or "ptv2_" in name:
            continue
        tensor = param.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()

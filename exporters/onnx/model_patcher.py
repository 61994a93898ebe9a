"""``ModelPatcher``: every export-time change to the model and to transformers, applied in one place while one graph
is traced and undone on exit (as Optimum's ``ModelPatcher`` does for its exporter).

Nothing in ``ptv2_plugin`` is overwritten. The prefix reaches attention exactly as at inference (ContextVar, config
view, projection hooks all run as plain Python under the tracer); only *where the prefix comes from* changes,
through the seam the plugin offers for it: each ``PTuningV2Layer.prefix_source`` is set to read keys/values from
tensors the traced module receives as extra graph inputs (a ``PrefixFeed``). Those inputs are turned into
initializers afterwards (``postprocess.py``), which keeps their names stable (constant folding cannot rename or fuse
an input) and keeps the MLP out of the graph. The other patches: eval mode and no grad, broadcast masks for
transformers 4.5x, per-row or fed task heads (PEFT's ``modules_to_save``), fused prefix attention for encoders and
split-softmax prefix attention for causal SDPA self-attention (decoders: no copy of the KV cache per layer and step).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers import masking_utils

from ptv2_plugin import PTuningV2Layer
from ptv2_plugin.attention import ActivePrefix

from . import layout as L
from .adapter_tensors import head_module, head_wrappers
from .fused_attention import FusedTrace, fused_prefix_attention
from .split_attention import split_prefix_attention


class ModelPatcher:
    """Context manager for tracing one graph of ``model``: yields itself, with ``feed`` (where the traced module puts
    its trailing inputs) and ``fused_trace`` (the fused-attention record, None when fusion is off).

    ``per_row_heads``: several adapters in one graph, each row runs its own task head. ``head_inputs``: the task
    head's parameters come from the feed (swappable graphs). ``visible``: (adapters, n) real prefix columns."""

    def __init__(self, model: nn.Module, adapters: Sequence[str], *, visible: torch.Tensor | None = None,
                 per_row_heads: bool = False, head_inputs: bool = False, fused: bool = False) -> None:
        self.model = model
        self.adapters = list(adapters)
        self.visible = visible
        self.per_row_heads = per_row_heads
        self.head_inputs = head_inputs
        self.fused = fused
        self.feed = PrefixFeed()
        self.fused_trace: FusedTrace | None = None
        self._stack: ExitStack | None = None

    def __enter__(self) -> ModelPatcher:
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(eval_mode(self.model))
            stack.enter_context(warnings.catch_warnings())
            # Shape-dependent Python branches the tracer warns about are covered by the parity check across shapes.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            stack.enter_context(traceable_masks())
            stack.enter_context(_prefix_from_feed(self.model, self.adapters, self.feed, self.visible))
            if self.per_row_heads:
                stack.enter_context(_heads_per_row(self.model, self.adapters, self.feed))
            if self.head_inputs:
                stack.enter_context(_heads_as_inputs(self.model, self.adapters[0], self.feed))
            stack.enter_context(split_prefix_attention())  # under the fused op: it takes what fusion skips
            self.fused_trace = stack.enter_context(fused_prefix_attention(bool(self.fused), self.model))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info) -> bool | None:
        stack, self._stack = self._stack, None
        return stack.__exit__(*exc_info)


class PrefixFeed:
    """Per-slot prefix tensors handed to the patched layers during one traced forward.

    Single adapter: ``keys[slot]`` is (kv_heads, n, head_dim). Several adapters: (adapters, kv_heads, n, head_dim),
    and ``adapter_ids`` (batch,) picks each row's adapter.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.adapter_ids: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None  # (adapters, n): real prefix columns, when lengths differ
        self.heads: dict[str, torch.Tensor] = {}  # prefix_as="adapter_inputs": head parameters, by graph input name
        self.length: torch.Tensor | None = None  # prefix_capacity graphs: (1,) number of real prefix tokens

    def take(self, rest: list[torch.Tensor], slots: Sequence[int], per_row: bool, extra_names: Sequence[str]) -> None:
        """Store a traced call's trailing inputs: (``per_row``) the adapter ids, then key and value of each slot,
        then the extras by name (prefix length, task head parameters)."""
        rest = list(rest)
        if per_row:
            self.adapter_ids = rest.pop(0)
        prefix, extra = rest[: 2 * len(slots)], rest[2 * len(slots) :]
        self.keys, self.values = dict(zip(slots, prefix[0::2])), dict(zip(slots, prefix[1::2]))
        extras = dict(zip(extra_names, extra))
        self.length = extras.pop(L.PREFIX_LENGTH, None)
        self.heads = extras

    def prefix(self, slot: int) -> ActivePrefix:
        key, value = self.keys[slot], self.values[slot]
        if self.adapter_ids is None:
            visible = None
            if self.length is not None:
                visible = (torch.arange(key.shape[-2], device=key.device) < self.length)[None]
            return ActivePrefix(key.unsqueeze(0), value.unsqueeze(0), visible)
        visible = self.visible.index_select(0, self.adapter_ids) if self.visible is not None else None
        return ActivePrefix(key.index_select(0, self.adapter_ids), value.index_select(0, self.adapter_ids), visible)


def prefixed_layers(model: nn.Module) -> list[PTuningV2Layer]:
    return [m for m in model.modules() if isinstance(m, PTuningV2Layer)]


@contextmanager
def _prefix_from_feed(model: nn.Module, adapters: Sequence[str], feed: PrefixFeed,
                      visible: torch.Tensor | None = None) -> Iterator[None]:
    """Make every prefixed layer take its keys/values from ``feed`` (its ``prefix_source``) instead of its prefix
    encoder. ``visible`` (adapters, n) masks the padding of shorter prefixes per row (a constant of the graph)."""
    feed.visible = visible.to(next(model.parameters()).device) if visible is not None else None
    layers = prefixed_layers(model)
    patched = []
    try:
        for layer in layers:
            slots = {layer.ptv2_slot.get(name) for name in adapters}
            if slots == {None}:
                continue
            if len(slots) != 1:
                raise ValueError(
                    f"Adapters {list(adapters)} prefix different layers; a multi-adapter export needs adapters "
                    "with the same target modules."
                )
            slot = slots.pop()
            layer.prefix_source = lambda _names, slot=slot: feed.prefix(slot)
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            layer.prefix_source = None


@contextmanager
def _heads_per_row(model: nn.Module, adapters: Sequence[str], feed: PrefixFeed) -> Iterator[None]:
    """Multi-adapter export: every task head (PEFT's modules_to_save) runs each adapter's copy and keeps, per row,
    the output of the row's adapter (``feed.adapter_ids``), so a row gets its own prefix *and* its own head."""
    wrappers = list(head_wrappers(model).values())

    def per_row(wrapper: nn.Module):
        def forward(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            heads = [head_module(wrapper, name) for name in adapters]
            stacked = torch.stack([head(hidden, *args, **kwargs) for head in heads], dim=1)  # (batch, adapters, ..)
            index = feed.adapter_ids.view(-1, *([1] * (stacked.dim() - 1))).expand(-1, 1, *stacked.shape[2:])
            return stacked.gather(1, index).squeeze(1)

        return forward

    try:
        for wrapper in wrappers:
            wrapper.forward = per_row(wrapper)
        yield
    finally:
        for wrapper in wrappers:
            wrapper.__dict__.pop("forward", None)


@contextmanager
def _heads_as_inputs(model: nn.Module, adapter: str, feed: PrefixFeed) -> Iterator[None]:
    """Swappable export: every task head runs the adapter's head with its parameters taken from ``feed.heads``
    (traced graph inputs ``ptv2.head.{module}.{param}``), so another adapter's head can be bound at run time."""
    wrappers = head_wrappers(model)

    def with_fed_parameters(module_name: str, head: nn.Module):
        # torch.func.functional_call refuses to run under the TorchScript tracer, so the parameters are swapped for
        # the fed tensors by hand for the duration of the call.
        owners = [(head.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], name)
                  for name, _ in head.named_parameters()]

        def forward(*args, **kwargs):
            saved = [(owner, attr, owner._parameters[attr]) for owner, attr, _ in owners]
            try:
                for owner, attr, name in owners:
                    owner._parameters[attr] = feed.heads[L.HEAD_INITIALIZER.format(module=module_name, param=name)]
                return head(*args, **kwargs)
            finally:
                for owner, attr, param in saved:
                    owner._parameters[attr] = param

        return forward

    try:
        for module_name, wrapper in wrappers.items():
            wrapper.forward = with_fed_parameters(module_name, head_module(wrapper, adapter))
        yield
    finally:
        for wrapper in wrappers.values():
            wrapper.__dict__.pop("forward", None)


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode during export; every module's own training flag is restored afterwards."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


# ------------------------------------------------------------------------------------ masks (transformers 4.5x)
def _broadcast_mask(
    batch_size: int,
    cache_position: torch.Tensor,
    kv_length: int,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """Boolean (batch, 1, q, kv) mask from an index-based mask function evaluated by broadcasting instead of vmap."""
    mu = masking_utils
    mask_function = mask_function or mu.causal_mask_function
    if attention_mask is not None:
        padding = attention_mask.bool()
        missing = kv_offset + kv_length - padding.shape[-1]
        if missing > 0:  # static caches are longer than the 2-D mask
            padding = torch.nn.functional.pad(padding, (0, missing))
        mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding))
    device = cache_position.device
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    q = cache_position[None, None, :, None]
    kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    mask = mask_function(b, h, q, kv)
    return mask.expand(batch_size, 1, cache_position.shape[0], kv_length)


def _broadcast_eager_mask(*args, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor:
    kwargs.pop("allow_is_causal_skip", None)
    mask = _broadcast_mask(*args, **kwargs)
    zero = torch.tensor(0.0, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


@contextmanager
def traceable_masks() -> Iterator[None]:
    """transformers 4.5x builds causal masks with ``torch.vmap``, which TorchScript cannot trace; transformers 5
    builds them by broadcasting already. On 4.5x, register broadcast versions for the duration of the export."""
    mu = masking_utils
    if not hasattr(mu, "sdpa_mask_recent_torch"):  # transformers 5: already traceable
        yield
        return
    registry = mu.ALL_MASK_ATTENTION_FUNCTIONS
    saved = {name: registry[name] for name in ("sdpa", "eager") if name in registry}
    registry.register("sdpa", _broadcast_mask)
    registry.register("eager", _broadcast_eager_mask)
    try:
        yield
    finally:
        for name, function in saved.items():
            registry.register(name, function)

"""Encoder-decoder (T5, BART) export: one graph per part, each holding the prefixes of the attention it contains.

The encoder graph holds the encoder self-attention prefixes; both decoder graphs hold the decoder self-attention
and cross-attention prefixes. Every prefix is prepended inside attention after the cache update, so neither cache
ever holds it: ``present.*.decoder.*`` has the real decoder tokens only, ``present.*.encoder.*`` the encoder's real
keys/values only, and the cross-attention prefix is added again at every step from the graph's initializers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ptv2_plugin.architectures import ENCODER_SELF_ATTENTION, attention_location
from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs

from . import layout as L
from .graph_export import DEFAULT_EXPORTER, export_graph
from .tracing import PrefixFeed, eval_mode, graph_arguments, prefix_from_feed, prefixed_layers, traceable_masks


def slot_locations(model: nn.Module, adapter: str) -> dict[int, str]:
    """Prefix slot -> where its attention sits (encoder self-, decoder self- or cross-attention)."""
    layers = set(map(id, prefixed_layers(model)))
    return {
        module.ptv2_slot[adapter]: attention_location(name)
        for name, module in model.named_modules()
        if id(module) in layers and adapter in module.ptv2_slot
    }


def part_slots(model: nn.Module, adapter: str, part: str) -> list[int]:
    """The slots whose prefix a graph part needs, in slot order."""
    locations = slot_locations(model, adapter)
    in_encoder = part == "encoder"
    return sorted(s for s, where in locations.items() if (where == ENCODER_SELF_ATTENTION) == in_encoder)


def encoder_decoder_cache(flat: list[torch.Tensor], config):
    """``EncoderDecoderCache`` from Optimum's per-layer order (decoder key, decoder value, encoder key, value)."""
    from transformers import DynamicCache, EncoderDecoderCache

    self_pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 4)]
    cross_pairs = [(flat[i + 2], flat[i + 3]) for i in range(0, len(flat), 4)]
    return EncoderDecoderCache(DynamicCache(self_pairs, config=config), DynamicCache(cross_pairs, config=config))


def flatten_encoder_decoder_cache(cache, with_cross: bool = True) -> list[torch.Tensor]:
    """Optimum's order: per layer decoder key, decoder value, then (``with_cross``) encoder key, encoder value."""
    from .export import flatten_cache

    own = flatten_cache(cache.self_attention_cache)
    cross = flatten_cache(cache.cross_attention_cache) if with_cross else []
    flat: list[torch.Tensor] = []
    for layer in range(len(own) // 2):
        flat.extend(own[2 * layer : 2 * layer + 2])
        flat.extend(cross[2 * layer : 2 * layer + 2])
    return flat


def model_dim(config) -> int:
    return int(getattr(config, "d_model", None) or config.hidden_size)


class _EncoderWrapper(nn.Module):
    def __init__(self, model: nn.Module, feed: PrefixFeed, multi: bool, slots: list[int]) -> None:
        super().__init__()
        self.encoder, self.feed, self.multi, self.slots = model.get_encoder(), feed, multi, slots

    def forward(self, input_ids, attention_mask, *rest):
        _take_prefix(self.feed, self.multi, self.slots, list(rest))
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class _DecoderWrapper(nn.Module):
    """Decoder + LM head through the full model with given encoder outputs, so T5's head scaling etc. apply."""

    def __init__(self, model: nn.Module, graph: L.GraphLayout, feed: PrefixFeed, multi: bool, slots: list[int]):
        super().__init__()
        self.model, self.graph, self.feed, self.multi, self.slots = model, graph, feed, multi, slots

    def forward(self, *args):
        from transformers.modeling_outputs import BaseModelOutput

        graph = self.graph
        inputs = dict(zip(graph.inputs, args))
        _take_prefix(self.feed, self.multi, self.slots, list(args[len(graph.inputs) :]))
        cache = None
        hidden = inputs.get("encoder_hidden_states")
        if graph.with_past:
            cache = encoder_decoder_cache([inputs[name] for name in graph.past_names], self.model.config)
            # Cross-attention reads its keys/values from the cache; the hidden states are only a shape carrier.
            cross_key = inputs[graph.past_names[2]]
            hidden = cross_key.new_zeros(cross_key.shape[0], cross_key.shape[2], model_dim(self.model.config))
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=inputs["encoder_attention_mask"],
            decoder_input_ids=inputs["input_ids"], **cache_kwargs(cache), use_cache=True, return_dict=True,
        )
        return (out.logits, *flatten_encoder_decoder_cache(cache_from_output(out), with_cross=not graph.with_past))


def _take_prefix(feed: PrefixFeed, multi: bool, slots: list[int], rest: list[torch.Tensor]) -> None:
    if multi:
        feed.adapter_ids = rest.pop(0)
    feed.keys = dict(zip(slots, rest[0::2]))
    feed.values = dict(zip(slots, rest[1::2]))


def cache_geometry(model: nn.Module, device: torch.device) -> tuple[int, int]:
    """(heads, head_dim) of the decoder caches, read from one real step so each architecture's own rules apply."""
    with torch.no_grad():
        ids = torch.full((1, 2), 3, device=device)
        out = model(input_ids=ids, decoder_input_ids=ids[:, :1], use_cache=True, return_dict=True)
    first = flatten_encoder_decoder_cache(cache_from_output(out))[0]
    return int(first.shape[1]), int(first.shape[3])


def sample_inputs(config, graph: L.GraphLayout, *, batch: int = 2, length: int = 3, encoder_length: int = 5,
                  past: int = 3, kv_shape: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> dict:
    """Inputs in a part's layout; the last encoder row is right-padded so no "no padding" shortcut gets traced."""
    vocab = int(config.vocab_size)
    low = min(3, vocab - 1)
    mask = torch.ones(batch, encoder_length, dtype=torch.long)
    if batch > 1 and encoder_length > 1:
        mask[-1, -2:] = 0
    if graph.part == "encoder":
        inputs = {"input_ids": torch.randint(low, vocab, (batch, encoder_length), generator=generator),
                  "attention_mask": mask}
    else:
        inputs = {"input_ids": torch.randint(low, vocab, (batch, length), generator=generator),
                  "encoder_attention_mask": mask}
        if "encoder_hidden_states" in graph.inputs:
            inputs["encoder_hidden_states"] = torch.randn(batch, encoder_length, model_dim(config),
                                                          generator=generator).to(dtype)
        heads, head_dim = kv_shape or (1, 1)
        for name in graph.past_names:
            steps = past if ".decoder." in name else encoder_length
            inputs[name] = torch.randn(batch, heads, steps, head_dim, generator=generator).to(dtype)
    return {k: v.to(device) for k, v in inputs.items()}


def trace_part(inner: nn.Module, graph: L.GraphLayout, prefix: dict[str, torch.Tensor], slots: list[int],
               names: list[str], multi: bool, path: Path, opset: int, device: torch.device,
               visible: torch.Tensor | None = None, exporter: str = DEFAULT_EXPORTER) -> None:
    """Trace one part; its prefix slots arrive as trailing inputs (turned into initializers by the caller)."""
    dtype = next(inner.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    kv_shape = cache_geometry(inner, device) if graph.with_past else None
    example = sample_inputs(inner.config, graph, kv_shape=kv_shape, dtype=dtype, device=device, generator=generator)
    own = {}  # this part's prefix slots, in slot order
    for slot in slots:
        for kind in ("key", "value"):
            name = L.PREFIX_INITIALIZER.format(slot=slot, kind=kind)
            own[name] = prefix[name]
    adapters = len(names) if multi and slots else 0
    args, input_names, dynamic_axes = graph_arguments(example, graph, own, adapters, device)
    with prefix_from_feed(inner, names, visible) as feed, traceable_masks(), eval_mode(inner), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if graph.part == "encoder":
            wrapper = _EncoderWrapper(inner, feed, multi and bool(slots), slots)
        else:
            wrapper = _DecoderWrapper(inner, graph, feed, multi and bool(slots), slots)
        export_graph(wrapper.eval(), args, path, input_names=input_names, output_names=graph.outputs,
                     dynamic_axes=dynamic_axes, opset=opset, exporter=exporter)

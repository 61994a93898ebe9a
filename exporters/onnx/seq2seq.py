"""Encoder-decoder (T5, BART) parts: which prefix slots each part holds, and how each part calls the model.

The encoder graph holds the encoder self-attention prefixes; both decoder graphs hold the decoder self-attention
and cross-attention prefixes. Every prefix is prepended inside attention after the cache update, so neither cache
ever holds it: ``present.*.decoder.*`` has the real decoder tokens only, ``present.*.encoder.*`` the encoder's real
keys/values only, and the cross-attention prefix is added again at every step from the graph's initializers.
Parts are traced by the same corridor as single graphs (``trace.py``); only their model call differs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from ptv2_plugin import PTuningV2Layer
from ptv2_plugin.architectures import ENCODER_SELF_ATTENTION, attention_location
from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs

from . import layout as L
from .caches import encoder_decoder_cache, flatten_cache
from .sample_inputs import model_dim


def slot_locations(model: nn.Module, adapter: str) -> dict[int, str]:
    """Prefix slot -> where its attention sits (encoder self-, decoder self- or cross-attention)."""
    return {
        module.ptv2_slot[adapter]: attention_location(name)
        for name, module in model.named_modules()
        if isinstance(module, PTuningV2Layer) and adapter in module.ptv2_slot
    }


def part_slots(model: nn.Module, adapter: str, part: str) -> list[int]:
    """The slots whose prefix a graph part needs, in slot order."""
    locations = slot_locations(model, adapter)
    in_encoder = part == "encoder"
    return sorted(s for s, where in locations.items() if (where == ENCODER_SELF_ATTENTION) == in_encoder)


def call_part(model: nn.Module, graph: L.GraphLayout, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One traced call of an encoder-decoder part: its graph inputs by name -> its outputs in layout order."""
    if graph.part == "encoder":
        encoder = model.get_encoder()
        out = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], return_dict=True)
        return (out.last_hidden_state,)
    # Decoder + LM head through the full model with given encoder outputs, so T5's head scaling etc. apply.
    cache = None
    hidden = inputs.get("encoder_hidden_states")
    if graph.with_past:
        cache = encoder_decoder_cache([inputs[name] for name in graph.past_names], model.config)
        # Cross-attention reads its keys/values from the cache; the hidden states are only a shape carrier.
        cross_key = inputs[graph.past_names[2]]
        hidden = cross_key.new_zeros(cross_key.shape[0], cross_key.shape[2], model_dim(model.config))
    out = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=inputs["encoder_attention_mask"],
        decoder_input_ids=inputs["input_ids"], **cache_kwargs(cache), use_cache=True, return_dict=True,
    )
    return (out.logits, *flatten_cache(cache_from_output(out), with_cross=not graph.with_past))

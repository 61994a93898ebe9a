"""KV caches as flat tensor lists in Optimum's graph order, and back: the one place that knows transformers' cache
classes and the legacy tuple format.

Shared by the tracer (graph inputs and outputs), the parity check and serving (flat feeds of ``past_key_values.*``).
Order: decoder-only graphs take per layer key, value; encoder-decoder graphs per layer decoder key, decoder value,
encoder key, encoder value. Nothing here depends on torch tracing or on ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import DynamicCache, EncoderDecoderCache

DECODER_PER_LAYER = 2  # key, value
SEQ2SEQ_PER_LAYER = 4  # decoder key, decoder value, encoder key, encoder value


def flatten_cache(cache: Any, *, with_cross: bool = True, per_layer: int | None = None) -> list:
    """Flat tensors of a transformers cache (``DynamicCache``, ``EncoderDecoderCache``) or of legacy per-layer
    tuples, in graph order. ``with_cross=False`` leaves out an encoder-decoder cache's cross-attention part;
    ``per_layer`` keeps only the first that many tensors of each legacy tuple. ``None`` gives an empty list."""
    if cache is None:
        return []
    if hasattr(cache, "self_attention_cache"):  # EncoderDecoderCache
        own = flatten_cache(cache.self_attention_cache)
        cross = flatten_cache(cache.cross_attention_cache) if with_cross else []
        flat: list = []
        for layer in range(len(own) // 2):
            flat.extend(own[2 * layer : 2 * layer + 2])
            flat.extend(cross[2 * layer : 2 * layer + 2])
        return flat
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "key_cache"):
        return [t for pair in zip(cache.key_cache, cache.value_cache) for t in pair]
    flat = []
    for item in cache:
        if isinstance(item, (tuple, list)):
            flat.extend(item[:per_layer])
        else:
            flat.append(item)
    return flat


def group_layers(flat: Sequence, per_layer: int) -> tuple[tuple, ...]:
    """Legacy per-layer tuples from a flat list (``per_layer`` 2 for decoders, 4 for encoder-decoders)."""
    return tuple(tuple(flat[i : i + per_layer]) for i in range(0, len(flat), per_layer))


def past_length(flat: Sequence) -> int:
    """Tokens held by a flat cache (its first tensor's axis 2); ``OrtValue``s expose ``shape()`` as a method."""
    if not flat:
        return 0
    shape = flat[0].shape() if callable(getattr(flat[0], "shape", None)) else flat[0].shape
    return int(shape[2])


def dynamic_cache(flat: Sequence, config) -> DynamicCache:
    """A decoder's ``DynamicCache`` from per layer key, value."""
    return DynamicCache(list(group_layers(flat, DECODER_PER_LAYER)), config=config)


def encoder_decoder_cache(flat: Sequence, config) -> EncoderDecoderCache:
    """``EncoderDecoderCache`` from Optimum's per-layer order (decoder key, decoder value, encoder key, value)."""
    layers = group_layers(flat, SEQ2SEQ_PER_LAYER)
    return EncoderDecoderCache(DynamicCache([layer[:2] for layer in layers], config=config),
                               DynamicCache([layer[2:] for layer in layers], config=config))

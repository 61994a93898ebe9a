"""Sample inputs in a graph's layout, for tracing and for the parity check: the one place that makes them.

Every batch has a padded last row (right-padded for encoders, left-padded for decoders), so no "no padding"
shortcut of the model gets recorded by the tracer and the parity check covers padding.
"""

from __future__ import annotations

import torch

from . import layout as L


def sample_inputs(config, graph: L.GraphLayout, *, batch: int = 2, length: int = 5, decoder_length: int = 3,
                  past: int = 3, kv_shape: tuple[int, int] | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Inputs for ``graph``. ``length`` is the input sequence (the encoder's, for encoder-decoder parts; their
    decoder parts take ``decoder_length`` tokens); ``past`` the cached tokens of graphs with a past, whose cache
    tensors are (batch, ``kv_shape`` heads, steps, ``kv_shape`` head size)."""
    vocab = int(config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size)
    if graph.part:
        inputs = _seq2seq_inputs(config, graph, vocab, batch, length, decoder_length, past, kv_shape, dtype,
                                 generator)
    else:
        inputs = _single_inputs(graph, vocab, batch, length, past, kv_shape, dtype, generator)
    return {k: v.to(device) for k, v in inputs.items()}


def _token_ids(vocab: int, shape: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(min(3, vocab - 1), vocab, shape, generator=generator)  # no special tokens 0-2


def _single_inputs(graph, vocab, batch, length, past, kv_shape, dtype, generator) -> dict[str, torch.Tensor]:
    ids = _token_ids(vocab, (batch, length), generator)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    total = past + length if graph.with_past else length
    mask = torch.ones(batch, total, dtype=torch.long)
    if batch > 1 and length > 1:
        if graph.task == "CAUSAL_LM":
            mask[-1, :1] = 0
        else:
            mask[-1, -1:] = 0
    inputs["attention_mask"] = mask
    if "token_type_ids" in graph.inputs:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    if "position_ids" in graph.inputs:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs["position_ids"] = positions[:, -length:]
    if graph.with_past:
        heads, head_dim = kv_shape
        for name in graph.past_names:
            inputs[name] = torch.randn(batch, heads, past, head_dim, generator=generator).to(dtype)
    return inputs


def _seq2seq_inputs(config, graph, vocab, batch, encoder_length, length, past, kv_shape, dtype,
                    generator) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, encoder_length, dtype=torch.long)
    if batch > 1 and encoder_length > 1:
        mask[-1, -2:] = 0
    if graph.part == "encoder":
        return {"input_ids": _token_ids(vocab, (batch, encoder_length), generator), "attention_mask": mask}
    inputs = {"input_ids": _token_ids(vocab, (batch, length), generator), "encoder_attention_mask": mask}
    if "encoder_hidden_states" in graph.inputs:
        inputs["encoder_hidden_states"] = torch.randn(batch, encoder_length, model_dim(config),
                                                      generator=generator).to(dtype)
    heads, head_dim = kv_shape or (1, 1)
    for name in graph.past_names:
        steps = past if ".decoder." in name else encoder_length
        inputs[name] = torch.randn(batch, heads, steps, head_dim, generator=generator).to(dtype)
    return inputs


def model_dim(config) -> int:
    """Hidden size of an encoder-decoder model (T5 calls it ``d_model``)."""
    return int(getattr(config, "d_model", None) or config.hidden_size)

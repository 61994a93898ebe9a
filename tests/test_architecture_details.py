"""Architecture-specific semantics: DeBERTa's relative terms, ModernBERT's local attention, GQA, T5 positions."""

from __future__ import annotations

import torch
from peft import get_peft_model

from ptv2_plugin import PTuningV2Config
from ptv2_plugin.attention import ActivePrefix, active_prefix
from tests.tiny_models import sample_inputs, tiny_model


def test_deberta_prefix_keys_take_part_through_content_only():
    """Prefix keys have no position: the content-to-position and position-to-content terms are zero for them."""
    model = get_peft_model(tiny_model("deberta-v2"), PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3))
    attention = model.base_model.model.deberta.encoder.layer[0].attention.self.base_layer
    relative_embeddings = model.base_model.model.deberta.encoder.get_rel_embedding()
    query = torch.randn(2 * 4, 5, 8)
    keys = torch.randn(2 * 4, 3 + 5, 8)
    relative_pos = model.base_model.model.deberta.encoder.get_rel_pos(torch.zeros(2, 5, 32))
    prefix = ActivePrefix(torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8))
    with torch.no_grad(), active_prefix(prefix):
        bias = attention.disentangled_attention_bias(query, keys, relative_pos, relative_embeddings, 3)
    plain = type(attention).disentangled_attention_bias(
        attention, query, keys[:, 3:], relative_pos, relative_embeddings, 3
    )
    assert bias.shape == (8, 5, 8)
    assert torch.equal(bias[..., :3], torch.zeros_like(bias[..., :3]))
    torch.testing.assert_close(bias[..., 3:], plain)


def test_modernbert_prefix_is_visible_in_global_and_local_layers():
    base = tiny_model("modernbert", attn_implementation="eager")  # layer 0 global, layer 1 sliding window
    model = get_peft_model(base, PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3, prefix_init_std=1.0))
    inputs = sample_inputs("modernbert", batch=1, length=12)  # longer than the local window of 4
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    for layer, weights in enumerate(attentions):  # (batch, heads, queries, 3 + 12)
        assert weights.shape[-1] == 3 + 12
        assert (weights[..., :3].sum(-1) > 0).all(), f"a query of layer {layer} does not see the prefix"
    local = attentions[1][..., 3:]
    assert (local[0, 0, 0, 8:] == 0).all(), "the local layer must still hide far-away real tokens"

"""Tiny models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

VOCAB = 128
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
ENCODERS = ["bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "distilbert", "modernbert"]
DECODERS = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]
SEQ2SEQ = ["t5", "bart"]
ARCHITECTURES = ENCODERS + DECODERS  # encoder-only and decoder-only; SEQ2SEQ are tested separately

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# Encoders' heads start at initializer_range 0.02 and emit logits of order 0.01, on which a prefix moves the output by
# ~1e-4: below any sensible parity tolerance, so a graph that lost its prefix would pass. At 0.2 logits are of order
# 1 and the prefix moves them by ~0.1 (decoders and seq2seq models already are at that scale).
_ENCODER_INIT = dict(initializer_range=0.2)
_GQA = dict(num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIG_KWARGS: dict[str, dict] = {
    "bert": dict(_COMMON, **_ENCODER_INIT, max_position_embeddings=64),
    "roberta": dict(_COMMON, **_ENCODER_INIT, max_position_embeddings=70, pad_token_id=1),
    "xlm-roberta": dict(_COMMON, **_ENCODER_INIT, max_position_embeddings=70, pad_token_id=1),
    "electra": dict(_COMMON, **_ENCODER_INIT, embedding_size=16, max_position_embeddings=64),
    "deberta-v2": dict(
        _COMMON,
        **_ENCODER_INIT,
        max_position_embeddings=64,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=16,
        max_relative_positions=32,
        position_biased_input=False,
        pad_token_id=0,
    ),
    "distilbert": dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                       **_ENCODER_INIT),
    "modernbert": dict(
        _COMMON,
        **_ENCODER_INIT,
        max_position_embeddings=64,
        global_attn_every_n_layers=2,
        local_attention=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    ),
    "t5": dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    ),
    "bart": dict(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    ),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0),
    "llama": dict(_COMMON, **_GQA),
    "mistral": dict(_COMMON, **_GQA, sliding_window=None),
    "qwen2": dict(_COMMON, **_GQA),
    "qwen3": dict(_COMMON, **_GQA, head_dim=8),
    "gemma": dict(_COMMON, **_GQA, head_dim=8),
    "phi3": dict(_COMMON, **_GQA),
}


def tiny_config(arch: str, **overrides):
    kwargs = dict(CONFIG_KWARGS[arch])
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, task: str = "auto", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised model in eval mode; ``task`` picks the head (auto: SEQ_CLS / CAUSAL_LM by family)."""
    if task == "auto":
        task = default_task(arch)
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    if task == "SEQ_CLS":
        config.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(config)
    elif task == "SEQ_2_SEQ_LM":
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_config(config)
    elif task == "CAUSAL_LM":
        model = AutoModelForCausalLM.from_config(config)
    elif task == "FEATURE_EXTRACTION":
        model = AutoModel.from_config(config)
    else:
        from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

        if task == "TOKEN_CLS":
            config.num_labels = 3
            model = AutoModelForTokenClassification.from_config(config)
        elif task == "QUESTION_ANS":
            model = AutoModelForQuestionAnswering.from_config(config)
        else:
            raise ValueError(task)
    return model.eval()


def default_task(arch: str) -> str:
    if arch in SEQ2SEQ:
        return "SEQ_2_SEQ_LM"
    return "SEQ_CLS" if arch in ENCODERS else "CAUSAL_LM"


def sample_inputs(arch: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if arch in SEQ2SEQ:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=generator)
    return inputs


def main_output(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits

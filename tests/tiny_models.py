"""Tiny models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

VOCAB = 128
ENCODERS = ["bert", "roberta", "xlm-roberta", "electra"]
DECODERS = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]
ARCHITECTURES = ENCODERS + DECODERS

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_GQA = dict(num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIG_KWARGS: dict[str, dict] = {
    "bert": dict(_COMMON, max_position_embeddings=64),
    "roberta": dict(_COMMON, max_position_embeddings=70, pad_token_id=1),
    "xlm-roberta": dict(_COMMON, max_position_embeddings=70, pad_token_id=1),
    "electra": dict(_COMMON, embedding_size=16, max_position_embeddings=64),
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
        task = "SEQ_CLS" if arch in ENCODERS else "CAUSAL_LM"
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    if task == "SEQ_CLS":
        config.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(config)
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
    return "SEQ_CLS" if arch in ENCODERS else "CAUSAL_LM"


def sample_inputs(arch: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def main_output(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits

"""Which modules are self-attention (and cross-attention), and the shape of their keys, per architecture."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# model_type -> suffixes of the attention modules that get a prefix.
TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["attention.self"],
    "roberta": ["attention.self"],
    "xlm-roberta": ["attention.self"],
    "electra": ["attention.self"],
    "deberta-v2": ["attention.self"],
    "distilbert": ["attention"],
    "modernbert": ["attn"],
    "gpt2": ["attn"],
    "llama": ["self_attn"],
    "mistral": ["self_attn"],
    "qwen2": ["self_attn"],
    "qwen3": ["self_attn"],
    "gemma": ["self_attn"],
    "phi3": ["self_attn"],
    "t5": ["SelfAttention", "EncDecAttention"],
    "bart": ["self_attn", "encoder_attn"],
}

# The three places a prefix can go in an encoder-decoder model (Prefix-Tuning, Li & Liang 2021, section 4.2).
ENCODER_SELF_ATTENTION = "encoder_self_attention"
DECODER_SELF_ATTENTION = "decoder_self_attention"
CROSS_ATTENTION = "cross_attention"
_CROSS_ATTENTION_NAMES = ("EncDecAttention", "encoder_attn", "crossattention")


def attention_location(module_name: str) -> str:
    """Where an attention module sits; decoder-only models count as decoder self-attention."""
    parts = module_name.split(".")
    if any(part in _CROSS_ATTENTION_NAMES for part in parts):
        return CROSS_ATTENTION
    if "decoder" in parts:
        return DECODER_SELF_ATTENTION
    return ENCODER_SELF_ATTENTION


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one attention layer's keys: the prefix must match it exactly (one prefix per KV head under GQA)."""

    num_kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Numbers per virtual token for keys and values together."""
        return 2 * self.num_kv_heads * self.head_dim


def default_target_modules(model_type: str | None) -> list[str]:
    if model_type in TARGET_MODULES:
        return list(TARGET_MODULES[model_type])
    supported = ", ".join(sorted(TARGET_MODULES))
    raise ValueError(
        f"P-Tuning v2 has no default target modules for architecture {model_type!r} (supported: {supported}). "
        "Pass the names of its self-attention modules, e.g. PTuningV2Config(target_modules=['self_attn'])."
    )


def _first_int(obj, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def kv_geometry(module: nn.Module, model_config) -> KVGeometry:
    """Key/value shape of one attention module: its own attributes first (they differ between encoder and decoder
    of some encoder-decoder models), then the model config."""
    head_dim = _first_int(module, ("head_dim", "attention_head_size", "key_value_proj_dim")) or _first_int(
        model_config, ("head_dim", "d_kv")
    )
    kv_heads = _first_int(model_config, ("num_key_value_heads",)) or _first_int(
        module, ("num_key_value_heads", "num_heads", "n_heads", "num_attention_heads")
    )
    heads = _first_int(model_config, ("num_attention_heads",))
    hidden = _first_int(model_config, ("hidden_size",))
    kv_heads = kv_heads or heads
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    if not kv_heads or not head_dim:
        raise ValueError(
            f"Cannot tell the number of key/value heads and the head size of {type(module).__name__}; "
            "P-Tuning v2 needs them to size the prefix."
        )
    return KVGeometry(num_kv_heads=kv_heads, head_dim=head_dim)

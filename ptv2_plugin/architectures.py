"""Which modules are self-attention, and the shape of their keys, per architecture."""

from __future__ import annotations

from dataclasses import dataclass

# model_type -> suffixes of the self-attention modules that get a prefix. Cross-attention is deliberately absent.
TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["attention.self"],
    "roberta": ["attention.self"],
    "xlm-roberta": ["attention.self"],
    "electra": ["attention.self"],
    "gpt2": ["attn"],
    "llama": ["self_attn"],
    "mistral": ["self_attn"],
    "qwen2": ["self_attn"],
    "qwen3": ["self_attn"],
    "gemma": ["self_attn"],
    "phi3": ["self_attn"],
}


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


def kv_geometry(model_config) -> KVGeometry:
    """Key/value shape from the model config; every supported family names these fields the same way."""
    heads = getattr(model_config, "num_attention_heads", None)
    hidden = getattr(model_config, "hidden_size", None)
    if not heads or not hidden:
        raise ValueError(
            f"Cannot read num_attention_heads/hidden_size from the {type(model_config).__name__}; "
            "P-Tuning v2 needs them to size the prefix."
        )
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    return KVGeometry(num_kv_heads=int(kv_heads), head_dim=int(head_dim))

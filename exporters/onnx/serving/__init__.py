"""Serving exported folders with ONNX Runtime: sessions, IOBinding, the ``ORTModelFor*`` task classes, generation
and per-call prefix adapters.

This package knows ONNX Runtime, the graph layout (``exporters.onnx.layout``) and the shared cache helpers; it never
imports the tracer (``export``, ``trace``, ``model_patcher``, ``seq2seq``, ``fused_attention``, ...), so a server
loads graphs and adapter files without torch.onnx or the export code in its process.

For transformers 5 users Optimum has no runtime; on 4.57 these folders also load in Optimum's ``ORTModelFor*``
(encoder-decoder folders in its ``ORTModelForSeq2SeqLM``, non-merged layout).
"""

from .auto import TASK_TO_CLASS, load
from .causal_lm import ORTModelForCausalLM
from .encoders import (
    ORTModelForFeatureExtraction,
    ORTModelForQuestionAnswering,
    ORTModelForSequenceClassification,
    ORTModelForTokenClassification,
)
from .generation import DecodingSettings, decode
from .prefix_adapters import PrefixAdapter, PrefixAdapterMismatch, read_prefix_adapter
from .seq2seq import ORTModelForSeq2SeqLM
from .session import ORTModel, create_session, swappable_session_options

__all__ = [
    "TASK_TO_CLASS",
    "DecodingSettings",
    "ORTModel",
    "ORTModelForCausalLM",
    "ORTModelForFeatureExtraction",
    "ORTModelForQuestionAnswering",
    "ORTModelForSeq2SeqLM",
    "ORTModelForSequenceClassification",
    "ORTModelForTokenClassification",
    "PrefixAdapter",
    "PrefixAdapterMismatch",
    "create_session",
    "decode",
    "load",
    "read_prefix_adapter",
    "swappable_session_options",
]

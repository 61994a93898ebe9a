"""ONNX export of P-Tuning v2 models (prefix frozen into the graph, or swappable per call as ONNX Runtime adapter
files) and ONNX Runtime models to serve them."""

from .adapter_export import export_prefix_adapter
from .export import ExportValidationError, export
from .layout import (
    DECODER_FILE_NAME,
    DECODER_WITH_PAST_FILE_NAME,
    ENCODER_FILE_NAME,
    METADATA_FILE_NAME,
    ONNX_FILE_NAME,
    PREFIX_INITIALIZER,
)
from .prefix_adapters import PrefixAdapterMismatch
from .runtime import (
    ORTModel,
    ORTModelForCausalLM,
    ORTModelForFeatureExtraction,
    ORTModelForQuestionAnswering,
    ORTModelForSeq2SeqLM,
    ORTModelForSequenceClassification,
    ORTModelForTokenClassification,
    create_session,
    load,
)

__all__ = [
    "DECODER_FILE_NAME",
    "DECODER_WITH_PAST_FILE_NAME",
    "ENCODER_FILE_NAME",
    "METADATA_FILE_NAME",
    "ONNX_FILE_NAME",
    "PREFIX_INITIALIZER",
    "PrefixAdapterMismatch",
    "ExportValidationError",
    "ORTModel",
    "ORTModelForCausalLM",
    "ORTModelForFeatureExtraction",
    "ORTModelForQuestionAnswering",
    "ORTModelForSeq2SeqLM",
    "ORTModelForSequenceClassification",
    "ORTModelForTokenClassification",
    "create_session",
    "export",
    "export_prefix_adapter",
    "load",
]

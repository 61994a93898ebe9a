"""ONNX export of P-Tuning v2 models (prefix frozen into the graph) and ONNX Runtime models to serve them."""

from .export import ExportValidationError, export
from .layout import (
    DECODER_FILE_NAME,
    DECODER_WITH_PAST_FILE_NAME,
    ENCODER_FILE_NAME,
    METADATA_FILE_NAME,
    ONNX_FILE_NAME,
    PREFIX_INITIALIZER,
)
from .providers import cuda_provider_options
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
    "ExportValidationError",
    "ORTModel",
    "ORTModelForCausalLM",
    "ORTModelForFeatureExtraction",
    "ORTModelForQuestionAnswering",
    "ORTModelForSeq2SeqLM",
    "ORTModelForSequenceClassification",
    "ORTModelForTokenClassification",
    "create_session",
    "cuda_provider_options",
    "export",
    "load",
]

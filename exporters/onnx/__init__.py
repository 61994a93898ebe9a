"""ONNX export of P-Tuning v2 models (prefix frozen into the graph) and ONNX Runtime models to serve them."""

from .export import ExportValidationError, check_output_dir, export
from .layout import (
    DECODER_FILE_NAME,
    DECODER_WITH_PAST_FILE_NAME,
    ENCODER_FILE_NAME,
    METADATA_FILE_NAME,
    ONNX_FILE_NAME,
    PREFIX_INITIALIZER,
    VALIDATION_REPORT_FILE_NAME,
)
from .providers import CPU, cuda_provider_options
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
from .tolerances import resolve_tolerance

__all__ = [
    "CPU",
    "DECODER_FILE_NAME",
    "DECODER_WITH_PAST_FILE_NAME",
    "ENCODER_FILE_NAME",
    "METADATA_FILE_NAME",
    "ONNX_FILE_NAME",
    "PREFIX_INITIALIZER",
    "VALIDATION_REPORT_FILE_NAME",
    "ExportValidationError",
    "ORTModel",
    "ORTModelForCausalLM",
    "ORTModelForFeatureExtraction",
    "ORTModelForQuestionAnswering",
    "ORTModelForSeq2SeqLM",
    "ORTModelForSequenceClassification",
    "ORTModelForTokenClassification",
    "check_output_dir",
    "create_session",
    "cuda_provider_options",
    "resolve_tolerance",
    "export",
    "load",
]

"""ONNX export of P-Tuning v2 models (prefix frozen into the graph, or swappable per call as ONNX Runtime adapter
files) and ONNX Runtime models to serve them.

The export side (``export``, ``export_prefix_adapter``, ``check_output_dir``, ``ExportValidationError`` and the
Trainer's ``ExportOnnxCallback``: the tracer, torch.onnx) is imported on first use, so a server that only loads
graphs and adapter files (``load``, ``ORTModelFor*``, all from the ``serving`` package) never imports it. See
``docs/architecture.md`` for which module may import which.
"""

import sys
import types
from importlib import import_module
from typing import Any

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
from .serving import (
    ORTModel,
    ORTModelForCausalLM,
    ORTModelForFeatureExtraction,
    ORTModelForQuestionAnswering,
    ORTModelForSeq2SeqLM,
    ORTModelForSequenceClassification,
    ORTModelForTokenClassification,
    PrefixAdapterMismatch,
    create_session,
    load,
    swappable_session_options,
)
from .tolerances import resolve_tolerance

_EXPORT_SIDE = {"export": ".export", "ExportValidationError": ".export", "check_output_dir": ".folder",
                "export_prefix_adapter": ".adapter_export", "ExportOnnxCallback": ".callbacks"}


class _ExportSideOnDemand(types.ModuleType):
    """Resolves the export-side names on access. A module-level ``__getattr__`` is not enough: importing the
    submodule ``exporters.onnx.export`` sets the package attribute ``export`` to that module, which would then shadow
    the function of the same name."""

    def __getattribute__(self, name: str) -> Any:
        module = _EXPORT_SIDE.get(name)
        if module is not None:
            return getattr(import_module(module, __name__), name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _ExportSideOnDemand


__all__ = [
    "CPU",
    "DECODER_FILE_NAME",
    "DECODER_WITH_PAST_FILE_NAME",
    "ENCODER_FILE_NAME",
    "METADATA_FILE_NAME",
    "ONNX_FILE_NAME",
    "PREFIX_INITIALIZER",
    "VALIDATION_REPORT_FILE_NAME",
    "ExportOnnxCallback",
    "ExportValidationError",
    "ORTModel",
    "ORTModelForCausalLM",
    "ORTModelForFeatureExtraction",
    "ORTModelForQuestionAnswering",
    "ORTModelForSeq2SeqLM",
    "ORTModelForSequenceClassification",
    "ORTModelForTokenClassification",
    "PrefixAdapterMismatch",
    "check_output_dir",
    "create_session",
    "cuda_provider_options",
    "resolve_tolerance",
    "export",
    "export_prefix_adapter",
    "load",
    "swappable_session_options",
]

"""P-Tuning v2 for Hugging Face PEFT.

``import ptv2_plugin`` registers the ``P_TUNING_V2`` method with PEFT (idempotent), after which ``get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and the ``AutoPeftModelFor*`` classes handle its adapters.
Every global effect of that import is listed in ``registration.py``.

This package knows PEFT, transformers and torch, never ``exporters``, onnx or onnxruntime. The one exception is the
deprecated alias ``ptv2_plugin.ExportOnnxCallback`` below: resolved lazily on first access (``__getattr__``), so
``import ptv2_plugin`` still imports no exporter; new code imports it from ``exporters.onnx``.
"""

import warnings
from importlib import import_module
from typing import Any

from .config import RECOMMENDED_LEARNING_RATE, RECOMMENDED_LEARNING_RATE_NO_PROJECTION, PTuningV2Config
from .layer import PTuningV2Layer
from .model import PTuningV2Model
from .prefix_encoder import PrefixEncoder
from .registration import register
from .training import RECOMMENDED_HEAD_LEARNING_RATE, create_optimizer, optimizer_param_groups

PEFT_TYPE = register()

__all__ = [
    "PEFT_TYPE",
    "RECOMMENDED_HEAD_LEARNING_RATE",
    "RECOMMENDED_LEARNING_RATE",
    "RECOMMENDED_LEARNING_RATE_NO_PROJECTION",
    "PTuningV2Config",
    "PTuningV2Layer",
    "PTuningV2Model",
    "PrefixEncoder",
    "create_optimizer",
    "optimizer_param_groups",
    "register",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Deprecated alias: ``ExportOnnxCallback`` moved to ``exporters.onnx`` (the exporter side of the house)."""
    if name != "ExportOnnxCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn("ptv2_plugin.ExportOnnxCallback moved: use `from exporters.onnx import ExportOnnxCallback`.",
                  DeprecationWarning, stacklevel=2)
    try:
        exporter = import_module("exporters.onnx")  # the only reference to exporters in ptv2_plugin (lazy)
    except ImportError as error:
        raise ImportError("ExportOnnxCallback needs the ONNX exporter and its dependencies: "
                          "pip install 'ptv2-plugin[onnx]'.") from error
    return exporter.ExportOnnxCallback

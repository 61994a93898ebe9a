"""P-Tuning v2 for Hugging Face PEFT.

``import ptv2_plugin`` registers the ``P_TUNING_V2`` method with PEFT (idempotent), after which ``get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and the ``AutoPeftModelFor*`` classes handle its adapters.
"""

from .callbacks import ExportOnnxCallback
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
    "ExportOnnxCallback",
    "PTuningV2Config",
    "PTuningV2Layer",
    "PTuningV2Model",
    "PrefixEncoder",
    "create_optimizer",
    "optimizer_param_groups",
    "register",
]
__version__ = "0.1.0"

"""Register P-Tuning v2 with PEFT: the single place where importing ``ptv2_plugin`` changes anything global.

``import ptv2_plugin`` calls ``register()`` once (idempotent, thread-safe), which has exactly these process-wide
effects, and nothing else does:

1. ``peft.utils.peft_types.PeftType`` gains the member ``P_TUNING_V2`` (``peft_type.py``).
2. PEFT's method registries map it to ``PTuningV2Config`` / ``PTuningV2Model`` with the state-dict prefix ``ptv2_``
   (``peft.utils.peft_types.register_peft_method``), so ``get_peft_model``, ``PeftModel.from_pretrained``,
   ``PeftConfig.from_pretrained`` and the ``AutoPeftModelFor*`` classes handle these adapters.
3. ``PeftModel.save_pretrained`` and ``PeftModel.load_adapter`` are wrapped, for every ``PeftModel`` in the process
   (``persistence.install_peft_wrappers``). The wrappers act only on models holding a P-Tuning v2 adapter (saved
   atomically as safetensors; loaded from safetensors only) and call PEFT's original for anything else.

Not done at import, but on first use by a ``PTuningV2Model``: transformers' ``AttentionInterface`` gains the entry
``"ptv2_prefixed"`` (``attention.register_attention_function``), which only modules the tuner wraps ever select.
``import ptv2_plugin`` imports no ``exporters``, onnx or onnxruntime (``tests/test_architecture.py`` checks this).
"""

from __future__ import annotations

import threading

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType, register_peft_method

from .config import PTuningV2Config
from .model import PTuningV2Model
from .peft_type import PEFT_TYPE_NAME, add_peft_type_member
from .persistence import install_peft_wrappers

__all__ = ["PEFT_TYPE_NAME", "register"]

_lock = threading.Lock()


def register() -> PeftType:
    """Make ``P_TUNING_V2`` a PEFT method: config class, tuner class and state-dict prefix; wrap PEFT's save/load."""
    with _lock:
        peft_type = add_peft_type_member(PEFT_TYPE_NAME)
        if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is not PTuningV2Model:
            register_peft_method(
                name=PEFT_TYPE_NAME.lower(), config_cls=PTuningV2Config, model_cls=PTuningV2Model, prefix="ptv2_"
            )
        install_peft_wrappers()
    return peft_type

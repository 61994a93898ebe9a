"""Register P-Tuning v2 with PEFT.

PEFT's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` only accepts names that are already members,
so third-party methods must first add their member. This module is the single place where that happens; it is
idempotent, so importing ``ptv2_plugin`` any number of times (or from several threads of the same process) is safe.
"""

from __future__ import annotations

import threading

from peft.utils.peft_types import PeftType, register_peft_method

PEFT_TYPE_NAME = "P_TUNING_V2"
_lock = threading.Lock()


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to ``PeftType`` the way ``enum`` itself stores members, so lookups by name and value work."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register() -> PeftType:
    """Make ``P_TUNING_V2`` a PEFT method: config class, tuner class and state-dict prefix."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from .config import PTuningV2Config
    from .model import PTuningV2Model
    from .persistence import install_peft_wrappers

    with _lock:
        peft_type = _add_peft_type_member(PEFT_TYPE_NAME)
        if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is not PTuningV2Model:
            register_peft_method(
                name=PEFT_TYPE_NAME.lower(), config_cls=PTuningV2Config, model_cls=PTuningV2Model, prefix="ptv2_"
            )
        install_peft_wrappers()
    return peft_type

"""The ``P_TUNING_V2`` member of PEFT's ``PeftType``.

PEFT's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` only accepts names that are already members,
so a third-party method must first add its member. The config needs the member as its ``peft_type``; registration
(``registration.py``) needs it to register the method; both get it from here.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "P_TUNING_V2"


def add_peft_type_member(name: str) -> PeftType:
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

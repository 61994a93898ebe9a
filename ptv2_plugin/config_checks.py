"""Checks of ``PTuningV2Config`` values: types and ranges when a config is built, sizes against the base model when
an adapter is added to it.

A config may come from a file someone else wrote (an ``adapter_config.json`` from the hub), and a config object
cannot tell whether a value came from code or from a file, so one set of rules applies to both, and nothing in a
config is ever evaluated. Sizes have fixed caps here and tighter bounds derived from the base model in
``check_against_model``, which runs before anything is allocated.

Regexes. PEFT matches a string ``target_modules`` / ``exclude_modules`` with ``re.fullmatch`` against every module
name, and hub configs do use regexes (``.*\\.(q_proj|v_proj)``), so allowing exact names only would refuse real
adapters. Instead a regex is at most ``MAX_PATTERN_LENGTH`` characters, must compile, and must not contain the
constructions that make Python's backtracking matcher take exponential or high-polynomial time: a repeated group
that itself repeats or alternates (``(a+)+``, ``(a|ab)*``), or more than ``MAX_UNBOUNDED_REPEATS`` unbounded
repeats (``.*.*.*.*x``). ``layers_pattern`` is pasted into a regex by PEFT, so it must be a plain dotted name.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .input_checks import max_real_tokens

try:
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_constants
    import sre_parse

PREFIX_INITS = ("random", "real_tokens", "zeros")  # PTuningV2Config.prefix_init, applied by initialization.py
MAX_VIRTUAL_TOKENS = 4096  # a longer prefix would dwarf every real input: a mistake, not a design choice
MAX_ENCODER_HIDDEN_SIZE = 65536  # wider than the hidden size of any model; the model-derived bound is tighter
ENCODER_HIDDEN_FACTOR = 4  # encoder_hidden_size <= 4 x hidden size, the width of a transformer's feed-forward layer
MAX_PATTERN_LENGTH = 256
MAX_UNBOUNDED_REPEATS = 3
MAX_NAMES = 1024  # entries of target_modules, exclude_modules, modules_to_save, layers_to_transform
MAX_NAME_LENGTH = 256
MAX_LAYER_INDEX = 100_000
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT} | (
    {sre_constants.POSSESSIVE_REPEAT} if hasattr(sre_constants, "POSSESSIVE_REPEAT") else set()
)


def check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}.")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (true/false), got {type(value).__name__} ({value!r}).")


def check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


def check_optional_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string or None, got {type(value).__name__} ({value!r}).")


def check_names(name: str, value: Any) -> None:
    """A list of module names (matched exactly or as a dotted suffix by PEFT, never as a regex)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{name} must be a list of module names, got {type(value).__name__} ({value!r}).")
    if len(value) > MAX_NAMES:
        raise ValueError(f"{name} has {len(value)} entries; at most {MAX_NAMES} are accepted.")
    for entry in value:
        if not isinstance(entry, str) or not entry.strip():
            raise TypeError(f"{name} entries must be non-empty strings, got {entry!r}.")
        if len(entry) > MAX_NAME_LENGTH:
            raise ValueError(f"{name} has an entry of {len(entry)} characters; at most {MAX_NAME_LENGTH}.")


def check_module_selector(name: str, value: Any) -> None:
    """``target_modules`` / ``exclude_modules``: None, a list of names, or one regex (checked by ``check_regex``)."""
    if value is None:
        return
    if isinstance(value, str):
        check_regex(name, value)
    else:
        check_names(name, value)


def check_regex(name: str, pattern: str) -> None:
    if not pattern.strip():
        raise ValueError(f"{name} must not be an empty string.")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"{name} is a regex of {len(pattern)} characters; at most {MAX_PATTERN_LENGTH} are accepted.")
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as error:
        raise ValueError(f"{name} is not a valid regex ({error}): {pattern!r}.") from None
    problem = _backtracking_risk(parsed, inside_repeat=False)
    unbounded = _count_unbounded(parsed)
    if problem is None and unbounded > MAX_UNBOUNDED_REPEATS:
        problem = f"{unbounded} unbounded repeats (at most {MAX_UNBOUNDED_REPEATS})"
    if problem is not None:
        raise ValueError(
            f"{name} regex {pattern!r} has {problem}, which can make matching take exponential or high-polynomial "
            "time (catastrophic backtracking). Use a simpler regex or a list of module names."
        )


def _items(parsed) -> list:
    return list(parsed.data if hasattr(parsed, "data") else parsed)


def _children(op, arg) -> list:
    """The sub-patterns of one parsed regex node."""
    if op in _REPEATS:
        return [arg[2]]
    if op == sre_constants.SUBPATTERN:
        return [arg[-1]]
    if op == sre_constants.BRANCH:
        return list(arg[1])
    if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        return [arg[1]]
    if op == sre_constants.GROUPREF_EXISTS:
        return [branch for branch in arg[1:] if branch is not None]
    if hasattr(sre_constants, "ATOMIC_GROUP") and op == sre_constants.ATOMIC_GROUP:
        return [arg]
    return []


def _backtracking_risk(parsed, inside_repeat: bool) -> str | None:
    for op, arg in _items(parsed):
        repeats = op in _REPEATS and arg[1] > 1
        if repeats and inside_repeat:
            return "a repeat inside a repeated group"
        if op == sre_constants.BRANCH and inside_repeat:
            return "an alternation inside a repeated group"
        for child in _children(op, arg):
            problem = _backtracking_risk(child, inside_repeat or repeats)
            if problem is not None:
                return problem
    return None


def _count_unbounded(parsed) -> int:
    count = 0
    for op, arg in _items(parsed):
        if op in _REPEATS and arg[1] == sre_constants.MAXREPEAT:
            count += 1
        count += sum(_count_unbounded(child) for child in _children(op, arg))
    return count


def check_layers_to_transform(value: Any) -> None:
    if value is None:
        return
    indices = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(indices, str) or not isinstance(indices, (list, tuple)):
        raise TypeError(f"layers_to_transform must be a layer index or a list of them, got {value!r}.")
    if not indices or len(indices) > MAX_NAMES:
        raise ValueError(f"layers_to_transform must list between 1 and {MAX_NAMES} layer indices, got {len(indices)}.")
    for index in indices:
        check_int("layers_to_transform entry", index, 0, MAX_LAYER_INDEX)
    if len(set(indices)) != len(indices):
        raise ValueError(f"layers_to_transform lists a layer twice: {list(indices)}.")


def check_layers_pattern(value: Any) -> None:
    if value is None:
        return
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not patterns:
        raise TypeError(f"layers_pattern must be a name or a non-empty list of names, got {value!r}.")
    for pattern in patterns:
        if not isinstance(pattern, str) or len(pattern) > MAX_NAME_LENGTH or not _DOTTED_NAME.fullmatch(pattern):
            raise ValueError(
                f"layers_pattern entries must be plain dotted module names such as 'layers' or 'encoder.layer' "
                f"(PEFT pastes them into a regex), got {pattern!r}."
            )


def check_auto_mapping(value: Any) -> None:
    """PEFT's AutoPeftModel imports ``parent_library``: only transformers modules may be named."""
    if value is None:
        return
    if not isinstance(value, dict) or not set(value) <= {"base_model_class", "parent_library"}:
        raise ValueError(f"auto_mapping must be None or {{'base_model_class': ..., 'parent_library': ...}}, got "
                         f"{value!r}.")
    library, cls = value.get("parent_library"), value.get("base_model_class")
    if not isinstance(library, str) or not (library == "transformers" or library.startswith("transformers.")) \
            or not _DOTTED_NAME.fullmatch(library):
        raise ValueError(f"auto_mapping.parent_library must name a transformers module, got {library!r}.")
    if not isinstance(cls, str) or not cls.isidentifier():
        raise ValueError(f"auto_mapping.base_model_class must be a class name, got {cls!r}.")


def check_against_model(config, model_config) -> None:
    """Bounds that depend on the base model, checked before the adapter's tensors are allocated."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    model_type = getattr(model_config, "model_type", "base")
    hidden = getattr(text, "hidden_size", None)
    width = config.encoder_hidden_size
    if width is not None and isinstance(hidden, int) and width > ENCODER_HIDDEN_FACTOR * hidden:
        raise ValueError(
            f"encoder_hidden_size={width} is larger than {ENCODER_HIDDEN_FACTOR} x the {model_type} model's hidden "
            f"size ({hidden}) = {ENCODER_HIDDEN_FACTOR * hidden}, the largest MLP width accepted."
        )
    layers = num_layers(model_config)
    if config.layers_to_transform is not None and layers is not None:
        indices = [config.layers_to_transform] if isinstance(config.layers_to_transform, int) \
            else config.layers_to_transform
        outside = [index for index in indices if index >= layers]
        if outside:
            raise ValueError(
                f"layers_to_transform names layer {outside[0]}, but the {model_type} model has {layers} layers "
                f"(0 to {layers - 1})."
            )
    positions = max_real_tokens(model_config)
    if config.shift_position_ids and positions is not None and config.num_virtual_tokens >= positions:
        raise ValueError(
            f"num_virtual_tokens={config.num_virtual_tokens} with shift_position_ids=True leaves no position for the "
            f"input: the {model_type} model has {positions} positions, so at most {positions - 1} virtual tokens."
        )


def num_layers(model_config) -> int | None:
    """Layers of the deepest stack (encoder or decoder), or None if the config does not say."""
    counts = [getattr(model_config, name, None) for name in ("num_hidden_layers", "num_decoder_layers",
                                                             "decoder_layers", "encoder_layers")]
    if hasattr(model_config, "get_text_config"):
        counts.append(getattr(model_config.get_text_config(), "num_hidden_layers", None))
    counts = [c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c > 0]
    return max(counts) if counts else None

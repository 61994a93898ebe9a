"""What is exported: a ``PeftModel`` (given, or loaded from an adapter folder and its base model), its task and the
P-Tuning v2 adapters to export. Shared by the graph export and the prefix adapter writer, which resolve the same
way and fail with the same messages."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import transformers
from peft import PeftConfig, PeftModel

from ptv2_plugin.registration import PEFT_TYPE_NAME  # importing ptv2_plugin registers the method before any load

from . import layout as L

AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


def resolve_model(model: Any, base_model: Any, task: str | None,
                  say: Callable[[str], None]) -> tuple[Any, list[Path]]:
    """A PeftModel plus the folders that may hold tokenizer files (adapter folder first, then base folder)."""
    if isinstance(model, PeftModel):
        dirs = [model.peft_config[model.active_adapter].base_model_name_or_path]
        return model, [Path(d) for d in dirs if d and Path(d).is_dir()]
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"export() takes a PeftModel or the path of a saved adapter, got {type(model).__name__}. "
            "Wrap a plain transformers model with peft.get_peft_model(model, PTuningV2Config(...)) first."
        )
    adapter_dir = Path(model)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not an adapter folder (no adapter_config.json).")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    resolved_task = L.normalize_task(task) or L.normalize_task(getattr(config, "task_type", None))
    if resolved_task is None:
        raise ValueError(f"The adapter in {adapter_dir} has no task_type; pass task=... (e.g. 'SEQ_CLS').")
    dirs = [adapter_dir]
    if base_model is None:
        base_model = config.base_model_name_or_path
        if not base_model:
            raise ValueError(f"The adapter in {adapter_dir} does not name its base model; pass base_model=...")
    if isinstance(base_model, (str, os.PathLike)):
        say(f"Loading base model {base_model} ({AUTO_CLASSES[resolved_task]})")
        auto = getattr(transformers, AUTO_CLASSES[resolved_task])
        if Path(base_model).is_dir():
            dirs.append(Path(base_model))
        base_model = auto.from_pretrained(str(base_model))
    say(f"Loading adapter {adapter_dir}")
    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    return peft_model.eval(), dirs


def resolve_task(peft_model, task: str | None) -> str:
    configured = L.normalize_task(getattr(peft_model.peft_config[peft_model.active_adapter], "task_type", None))
    task = L.normalize_task(task) or configured
    if task is None:
        raise ValueError("Cannot tell the task of this model; pass task=... (e.g. 'SEQ_CLS' or 'CAUSAL_LM').")
    if configured is not None and task != configured:
        raise ValueError(f"task={task} does not match the adapter's task_type {configured}.")
    return task


def resolve_adapters(peft_model, adapter_name: str | None, adapters: Sequence[str] | None) -> list[str]:
    if adapters is not None and adapter_name is not None:
        raise ValueError("Pass adapter_name (one adapter) or adapters (several), not both.")
    names = list(adapters) if adapters is not None else [adapter_name or peft_model.active_adapter]
    if not names:
        raise ValueError("adapters must name at least one adapter.")
    if len(set(names)) != len(names):
        raise ValueError(f"adapters contains duplicates: {names}.")
    for name in names:
        config = peft_model.peft_config.get(name)
        if config is None:
            raise ValueError(f"No adapter named {name!r}; available: {sorted(peft_model.peft_config)}.")
        if str(config.peft_type) != PEFT_TYPE_NAME and getattr(config.peft_type, "value", None) != PEFT_TYPE_NAME:
            raise ValueError(f"Adapter {name!r} is a {config.peft_type} adapter; only P-Tuning v2 can be exported.")
    return names

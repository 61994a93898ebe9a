"""``ExportPlan``: everything ``export()`` decides before tracing, checked up front so a bad combination fails before
any work, and handed as one object to the trace corridor, the folder writer and the validator.

A plan holds one ``GraphPlan`` per file: a single ``model.onnx``, or an encoder-decoder model's encoder, decoder and
decoder-with-past parts. Each graph lists the tensors traced as its trailing inputs (its prefix slots and, for
swappable graphs, the prefix length and task head), which become its initializers afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import layout as L
from .adapter_tensors import frozen_prefix, prefix_visibility, swappable_extras
from .fused_attention import parse_option, unsupported_reason
from .model_source import resolve_adapters, resolve_model, resolve_task
from .seq2seq import part_slots

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
GENERATIVE_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


@dataclass
class GraphPlan:
    """One graph to trace: its layout and what it holds of the adapters."""

    file_name: str
    layout: L.GraphLayout
    slots: list[int]  # prefix slots of the attention layers this graph contains, in slot order
    prefix: dict[str, torch.Tensor]  # ptv2.prefix.{slot}.key/value of those slots
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # swappable: prefix length, task head parameters
    adapter_ids: int = 0  # adapters selectable per row through an adapter_ids input (0: no such input)
    fused: bool | str = False  # fused prefix attention (True, "auto" or False)

    @property
    def initializers(self) -> dict[str, torch.Tensor]:
        """Traced as trailing inputs in this order, turned into initializers after tracing."""
        return {**self.prefix, **self.extras}

    @property
    def head_inputs(self) -> bool:
        return any(name != L.PREFIX_LENGTH for name in self.extras)


@dataclass
class ExportPlan:
    peft_model: Any
    source_dirs: list[Path]  # folders that may hold tokenizer files
    task: str
    adapters: list[str]
    multi: bool  # several adapters in one graph, selected per row
    prefix_as: str
    prefix_capacity: int | None
    with_past: bool
    dtype: str  # as the caller named it (recorded in the metadata)
    torch_dtype: torch.dtype
    opset: int
    device: torch.device
    fused: bool | str
    visible: torch.Tensor | None  # (adapters, n): real prefix columns when prefix lengths differ
    graphs: list[GraphPlan] = field(default_factory=list)

    @property
    def swappable(self) -> bool:
        return self.prefix_as == "adapter_inputs"

    @property
    def inner(self) -> Any:
        return self.peft_model.base_model.model


def plan_export(model: Any, *, base_model: Any, task: str | None, opset: int | None, dtype: str,
                with_past: bool | None, device: str, adapter_name: str | None, adapters: Sequence[str] | None,
                fused_attention: bool | str, prefix_as: str, prefix_capacity: int | None,
                say: Callable[[str], None]) -> ExportPlan:
    """Resolve the model and every option of ``export`` (see there); raises on any combination it cannot export."""
    torch_dtype = parse_dtype(dtype)
    peft_model, source_dirs = resolve_model(model, base_model, task, say)
    task = resolve_task(peft_model, task)
    names = resolve_adapters(peft_model, adapter_name, adapters)
    multi = adapters is not None
    swappable = _resolve_prefix_as(prefix_as, multi, task)
    if prefix_capacity is not None and not swappable:
        raise ValueError("prefix_capacity applies to prefix_as='adapter_inputs' graphs only.")
    if with_past is None:
        with_past = task in GENERATIVE_TASKS
    if with_past and task not in GENERATIVE_TASKS:
        raise ValueError(f"with_past=True needs task CAUSAL_LM or SEQ_2_SEQ_LM, got {task}.")
    _check_model_kind(peft_model, task)
    plan = ExportPlan(
        peft_model=peft_model, source_dirs=source_dirs, task=task, adapters=names, multi=multi, prefix_as=prefix_as,
        prefix_capacity=prefix_capacity, with_past=with_past, dtype=dtype, torch_dtype=torch_dtype,
        opset=int(opset or L.DEFAULT_OPSET), device=torch.device(device),
        fused=_resolve_fused(parse_option(fused_attention), task, peft_model, torch_dtype, say),
        visible=prefix_visibility(peft_model, names),
    )
    plan.graphs = _graph_plans(plan)
    return plan


def _graph_plans(plan: ExportPlan) -> list[GraphPlan]:
    prefix = frozen_prefix(plan.peft_model, plan.adapters, plan.prefix_capacity)
    per_row = len(plan.adapters) if plan.multi else 0
    graphs = []
    for file_name, layout in L.build_layouts(plan.inner.config, plan.task, plan.with_past).items():
        if layout.part:  # an encoder-decoder part holds the prefixes of the attention it contains
            slots = part_slots(plan.inner, plan.adapters[0], layout.part)
            own = {name: prefix[name] for name in _prefix_names(slots)}
            graphs.append(GraphPlan(file_name, layout, slots, own, adapter_ids=per_row if slots else 0))
            continue
        extras = swappable_extras(plan.peft_model, plan.adapters[0], plan.prefix_capacity) if plan.swappable else {}
        graphs.append(GraphPlan(file_name, layout, list(range(len(prefix) // 2)), prefix, extras, per_row,
                                plan.fused))
    return graphs


def _prefix_names(slots: list[int]) -> list[str]:
    return [L.PREFIX_INITIALIZER.format(slot=slot, kind=kind) for slot in slots for kind in ("key", "value")]


def parse_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if str(dtype) in DTYPES:
        return DTYPES[str(dtype)]
    raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")


def _resolve_prefix_as(prefix_as: str, multi: bool, task: str) -> bool:
    """True for a swappable-prefix graph; the combinations it does not cover fail here, before any tracing."""
    if prefix_as not in L.PREFIX_AS:
        raise ValueError(f"prefix_as must be one of {L.PREFIX_AS}, got {prefix_as!r}.")
    if prefix_as == "constants":
        return False
    if multi:
        raise ValueError("prefix_as='adapter_inputs' makes one single-adapter graph whose prefix is swapped per call; "
                         "a multi-adapter graph (adapters=[...]) selects prefixes per row instead. Pass one or the "
                         "other.")
    if task == "SEQ_2_SEQ_LM":
        raise NotImplementedError("prefix_as='adapter_inputs' is not supported for encoder-decoder (SEQ_2_SEQ_LM) "
                                  "exports yet; use prefix_as='constants'.")
    return True


def _resolve_fused(option: bool | str, task: str, peft_model, dtype: torch.dtype, say) -> bool | str:
    """``option`` when the fused op can serve this export, else False (logged; an error for ``True``)."""
    if option is False:
        return False
    model_type = peft_model.base_model.model.config.model_type
    reason = unsupported_reason(task=task, model_type=model_type, dtype=dtype)
    if reason is None:
        return option
    if option is True:
        raise ValueError(f"fused_attention=True cannot apply: {reason}. Use fused_attention='auto' or False.")
    say(f"Fused attention off: {reason}; writing plain attention ops")
    return False


def _check_model_kind(peft_model, task: str) -> None:
    """SEQ_2_SEQ_LM exactly for encoder-decoder models: the graphs differ in kind, not in detail."""
    config = peft_model.base_model.model.config
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if (task == "SEQ_2_SEQ_LM") != is_encoder_decoder:
        kind = "an encoder-decoder" if is_encoder_decoder else f"a {config.model_type} (not encoder-decoder)"
        raise ValueError(f"Task {task} cannot be exported for {kind} model; encoder-decoder models export as "
                         "SEQ_2_SEQ_LM and only they do.")

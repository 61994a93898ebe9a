"""The trace corridor: one function traces any graph of a plan, a single ``model.onnx`` or an encoder-decoder part.

Exporter choice: the TorchScript tracer (``torch.onnx.export(..., dynamo=False)``), as optimum-onnx does, called in
exactly one place (``_export_graph``). The prefix reaches attention through plain Python (a ContextVar, a config
view, forward hooks) that the tracer simply runs, on both transformers lanes and for encoders as well as decoders
with a ``DynamicCache``. The tracer records shapes as ops, so one trace serves every batch size, length and past
length, including an empty past. Known price: data-dependent Python branches are baked in, which is why sample
inputs contain a padded row and why 4.5x masks are swapped for broadcast ones (``model_patcher.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs

from . import layout as L
from .caches import dynamic_cache, flatten_cache
from .model_patcher import ModelPatcher
from .plan import ExportPlan, GraphPlan
from .sample_inputs import sample_inputs
from .seq2seq import call_part


class GraphModule(nn.Module):
    """Positional graph inputs -> one model call -> flat outputs in layout order. The trailing inputs (adapter ids,
    prefix slots, extras) go to the patcher's feed, from which the prefixed layers read them."""

    def __init__(self, model: nn.Module, graph: GraphPlan, patcher: ModelPatcher) -> None:
        super().__init__()
        self.model = model
        self.graph = graph
        self.patcher = patcher

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        graph, layout = self.graph, self.graph.layout
        inputs = dict(zip(layout.inputs, args))
        self.patcher.feed.take(list(args[len(layout.inputs) :]), graph.slots, bool(graph.adapter_ids),
                               list(graph.extras))
        if self.patcher.fused_trace is not None:
            self.patcher.fused_trace.attention_mask = inputs.get("attention_mask")
        if layout.part:
            return call_part(self.model, layout, inputs)
        return _call_single(self.model, layout, inputs)


def _call_single(model: nn.Module, graph: L.GraphLayout, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    past = [inputs.pop(name) for name in graph.past_names]
    if graph.task == "CAUSAL_LM":
        inputs["use_cache"] = graph.with_past
        if graph.with_past:
            inputs.update(cache_kwargs(dynamic_cache(past, model.config)))
    out = model(**inputs, return_dict=True)
    flat = [getattr(out, name) for name in graph.outputs if not name.startswith("present.")]
    if graph.with_past:
        flat.extend(flatten_cache(cache_from_output(out)))
    return tuple(flat)


def trace_graph(model: nn.Module, plan: ExportPlan, graph: GraphPlan, path: Path) -> list[str]:
    """Trace ``graph`` of ``plan`` from ``model`` (the float32 working copy) into ``path``; the prefix (and extras)
    are still inputs there. Returns why layers were not fused (empty when all were, or fusion is off)."""
    generator = torch.Generator().manual_seed(0)
    kv_shape = cache_geometry(model, plan.device) if graph.layout.with_past else None
    example = sample_inputs(model.config, graph.layout, kv_shape=kv_shape, device=plan.device,
                            dtype=next(model.parameters()).dtype, generator=generator)
    args, input_names, dynamic_axes = graph_arguments(example, graph, plan.device)
    patcher = ModelPatcher(model, plan.adapters, visible=plan.visible, per_row_heads=bool(graph.adapter_ids),
                           head_inputs=graph.head_inputs, fused=bool(graph.fused))
    with patcher:
        module = GraphModule(model, graph, patcher).eval()
        _export_graph(module, tuple(args), path, input_names, graph.layout.outputs, dynamic_axes, plan.opset,
                      custom_opsets={"com.microsoft": 1} if graph.fused else None)
    return patcher.fused_trace.skipped if patcher.fused_trace is not None else []


def _export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict, opset: int,
                  custom_opsets: dict[str, int] | None = None) -> None:
    """The one call into torch.onnx: every graph of every export is written here."""
    torch.onnx.export(
        module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
        output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True, custom_opsets=custom_opsets,
    )


def graph_arguments(example: dict[str, torch.Tensor], graph: GraphPlan,
                    device: torch.device) -> tuple[list[torch.Tensor], list[str], dict]:
    """Positional arguments, input names and dynamic axes of one traced graph: the layout's inputs, then (several
    adapters) each row's adapter id, then the graph's initializers-to-be (prefix, extras)."""
    layout = graph.layout
    args = [example[name] for name in layout.inputs]
    names = list(layout.inputs)
    axes = dict(layout.dynamic_axes)
    if graph.adapter_ids:
        args.append(torch.arange(args[0].shape[0], device=device) % graph.adapter_ids)
        names.append(L.ADAPTER_IDS_INPUT)
        axes[L.ADAPTER_IDS_INPUT] = {0: "batch_size"}
    for name, tensor in graph.initializers.items():
        args.append(tensor.to(device))
        names.append(name)
    return args, names, axes


def cache_geometry(model: nn.Module, device: torch.device) -> tuple[int, int]:
    """(kv_heads, head_dim) of the (decoder) cache, read from one real step so each architecture's own rules apply."""
    if getattr(model.config, "is_encoder_decoder", False):
        ids = torch.full((1, 2), 3, device=device)
        step = {"input_ids": ids, "decoder_input_ids": ids[:, :1]}
    else:
        step = {"input_ids": torch.full((1, 1), 3, device=device)}
    with torch.no_grad():
        out = model(**step, use_cache=True, return_dict=True)
    first = flatten_cache(cache_from_output(out))[0]
    return int(first.shape[1]), int(first.shape[3])

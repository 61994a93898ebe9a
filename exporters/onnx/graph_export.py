"""One traced module -> one ONNX file, through either of torch's exporters.

``dynamo``: ``torch.export`` captures the wrapper (non-strict, so the plugin's ContextVar, hooks and
config views run as plain Python), and torch's ONNX translator writes the graph. Dynamic axes become
``torch.export.Dim.DYNAMIC`` per axis; torch.export then works out which axes are equal (every ``batch_size``) or
derived (``past_sequence_length + sequence_length``), and the symbolic names it picks (``s0``, ``s0 + s1``) are
renamed back to the layout's axis labels, so both exporters write the same graph signature.

``dynamo`` is the default. It writes opset 20 by default: from opset 20 GELU is one ``Gelu`` node, which ONNX
Runtime fuses with its bias into ``BiasGelu`` (at opset 18 it is an Erf formula left unfused). With ORT's CPU
SkipLayerNormalization rewrite skipped (``providers.DISABLED_OPTIMIZERS``; the runtime classes do so), the dynamo
graph of all-MiniLM-L6-v2 serves as fast as the TorchScript one (``python -m benchmarks.onnx_inference``).

``torchscript``: the legacy tracer (``torch.onnx.export(..., dynamo=False)``), as optimum-onnx still uses; torch
deprecates it and warns on every call. It remains the fallback while torch ships it: chosen explicitly, or when an
opset below 18 is asked for (the dynamo translator cannot write those). Both write the same signature, prefix
initializers and metadata; outputs differ by <= 3.4e-8. A dynamo export takes about 10x as long (seconds, once).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from . import layout as L
from .postprocess import EXTERNAL_DATA_BYTES

logger = logging.getLogger(__name__)

DYNAMO = "dynamo"
TORCHSCRIPT = "torchscript"
EXPORTERS = (DYNAMO, TORCHSCRIPT)
DEFAULT_EXPORTER = DYNAMO
# The dynamo translator writes opset >= 18; torch's down-conversion to 17 fails for LayerNorm/RMSNorm graphs.
DYNAMO_MIN_OPSET = 18
DYNAMO_DEFAULT_OPSET = 20  # the module docstring: GELU as one node, which ORT fuses into BiasGelu
DEFAULT_OPSET = {DYNAMO: DYNAMO_DEFAULT_OPSET, TORCHSCRIPT: L.DEFAULT_OPSET}


def resolve_exporter(exporter: str | None, opset: int | None, say) -> tuple[str, int]:
    """(exporter, opset) of one export. ``exporter=None`` means dynamo unless the case needs the fallback; the
    reason is logged. An explicit ``"dynamo"`` that cannot serve the case fails with the reason instead."""
    if exporter is not None and str(exporter).strip().lower() not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}.")
    chosen = DEFAULT_EXPORTER if exporter is None else str(exporter).strip().lower()
    if chosen == DYNAMO and opset is not None and int(opset) < DYNAMO_MIN_OPSET:
        reason = (f"opset {opset} was requested and the dynamo exporter writes opset >= {DYNAMO_MIN_OPSET} (its "
                  "down-conversion fails on ReduceMean/ReduceSum, whose axes became inputs in opset 18)")
        if exporter is not None:
            raise ValueError(f"exporter='dynamo' cannot apply: {reason}. Use exporter='torchscript' or "
                             f"opset>={DYNAMO_MIN_OPSET}.")
        say(f"Exporter: torchscript (fallback): {reason}")
        chosen = TORCHSCRIPT
    return chosen, int(opset or DEFAULT_OPSET[chosen])


def export_graph(wrapper: nn.Module, args: Sequence[torch.Tensor], path: str | Path, *, input_names: Sequence[str],
                 output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]], opset: int,
                 exporter: str, custom_opsets: Mapping[str, int] | None = None) -> None:
    """Write ``wrapper(*args)`` to ``path`` with the given graph input/output names and dynamic axes."""
    if exporter == TORCHSCRIPT:
        torch.onnx.export(
            wrapper, tuple(args), str(path), dynamo=False, opset_version=opset, input_names=list(input_names),
            output_names=list(output_names), dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            do_constant_folding=True, custom_opsets=dict(custom_opsets) if custom_opsets else None,
        )
        return
    if exporter != DYNAMO:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}.")
    _export_dynamo(wrapper, args, Path(path), input_names=input_names, output_names=output_names,
                   dynamic_axes=dynamic_axes, opset=opset)


def dynamic_shapes(forward, input_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]]) -> tuple:
    """``torch.export`` spec of ``forward``'s positional arguments: ``{axis: Dim.DYNAMIC}`` per input, with the
    inputs a ``*rest`` parameter collects nested as one tuple (the structure torch.export matches against)."""
    per_input = [{axis: torch.export.Dim.DYNAMIC for axis in dynamic_axes[name]} if name in dynamic_axes else None
                 for name in input_names]
    parameters = list(inspect.signature(forward).parameters.values())
    fixed = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    spec: list = per_input[: len(fixed)]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        spec.append(tuple(per_input[len(fixed) :]))
    return tuple(spec)


def _export_dynamo(wrapper: nn.Module, args: Sequence[torch.Tensor], path: Path, *, input_names: Sequence[str],
                   output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]], opset: int) -> None:
    size = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    # torch's op registry logs one line per torchvision op it cannot register when torchvision is absent: noise.
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        _export_dynamo_quietly(wrapper, args, path, input_names=input_names, output_names=output_names,
                               dynamic_axes=dynamic_axes, opset=opset, size=size)
    finally:
        registry_log.setLevel(level)


def _export_dynamo_quietly(wrapper: nn.Module, args: Sequence[torch.Tensor], path: Path, *,
                           input_names: Sequence[str], output_names: Sequence[str],
                           dynamic_axes: Mapping[str, Mapping[int, str]], opset: int, size: int) -> None:
    import onnx

    with warnings.catch_warnings():
        # torch.export reports each guard it adds on a dynamic axis; parity across shapes is checked afterwards.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.export|torch\._export")
        # torch 2.13's own pytree code (copying a LeafSpec inside torch.export) trips its new deprecation; not ours.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`isinstance\(treespec, LeafSpec\)`")
        program = torch.onnx.export(
            wrapper, tuple(args), dynamo=True, opset_version=opset, input_names=list(input_names),
            output_names=list(output_names), dynamic_shapes=dynamic_shapes(wrapper.forward, input_names, dynamic_axes),
            optimize=True, verbose=False,
        )
    proto = program.model_proto
    rename_dims(proto.graph, dynamic_axes)
    # torch.export annotates every intermediate value; the annotations go stale when post-processing changes a type
    # (float16 conversion), which strict shape inference then rejects. Inference recomputes them.
    del proto.graph.value_info[:]
    onnx.save_model(proto, str(path), save_as_external_data=size > EXTERNAL_DATA_BYTES,
                    all_tensors_to_one_file=True, location=path.name + "_data" if size > EXTERNAL_DATA_BYTES else None)


def rename_dims(graph, dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """Replace torch.export's symbolic dim names (``s0``, ``s0 + s1``) by the layout's labels on the graph's inputs
    and outputs, so the signature matches the TorchScript export's."""
    labels: dict[str, str] = {}
    for value in (*graph.input, *graph.output):
        for axis, label in dynamic_axes.get(value.name, {}).items():
            dims = value.type.tensor_type.shape.dim
            if axis < len(dims) and dims[axis].dim_param:
                labels.setdefault(dims[axis].dim_param, label)
    for value in (*graph.input, *graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in labels:
                dim.dim_param = labels[dim.dim_param]
    # An axis the layout calls dynamic must not come out fixed: torch.export specialised it (a shape branch).
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, label in dynamic_axes.get(value.name, {}).items():
            if axis < len(dims) and not dims[axis].dim_param:
                raise RuntimeError(f"torch.export fixed axis {axis} ({label}) of {value.name} to "
                                   f"{dims[axis].dim_value}; the graph would not serve other shapes.")

"""Export a P-Tuning v2 model to self-contained ONNX graphs (one; three for encoder-decoder models).

``export()`` is the pipeline: plan (``plan.py``) -> trace each graph (``trace.py``, patches in ``model_patcher.py``)
-> post-process and fuse (``postprocess.py``) -> write the folder (``folder.py``) -> validate (``validate.py``)
-> move into place (``ptv2_plugin.atomic_folder``).

The prefix becomes constant initializers ``ptv2.prefix.{slot}.key/value`` (exactly
``prefix_encoder.all_key_values()``): the layers read it from extra traced inputs, which are turned into
initializers after export, so no prefix input and no MLP weight remains. Encoder-decoder models get Optimum's
seq2seq files (see ``seq2seq.py``); each graph holds the prefixes of the attention layers it contains.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ptv2_plugin.atomic_folder import replace_folder

from .adapter_tensors import base_fingerprint
from .folder import build_metadata, check_output_dir, write_metadata, write_model_files
from .model_patcher import eval_mode
from .plan import ExportPlan, GraphPlan, plan_export
from .postprocess import finalize_graph
from .providers import CPU, CUDA
from .quantize import calibration_feeds, check_agreement, quantize_graph
from .tolerances import resolve_tolerance
from .trace import trace_graph
from .validate import check_parity

logger = logging.getLogger(__name__)


class ExportValidationError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond tolerance; nothing was written."""


def export(
    model: Any,
    output_dir: str | os.PathLike,
    *,
    base_model: Any = None,
    task: str | None = None,
    opset: int | None = None,
    dtype: str = "float32",
    with_past: bool | None = None,
    device: str = "cpu",
    adapter_name: str | None = None,
    adapters: Sequence[str] | None = None,
    validate: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    tf32: bool = False,
    force: bool = False,
    fused_attention: bool | str = "auto",
    prefix_as: str = "constants",
    prefix_capacity: int | None = None,
    tokenizer: Any = None,
    progress: Callable[[str], None] | None = None,
    exporter: str | None = None,
    quantize: str | None = None,
    min_agreement: float | None = None,
) -> Path:
    """Write ``model.onnx`` (prefix frozen in), ``config.json``, tokenizer files and ``ptv2_export.json``.

    For SEQ_2_SEQ_LM the graphs are ``encoder_model.onnx``, ``decoder_model.onnx`` and (``with_past``, the default)
    ``decoder_with_past_model.onnx``, as Optimum lays them out.

    ``model`` is a ``PeftModel`` with a P-Tuning v2 adapter, or the path of a saved adapter (then ``base_model`` is
    the base model or its path; default: the adapter config's ``base_model_name_or_path``). ``adapters`` exports
    several adapters into one graph with an ``adapter_ids`` input selecting each row's prefix. ``tokenizer`` (a
    tokenizer or processor) is saved beside the graph when neither source folder holds tokenizer files.

    The folder is written beside ``output_dir`` and swapped in whole (``ptv2_plugin.atomic_folder``), only after the
    export (and, with ``validate``, the parity check) succeeded. ``force=True`` replaces only what an export wrote:
    an empty folder or an earlier export whose files are all listed in its ``ptv2_export.json``; anything else
    raises ``FileExistsError`` and stays as it was (``check_output_dir``).

    Validation passes when every output satisfies ``max|ort - torch| <= atol + rtol * max|torch|``; ``atol`` and
    ``rtol`` default per dtype and provider (``tolerances.py``). On CUDA it runs with TF32 off unless ``tf32=True``.

    ``fused_attention``: encoder graphs run each prefixed self-attention layer as ONNX Runtime's fused
    ``com.microsoft.MultiHeadAttention`` (prefix in front of its keys/values), which ORT's own optimizer cannot
    recover once a prefix is concatenated; in float32 CPU exports that are not quantized, as ``com.microsoft.Attention``
    on the packed query/key/value GEMM with the prefix as its past (packed_attention.py). ``"auto"`` (default) uses
    it wherever it applies and logs why not elsewhere; ``True`` fails with the reason when it cannot apply to every
    prefixed layer; ``False`` writes plain ONNX ops only (for runtimes without ORT's contrib ops).

    ``prefix_as``: ``"constants"`` (default) bakes the prefix in. ``"adapter_inputs"`` keeps the prefix and the task
    head as overridable inputs (initializers that are also graph inputs, defaulting to this adapter), so one deployed
    graph serves every adapter of the same base: write each with ``export_prefix_adapter`` and bind it per call
    (``ORTModel.load_prefix_adapter``). Single-adapter decoder-only and encoder graphs only. ``prefix_capacity``
    (with ``"adapter_inputs"``) gives the prefix room for up to that many tokens, so adapters of different lengths
    share the graph: their files are padded to it (``export_prefix_adapter(..., prefix_capacity=...)``) and a
    ``ptv2.prefix.length`` input masks the padding (attention then runs as plain ops, not the fused kernel).

    ``exporter``: ``"dynamo"`` (default: ``torch.export``-based, opset 20, no deprecation warning) or
    ``"torchscript"`` (torch's deprecated legacy tracer, the fallback; also chosen, with a logged reason, when
    ``opset`` < 18); both write the same graph names, initializers and metadata (``graph_export.py``).

    ``quantize="int8"``: every graph is dynamically quantized after export (``quantize.py``: int8 weight MatMuls;
    the down projections' few outlier input channels, the prefix and the heads stay float32). Validation then
    compares predictions instead of a float tolerance: it fails when the argmax agreement with PyTorch is below
    ``min_agreement`` (default 0.95); agreement and max logit error are recorded in ``ptv2_export.json`` under
    ``parity``, the quantization under ``quantization``.
    """
    say = progress or logger.info
    output_dir = Path(output_dir)
    check_output_dir(output_dir, force)
    plan = plan_export(model, base_model=base_model, task=task, opset=opset, dtype=dtype, with_past=with_past,
                       device=device, adapter_name=adapter_name, adapters=adapters, fused_attention=fused_attention,
                       prefix_as=prefix_as, prefix_capacity=prefix_capacity, say=say,
                       exporter=exporter, quantize=quantize, min_agreement=min_agreement)
    with replace_folder(output_dir, before_swap=lambda: check_output_dir(output_dir, force)) as staging:
        say(f"Preparing {type(plan.inner).__name__} ({plan.task}, adapters {plan.adapters}, {dtype}, {device})")
        work = _working_copy(plan.peft_model, plan.device)
        if plan.visible is not None:
            say(f"Prefix lengths differ ({plan.visible.sum(-1).tolist()}): padded to {plan.visible.shape[1]}, "
                "masked per row")
        fused_layers = _trace_graphs(plan, work.base_model.model, staging, say)
        quantized = _quantize_graphs(plan, staging, say) if plan.quantize else None
        copied = write_model_files(plan, staging, tokenizer)
        if copied:
            say(f"Copied tokenizer files: {', '.join(copied)}")
        metadata = build_metadata(plan, fused_layers, base_fingerprint(plan.peft_model) if plan.swappable else None,
                                  quantized)
        if validate:
            metadata["parity"] = _validate(plan, work, staging, metadata, atol, rtol, tf32, say)
        write_metadata(staging, metadata)
    say(f"Export done: {output_dir}")
    return output_dir


def _trace_graphs(plan: ExportPlan, inner: torch.nn.Module, staging: Path, say) -> Counter:
    """Trace, post-process and (where planned) fuse every graph of the plan into ``staging``; returns the fused
    attention nodes written, by op."""
    say(f"Tracing with torch.onnx ({plan.exporter} exporter, opset {plan.opset})")
    (staging / "trace").mkdir()
    fused_layers: Counter = Counter()
    for graph in plan.graphs:
        traced = staging / "trace" / graph.file_name
        skipped = trace_graph(inner, plan, graph, traced)
        fused_here = finalize_graph(traced, staging / graph.file_name, graph.initializers, plan.torch_dtype,
                                    overridable=plan.swappable, pack_attention=_packs_attention(plan))
        fused_layers += fused_here
        kind = "overridable inputs (defaults: this adapter)" if plan.swappable else "initializers, no prefix inputs"
        say(f"Wrote {graph.file_name}: prefix{' and task head' if graph.extras else ''} stored as "
            f"{len(graph.initializers)} {kind}")
        if graph.fused:
            _check_fused(graph, fused_here, skipped, say)
    shutil.rmtree(staging / "trace")
    return fused_layers


def _packs_attention(plan: ExportPlan) -> bool:
    """Whether fused layers become ``com.microsoft.Attention`` (packed_attention.py): float32 graphs that are not
    quantized, exported (and so validated) on CPU; ORT's CUDA ``Attention`` kernel with a past has not been run for
    this project, so a CUDA export keeps ``MultiHeadAttention``."""
    return plan.torch_dtype == torch.float32 and plan.quantize is None and plan.device.type == "cpu"


def _check_fused(graph: GraphPlan, fused: Counter, skipped: list[str], say) -> None:
    prefixed_layers, fused_layers = len(graph.slots), sum(fused.values())
    if fused_layers == prefixed_layers:
        say(f"Fused attention: {fused_layers} prefixed layers run as {' + '.join(sorted(fused))}")
        return
    why = "; ".join(dict.fromkeys(skipped)) or ("their attention runs neither through transformers' attention "
                                                 "interface nor as BERT-style inline self-attention")
    if graph.fused is True:
        raise ValueError(f"fused_attention=True: only {fused_layers} of {prefixed_layers} prefixed layers could be "
                         f"fused ({why}). Use fused_attention='auto' or False.")
    say(f"Fused attention: {fused_layers} of {prefixed_layers} prefixed layers fused; the rest use plain ops ({why})")


def _quantize_graphs(plan: ExportPlan, staging: Path, say) -> dict[str, Any]:
    """int8: each written graph replaced by its dynamically quantized form; returns what the metadata records."""
    config = plan.inner.config
    quantized = {
        graph.file_name: quantize_graph(staging / graph.file_name,
                                        calibration_feeds(config, graph.layout, staging / graph.file_name))
        for graph in plan.graphs
    }
    say(f"Quantized to int8 (dynamic): {', '.join(f'{k} {v}' for k, v in quantized.items())}")
    return quantized


def _validate(plan: ExportPlan, work, staging: Path, metadata: dict, atol, rtol, tf32: bool, say) -> dict:
    """Parity of the staged folder against PyTorch; raises ``ExportValidationError`` (the staging is discarded).
    An int8 graph is judged by prediction agreement instead (``quantize.check_agreement``)."""
    provider = CUDA if plan.device.type == "cuda" else CPU
    if plan.quantize:
        say(f"Validating against PyTorch on {provider} (argmax agreement >= {plan.min_agreement:.2%})")
        with eval_mode(work):
            agreement = check_agreement(work, staging, plan.adapters if plan.multi else None, provider=provider,
                                        min_agreement=plan.min_agreement, metadata=metadata)
        for line in agreement.lines():
            say(line)
        if not agreement.ok:
            raise ExportValidationError(f"The int8 graph's predictions differ from PyTorch's: "
                                        f"{agreement.worst_detail()}. The export was discarded.")
        return agreement.as_dict()
    tolerance = resolve_tolerance(plan.torch_dtype, provider, atol=atol, rtol=rtol, tf32=tf32)
    say(f"Validating against PyTorch on {provider} ({tolerance.describe()}{', TF32 on' if tf32 else ''})")
    with eval_mode(work):
        report = check_parity(work, staging, plan.adapters if plan.multi else None, provider=provider,
                              tolerance=tolerance, tf32=tf32, metadata=metadata)
    for line in report.lines():
        say(line)
    if not report.ok:
        raise ExportValidationError(
            f"ONNX Runtime output differs from PyTorch beyond {tolerance.describe()}: {report.worst_detail()}. "
            "The export was discarded."
        )
    return report.as_dict()


def _working_copy(peft_model, device: torch.device):
    """The model to trace, in float32: the caller's own when nothing changes, else a copy (theirs stays intact).

    float16 graphs are converted from the float32 trace in mixed precision (``float16.py``: norms, softmax and the
    attention scores stay float32); tracing a half-precision model records dtype casts that differ between PyTorch
    kernels and versions.
    """
    reference = next(peft_model.parameters())
    if reference.dtype == torch.float32 and reference.device == device:
        return peft_model
    return copy.deepcopy(peft_model).to(device=device, dtype=torch.float32)

"""Export a P-Tuning v2 model to self-contained ONNX graphs (one; three for encoder-decoder models).

Exporter choice: the TorchScript tracer (``torch.onnx.export(..., dynamo=False)``), as optimum-onnx does. The prefix
reaches attention through plain Python (a ContextVar, a config view, forward hooks) that the tracer simply runs,
on both transformers lanes and for encoders as well as decoders with a ``DynamicCache``; torch.export (the dynamo
exporter) has to capture all of that symbolically and, on transformers 4.5x, trips over the vmap-based masks and the
cache classes. The tracer records shapes as ops, so one trace serves every batch size, length and past length,
including an empty past. Known price: data-dependent Python branches are baked in, which is why sample inputs
contain a padded row (no "all ones" shortcut gets recorded) and why 4.5x masks are swapped for broadcast ones.

The prefix becomes constant initializers ``ptv2.prefix.{slot}.key/value`` (exactly
``prefix_encoder.all_key_values()``): the layers read it from extra traced inputs, which are turned into
initializers after export, so no prefix input and no MLP weight remains. Encoder-decoder models get Optimum's
seq2seq files (see ``seq2seq.py``); each graph holds the prefixes of the attention layers it contains.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptv2_plugin.atomic_folder import replace_folder
from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs

from . import layout as L
from .adapter_tensors import base_fingerprint, frozen_prefix, prefix_visibility, swappable_extras
from .float16 import convert_to_float16
from .fused_attention import FUSED_OP, count_fused, fused_prefix_attention, parse_option, unsupported_reason
from .providers import CPU, CUDA
from .quantize import check_min_agreement, parse_quantize
from .tolerances import resolve_tolerance
from .tracing import eval_mode, graph_arguments, heads_as_inputs, heads_from_feed, prefix_from_feed, traceable_masks

logger = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a serialized graph at 2 GB: weights go to a side file above this
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja",
)
_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}
GENERATIVE_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


class ExportValidationError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond tolerance; nothing was written."""


# ------------------------------------------------------------------------------------------------ public entry
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
    recover once a prefix is concatenated. ``"auto"`` (default) uses it wherever it applies and logs why not
    elsewhere; ``True`` fails with the reason when it cannot apply to every prefixed layer; ``False`` writes plain
    ONNX ops only (for runtimes without ORT's contrib ops).

    ``prefix_as``: ``"constants"`` (default) bakes the prefix in. ``"adapter_inputs"`` keeps the prefix and the task
    head as overridable inputs (initializers that are also graph inputs, defaulting to this adapter), so one deployed
    graph serves every adapter of the same base: write each with ``export_prefix_adapter`` and bind it per call
    (``ORTModel.load_prefix_adapter``). Single-adapter decoder-only and encoder graphs only. ``prefix_capacity``
    (with ``"adapter_inputs"``) gives the prefix room for up to that many tokens, so adapters of different lengths
    share the graph: their files are padded to it (``export_prefix_adapter(..., prefix_capacity=...)``) and a
    ``ptv2.prefix.length`` input masks the padding (attention then runs as plain ops, not the fused kernel).

    ``quantize="int8"``: every graph is dynamically quantized after export (``quantize.py``: int8 weight MatMuls,
    prefix and heads float32). Validation then compares predictions instead of a float tolerance: it fails when the
    argmax agreement with PyTorch is below ``min_agreement`` (default 0.95); agreement and max logit error are
    recorded in ``ptv2_export.json`` under ``parity``, the quantization under ``quantization``.
    """
    say = progress or logger.info
    output_dir = Path(output_dir)
    check_output_dir(output_dir, force)
    torch_dtype = _parse_dtype(dtype)
    quantization = parse_quantize(quantize, torch_dtype, prefix_as)
    min_agreement = check_min_agreement(min_agreement, quantization)
    opset = int(opset or L.DEFAULT_OPSET)
    peft_model, source_dirs = _resolve_model(model, base_model, task, say)
    task = _resolve_task(peft_model, task)
    names = _resolve_adapters(peft_model, adapter_name, adapters)
    multi = adapters is not None
    swappable = _resolve_prefix_as(prefix_as, multi, task)
    if prefix_capacity is not None and not swappable:
        raise ValueError("prefix_capacity applies to prefix_as='adapter_inputs' graphs only.")
    if with_past is None:
        with_past = task in GENERATIVE_TASKS
    if with_past and task not in GENERATIVE_TASKS:
        raise ValueError(f"with_past=True needs task CAUSAL_LM or SEQ_2_SEQ_LM, got {task}.")
    _check_model_kind(peft_model, task)
    fused = _resolve_fused(parse_option(fused_attention), task, peft_model, torch_dtype, say)

    with replace_folder(output_dir, before_swap=lambda: check_output_dir(output_dir, force)) as staging:
        say(f"Preparing {type(peft_model.base_model.model).__name__} ({task}, adapters {names}, {dtype}, {device})")
        work = _working_copy(peft_model, torch.device(device))
        inner = work.base_model.model
        graphs = build_layouts(inner.config, task, with_past)
        prefix = frozen_prefix(peft_model, names, prefix_capacity)
        extras = swappable_extras(peft_model, names[0], prefix_capacity) if swappable else {}  # length, task heads
        visible = prefix_visibility(peft_model, names)
        if visible is not None:
            say(f"Prefix lengths differ ({visible.sum(-1).tolist()}): padded to {visible.shape[1]}, masked per row")
        say(f"Tracing with torch.onnx (TorchScript exporter, opset {opset})")
        (staging / "trace").mkdir()
        files, fused_layers = {}, 0
        for file_name, graph in graphs.items():
            traced = staging / "trace" / file_name
            if graph.part:
                from .seq2seq import part_slots, trace_part

                slots = part_slots(inner, names[0], graph.part)
                trace_part(inner, graph, prefix, slots, names, multi, traced, opset, torch.device(device), visible)
                wanted = [L.PREFIX_INITIALIZER.format(slot=s, kind=kind) for s in slots for kind in ("key", "value")]
                used = {name: prefix[name] for name in wanted}
            else:
                slots = list(range(len(prefix) // 2))
                skipped = _trace(inner, graph, prefix, names, multi, traced, opset, torch.device(device), fused,
                                 extras, visible)
                used = {**prefix, **extras}
            fused_here = _finalize_graph(traced, staging / file_name, used, torch_dtype, overridable=swappable)
            fused_layers += fused_here
            files[file_name] = slots
            kind = "overridable inputs (defaults: this adapter)" if swappable else "initializers, no prefix inputs"
            say(f"Wrote {file_name}: prefix{' and task head' if extras else ''} stored as {len(used)} {kind}")
            if fused and not graph.part:
                _check_fused(fused, fused_here, len(slots), skipped, say)
        shutil.rmtree(staging / "trace")
        quantized = None
        if quantization:
            from .quantize import quantize_graph

            quantized = {name: quantize_graph(staging / name) for name in files}
            say(f"Quantized to int8 (dynamic): {', '.join(f'{k} {v}' for k, v in quantized.items())}")

        inner.config.save_pretrained(staging)
        if task in GENERATIVE_TASKS and getattr(inner, "generation_config", None) is not None:
            inner.generation_config.save_pretrained(staging)
        copied = _copy_tokenizer(source_dirs, staging)
        if copied:
            say(f"Copied tokenizer files: {', '.join(copied)}")
        elif tokenizer is not None:
            tokenizer.save_pretrained(staging)

        metadata = _metadata(peft_model, names, multi, task, graphs, files, opset, dtype, torch.device(device))
        metadata["prefix_as"] = prefix_as
        metadata["prefix_capacity"] = prefix_capacity
        metadata["base_fingerprint"] = base_fingerprint(peft_model) if swappable else None
        metadata["fused_attention"] = {"op": f"com.microsoft.{FUSED_OP}", "layers": fused_layers} if fused_layers \
            else None
        metadata["quantization"] = {"scheme": quantization, "files": quantized} if quantized else None
        metadata_path = staging / L.METADATA_FILE_NAME
        metadata["written_files"] = sorted({p.name for p in staging.iterdir()} | {L.METADATA_FILE_NAME})
        metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")
        if validate:
            from .validate import check_parity

            provider = CUDA if torch.device(device).type == "cuda" else CPU
            tolerance = resolve_tolerance(torch_dtype, provider, atol=atol, rtol=rtol, tf32=tf32)
            criterion = f"argmax agreement >= {min_agreement:.2%}" if quantized else tolerance.describe()
            say(f"Validating against PyTorch on {provider} ({criterion}{', TF32 on' if tf32 else ''})")
            with eval_mode(work):
                if quantized:
                    from .quantize import check_agreement

                    report = check_agreement(work, staging, names if multi else None, provider=provider,
                                             min_agreement=min_agreement)
                else:
                    report = check_parity(work, staging, names if multi else None, provider=provider,
                                          tolerance=tolerance, tf32=tf32)
            metadata["parity"] = report.as_dict()
            for line in report.lines():
                say(line)
            if not report.ok and quantized:
                raise ExportValidationError(f"The int8 graph's predictions differ from PyTorch's: "
                                            f"{report.worst_detail()}. The export was discarded.")
            if not report.ok:
                raise ExportValidationError(
                    f"ONNX Runtime output differs from PyTorch beyond {tolerance.describe()}: {report.worst_detail()}. "
                    "The export was discarded."
                )
            metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")
    say(f"Export done: {output_dir}")
    return output_dir


# ------------------------------------------------------------------------------------------------ resolution
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


def _check_fused(option: bool | str, fused_layers: int, prefixed_layers: int, skipped: list[str], say) -> None:
    if fused_layers == prefixed_layers:
        say(f"Fused attention: {fused_layers} prefixed layers run as com.microsoft.{FUSED_OP}")
        return
    why = "; ".join(dict.fromkeys(skipped)) or ("their attention runs neither through transformers' attention "
                                                 "interface nor as BERT-style inline self-attention")
    if option is True:
        raise ValueError(f"fused_attention=True: only {fused_layers} of {prefixed_layers} prefixed layers could be "
                         f"fused ({why}). Use fused_attention='auto' or False.")
    say(f"Fused attention: {fused_layers} of {prefixed_layers} prefixed layers fused; the rest use plain ops ({why})")


def _parse_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if str(dtype) in DTYPES:
        return DTYPES[str(dtype)]
    raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")


def check_output_dir(output_dir: str | os.PathLike, force: bool, option: str = "force=True (--force)") -> None:
    """Refuse an output folder unless it is missing, empty, or (with ``force``) an earlier export and nothing else.

    An earlier export is recognised by its ``ptv2_export.json``; every entry of the folder must be a file that
    export listed as written (or the callback's validation report), so a user's file inside it is never deleted.
    ``option`` is how the caller's user spells ``force`` in the messages.
    """
    output_dir = Path(output_dir)
    if os.path.lexists(output_dir) and not output_dir.is_dir():
        raise FileExistsError(f"Output path {output_dir} exists and is not a folder.")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not force:
        raise FileExistsError(
            f"Output folder {output_dir} is not empty; pass {option} to replace an earlier export there."
        )
    foreign = foreign_entries(output_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"Refusing to replace {output_dir}: it holds {shown}, which no export wrote. {option} only "
            f"replaces an empty folder or an earlier export (a folder with {L.METADATA_FILE_NAME} and only the files "
            "it lists). Nothing was changed; move those files or choose another output folder."
        )


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that no export wrote there (all of them when it holds no readable export metadata)."""
    try:
        metadata = json.loads((folder / L.METADATA_FILE_NAME).read_text())
        written = metadata.get("written_files")
        if written is None:  # exports made before the list was recorded: the names an export writes
            graphs = list(metadata["files"])
            written = [*graphs, *(g + "_data" for g in graphs), "config.json", "generation_config.json",
                       *TOKENIZER_FILES]
        if not isinstance(written, list) or not all(isinstance(name, str) for name in written):
            raise TypeError("written_files is not a list of names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sorted(e.name for e in os.scandir(folder))
    ours = {*written, L.METADATA_FILE_NAME, L.VALIDATION_REPORT_FILE_NAME}
    return sorted(e.name for e in os.scandir(folder) if e.name not in ours or not e.is_file(follow_symlinks=False))


def _resolve_model(model: Any, base_model: Any, task: str | None, say) -> tuple[Any, list[Path]]:
    """A PeftModel plus the folders that may hold tokenizer files (adapter folder first, then base folder)."""
    from peft import PeftConfig, PeftModel

    import ptv2_plugin  # noqa: F401  (registers the PEFT method before any adapter is loaded)

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
        import transformers

        say(f"Loading base model {base_model} ({_AUTO_CLASSES[resolved_task]})")
        auto = getattr(transformers, _AUTO_CLASSES[resolved_task])
        if Path(base_model).is_dir():
            dirs.append(Path(base_model))
        base_model = auto.from_pretrained(str(base_model))
    say(f"Loading adapter {adapter_dir}")
    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    return peft_model.eval(), dirs


def _resolve_task(peft_model, task: str | None) -> str:
    configured = L.normalize_task(getattr(peft_model.peft_config[peft_model.active_adapter], "task_type", None))
    task = L.normalize_task(task) or configured
    if task is None:
        raise ValueError("Cannot tell the task of this model; pass task=... (e.g. 'SEQ_CLS' or 'CAUSAL_LM').")
    if configured is not None and task != configured:
        raise ValueError(f"task={task} does not match the adapter's task_type {configured}.")
    return task


def _resolve_adapters(peft_model, adapter_name: str | None, adapters: Sequence[str] | None) -> list[str]:
    from ptv2_plugin.registration import PEFT_TYPE_NAME

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


def _check_model_kind(peft_model, task: str) -> None:
    """SEQ_2_SEQ_LM exactly for encoder-decoder models: the graphs differ in kind, not in detail."""
    config = peft_model.base_model.model.config
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if (task == "SEQ_2_SEQ_LM") != is_encoder_decoder:
        kind = "an encoder-decoder" if is_encoder_decoder else f"a {config.model_type} (not encoder-decoder)"
        raise ValueError(f"Task {task} cannot be exported for {kind} model; encoder-decoder models export as "
                         "SEQ_2_SEQ_LM and only they do.")


def build_layouts(config, task: str, with_past: bool) -> dict[str, L.GraphLayout]:
    """File name -> graph layout of everything an export writes."""
    if task == "SEQ_2_SEQ_LM":
        return L.seq2seq_layouts(num_decoder_layers(config), with_past)
    return {L.ONNX_FILE_NAME: build_layout(config, task, with_past)}


def num_decoder_layers(config) -> int:
    for name in ("num_decoder_layers", "decoder_layers"):  # T5, BART
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return _num_layers(config)


def build_layout(config, task: str, with_past: bool) -> L.GraphLayout:
    if task == "CAUSAL_LM":
        return L.decoder_layout(_num_layers(config), with_past)
    return L.encoder_layout(task, config.model_type, getattr(config, "type_vocab_size", None))


def _num_layers(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


# --------------------------------------------------------------------------------------------------- tracing
class _ExportWrapper(nn.Module):
    """Positional graph inputs -> model call -> flat outputs; the prefix arrives as trailing inputs."""

    def __init__(self, model: nn.Module, graph: L.GraphLayout, feed, multi: bool, num_slots: int,
                 fused_trace=None, extra_names: Sequence[str] = ()) -> None:
        super().__init__()
        self.fused_trace = fused_trace
        self.model = model
        self.graph = graph
        self.feed = feed
        self.multi = multi
        self.num_slots = num_slots
        self.extra_names = list(extra_names)

    def forward(self, *args: torch.Tensor):
        graph = self.graph
        inputs = dict(zip(graph.inputs, args))
        rest = list(args[len(graph.inputs) :])
        if self.multi:
            self.feed.adapter_ids = rest.pop(0)
        prefix, extra = rest[: 2 * self.num_slots], rest[2 * self.num_slots :]
        self.feed.keys, self.feed.values = prefix[0::2], prefix[1::2]
        extras = dict(zip(self.extra_names, extra))
        self.feed.length = extras.pop(L.PREFIX_LENGTH, None)
        self.feed.heads = extras
        if self.fused_trace is not None:
            self.fused_trace.attention_mask = inputs.get("attention_mask")
        past = [inputs.pop(name) for name in graph.past_names]
        if graph.task == "CAUSAL_LM":
            inputs["use_cache"] = graph.with_past
            if graph.with_past:
                inputs.update(cache_kwargs(_dynamic_cache(past, self.model.config)))
        out = self.model(**inputs, return_dict=True)
        flat = [getattr(out, name) for name in graph.outputs if not name.startswith("present.")]
        if graph.with_past:
            flat.extend(flatten_cache(cache_from_output(out)))
        return tuple(flat)


def _dynamic_cache(flat: list[torch.Tensor], config):
    from transformers import DynamicCache

    pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    return DynamicCache(pairs, config=config)


def flatten_cache(cache) -> list[torch.Tensor]:
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "key_cache"):
        return [t for pair in zip(cache.key_cache, cache.value_cache) for t in pair]
    return [t for pair in cache for t in pair[:2]]


def sample_inputs(config, graph: L.GraphLayout, *, batch: int = 2, length: int = 5, past: int = 3,
                  kv_shape: tuple[int, int] | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Inputs in the graph's layout with the last row padded (right for encoders, left for decoders)."""
    vocab = int(config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size)
    low = min(3, vocab - 1)
    ids = torch.randint(low, vocab, (batch, length), generator=generator)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    total = past + length if graph.with_past else length
    mask = torch.ones(batch, total, dtype=torch.long)
    if batch > 1 and length > 1:
        if graph.task == "CAUSAL_LM":
            mask[-1, :1] = 0
        else:
            mask[-1, -1:] = 0
    inputs["attention_mask"] = mask
    if "token_type_ids" in graph.inputs:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    if "position_ids" in graph.inputs:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs["position_ids"] = positions[:, -length:]
    if graph.with_past:
        heads, head_dim = kv_shape
        for name in graph.past_names:
            inputs[name] = torch.randn(batch, heads, past, head_dim, generator=generator).to(dtype)
    return {k: v.to(device) for k, v in inputs.items()}


def _kv_shape(model: nn.Module, device: torch.device) -> tuple[int, int]:
    """(kv_heads, head_dim) of the cache, read from one real step so every architecture's own rules apply."""
    with torch.no_grad():
        out = model(input_ids=torch.full((1, 1), 3, device=device), use_cache=True, return_dict=True)
    first = flatten_cache(cache_from_output(out))[0]
    return int(first.shape[1]), int(first.shape[3])


def _trace(inner: nn.Module, graph: L.GraphLayout, prefix: dict[str, torch.Tensor], names: list[str], multi: bool,
           path: Path, opset: int, device: torch.device, fused: bool | str = False,
           extras: dict[str, torch.Tensor] | None = None, visible: torch.Tensor | None = None) -> list[str]:
    """Trace one graph; returns why layers were not fused (empty when all were, or fusion is off). ``extras``
    (swappable export) are the prefix length (with a capacity) and the task head's parameters, traced as inputs
    after the prefix."""
    extras = extras or {}
    heads = {name: tensor for name, tensor in extras.items() if name != L.PREFIX_LENGTH}
    dtype = next(inner.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    kv_shape = _kv_shape(inner, device) if graph.with_past else None
    example = sample_inputs(inner.config, graph, kv_shape=kv_shape, device=device, dtype=dtype, generator=generator)
    args, input_names, dynamic_axes = graph_arguments(example, graph, {**prefix, **extras},
                                                      len(names) if multi else 0, device)
    with prefix_from_feed(inner, names, visible) as feed, traceable_masks(), eval_mode(inner), torch.no_grad(), \
            warnings.catch_warnings(), (heads_from_feed(inner, names, feed) if multi else nullcontext()), \
            (heads_as_inputs(inner, names[0], feed) if heads else nullcontext()), \
            fused_prefix_attention(bool(fused), inner) as fused_trace:
        # Shape-dependent Python branches the tracer warns about are covered by the parity check across shapes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        wrapper = _ExportWrapper(inner, graph, feed, multi, len(prefix) // 2, fused_trace, list(extras)).eval()
        torch.onnx.export(
            wrapper, tuple(args), str(path), dynamo=False, opset_version=opset, input_names=input_names,
            output_names=graph.outputs, dynamic_axes=dynamic_axes, do_constant_folding=True,
            custom_opsets={"com.microsoft": 1} if fused else None,
        )
    return fused_trace.skipped if fused_trace is not None else []


def _finalize_graph(traced: Path, path: Path, prefix: dict[str, torch.Tensor], dtype: torch.dtype,
                    overridable: bool = False) -> int:
    """Turn the traced prefix inputs into initializers holding exactly the exported prefix; convert to float16.
    ``overridable`` keeps them listed as graph inputs too: an initializer that is also an input is an input with a
    default value, which ONNX Runtime's adapters (and plain feeds) can replace per run.
    Returns the number of fused attention nodes."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(traced))
    present = {i.name for i in proto.graph.input}
    missing = [name for name in prefix if name not in present]
    if missing:
        raise RuntimeError(f"The traced graph lost prefix inputs {missing}; the prefix never reached attention.")
    kept = [i for i in proto.graph.input if overridable or i.name not in prefix]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    for name, tensor in prefix.items():
        proto.graph.initializer.append(numpy_helper.from_array(tensor.cpu().numpy(), name))
    external = sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    if dtype == torch.float16:
        proto = convert_to_float16(proto, external_path=traced.with_name("float32-" + path.name) if external else None)
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + "_data" if external else None)
    onnx.checker.check_model(str(path))
    return count_fused(proto.graph)


# ------------------------------------------------------------------------------------------- folder contents
def _copy_tokenizer(source_dirs: list[Path], target: Path) -> list[str]:
    for folder in source_dirs:
        found = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
        if found:
            for name in found:
                shutil.copy2(folder / name, target / name)
            return found
    return []


def _metadata(peft_model, names, multi, task, graphs, files, opset, dtype, device) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import peft
    import transformers

    import ptv2_plugin

    first = peft_model.peft_config[names[0]]
    graph = next(iter(graphs.values()))
    with_past = any(g.with_past for g in graphs.values())
    ids = [L.ADAPTER_IDS_INPUT] if multi else []
    return {
        "format": "ptv2-onnx/1",
        "task": task,
        "optimum_task": L.OPTIMUM_TASK[task] + ("-with-past" if with_past else ""),
        "model_type": peft_model.base_model.model.config.model_type,
        "adapters": names,
        "multi_adapter": multi,
        "adapter_ids_input": L.ADAPTER_IDS_INPUT if multi else None,
        "num_virtual_tokens": max(peft_model.peft_config[n].num_virtual_tokens for n in names),
        "num_virtual_tokens_per_adapter": {n: peft_model.peft_config[n].num_virtual_tokens for n in names},
        "base_model_name_or_path": first.base_model_name_or_path,
        "dtype": dtype if isinstance(dtype, str) else str(dtype).replace("torch.", ""),
        "opset": opset,
        "with_past": with_past,
        "inputs": graph.inputs + ids,
        "outputs": graph.outputs,
        "files": {
            name: {"inputs": g.inputs + (ids if files[name] else []), "outputs": g.outputs,
                   "prefix_slots": files[name]}
            for name, g in graphs.items()
        },
        "exported_on": str(device),
        "versions": {
            "ptv2_plugin": ptv2_plugin.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "parity": None,
    }

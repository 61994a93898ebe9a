"""Graph layout: tasks, input/output names and dynamic axes, following Optimum's ONNX conventions.

One place decides what an exported graph looks like, so the exporter, the validator and the runtime agree, and
folders load in Optimum's ``ORTModelFor*`` classes too. Names and axis labels mirror optimum-onnx's
``TextEncoderOnnxConfig`` / ``TextDecoderWithPositionIdsOnnxConfig``; the one deliberate difference is that every
decoder takes ``position_ids`` (Optimum omits it for Gemma), so left-padded batches number tokens as PyTorch does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ONNX_FILE_NAME = "model.onnx"
# Encoder-decoder models: Optimum's non-merged seq2seq layout (ORTModelForSeq2SeqLM loads it as is).
ENCODER_FILE_NAME = "encoder_model.onnx"
DECODER_FILE_NAME = "decoder_model.onnx"
DECODER_WITH_PAST_FILE_NAME = "decoder_with_past_model.onnx"
METADATA_FILE_NAME = "ptv2_export.json"
# Written into an export folder by ExportOnnxCallback when real evaluation batches disagree with PyTorch.
VALIDATION_REPORT_FILE_NAME = "ptv2_validation_report.json"
OWNED_PREFIX = "ptv2."  # every initializer the exporter owns (prefix keys/values, swappable heads) starts so
PREFIX_INITIALIZER = "ptv2.prefix.{slot}.{kind}"  # kind: key | value; shape (kv_heads, n, head_dim), or stacked
ADAPTER_IDS_INPUT = "adapter_ids"
# prefix_as="adapter_inputs": the adapter's task head (PEFT's modules_to_save) is swappable too, one tensor per
# parameter, e.g. ptv2.head.classifier.weight.
HEAD_INITIALIZER = "ptv2.head.{module}.{param}"
# prefix_capacity: the graph's prefix slots hold up to capacity tokens; this int64 (1,) input says how many are real.
PREFIX_LENGTH = "ptv2.prefix.length"
PREFIX_KEY_0 = PREFIX_INITIALIZER.format(slot=0, kind="key")
PREFIX_AS = ("constants", "adapter_inputs")
# Prefix adapter files (onnxruntime.AdapterFormat) and the JSON sidecar next to them ("sst2.onnx_adapter.json").
ADAPTER_FILE_SUFFIX = ".onnx_adapter"
ADAPTER_SIDECAR_SUFFIX = ".json"
ADAPTER_FORMAT = "ptv2-prefix-adapter/1"
ADAPTER_FORMAT_VERSION = 1  # AdapterFormat's adapter_version


def adapter_sidecar(path: str | os.PathLike) -> Path:
    """The JSON sidecar of an adapter file: ``sst2.onnx_adapter`` -> ``sst2.onnx_adapter.json``."""
    return Path(str(path) + ADAPTER_SIDECAR_SUFFIX)


def model_version(base_fingerprint: str) -> int:
    """AdapterFormat's model_version (an int): the first 28 bits of the base model's fingerprint, so an adapter
    file read without its sidecar still cannot be bound to a graph of another base model."""
    return int(base_fingerprint[:7], 16)

TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_2_SEQ_LM")
# Optimum / pipeline task names accepted as aliases, so `--task text-classification` works as with optimum-cli.
TASK_ALIASES = {
    "text-classification": "SEQ_CLS",
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "question-answering": "QUESTION_ANS",
    "feature-extraction": "FEATURE_EXTRACTION",
    "text-generation": "CAUSAL_LM",
    "text-generation-with-past": "CAUSAL_LM",
    "text2text-generation": "SEQ_2_SEQ_LM",
    "text2text-generation-with-past": "SEQ_2_SEQ_LM",
}
OPTIMUM_TASK = {
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
}
# Encoders whose Optimum export has a token_type_ids input (RoBERTa-style models have none).
TOKEN_TYPE_IDS_MODELS = {"bert", "electra", "deberta", "deberta-v2", "xlm", "albert"}

DEFAULT_OPSET = 17


def normalize_task(task: str | None) -> str | None:
    if task is None:
        return None
    key = str(task).strip()
    if key.upper() in TASKS:
        return key.upper()
    if key.lower() in TASK_ALIASES:
        return TASK_ALIASES[key.lower()]
    raise ValueError(
        f"Unknown task {task!r}; use one of {', '.join(TASKS)} (or {', '.join(sorted(TASK_ALIASES))})."
    )


def output_names(task: str) -> list[str]:
    if task == "QUESTION_ANS":
        return ["start_logits", "end_logits"]
    if task == "FEATURE_EXTRACTION":
        return ["last_hidden_state"]
    return ["logits"]


@dataclass
class GraphLayout:
    """Names and dynamic axes of one exported graph."""

    task: str
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    num_layers: int = 0  # decoders with past: number of cached layers
    with_past: bool = False
    part: str = ""  # encoder-decoder models: "encoder", "decoder" or "decoder_with_past"

    @property
    def past_names(self) -> list[str]:
        return [n for n in self.inputs if n.startswith("past_key_values.")]

    @property
    def present_names(self) -> list[str]:
        return [n for n in self.outputs if n.startswith("present.")]


def encoder_layout(task: str, model_type: str, type_vocab_size: int | None) -> GraphLayout:
    """Graph without a cache: encoders, and decoders exported for classification or without past."""
    axes = {0: "batch_size", 1: "sequence_length"}
    inputs = ["input_ids", "attention_mask"]
    if model_type in TOKEN_TYPE_IDS_MODELS and (type_vocab_size or 0) > 0:
        inputs.append("token_type_ids")
    outputs = output_names(task)
    dynamic = {name: dict(axes) for name in inputs}
    for name in outputs:
        dynamic[name] = {0: "batch_size"} if task == "SEQ_CLS" else dict(axes)
    return GraphLayout(task=task, inputs=inputs, outputs=outputs, dynamic_axes=dynamic)


def decoder_layout(num_layers: int, with_past: bool) -> GraphLayout:
    """Optimum's text-generation(-with-past) layout for decoder-only models."""
    total = "past_sequence_length + sequence_length" if with_past else "sequence_length"
    inputs = ["input_ids", "attention_mask", "position_ids"]
    dynamic = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: total},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    outputs = ["logits"]
    if with_past:
        for i in range(num_layers):
            for kind in ("key", "value"):
                inputs.append(f"past_key_values.{i}.{kind}")
                dynamic[f"past_key_values.{i}.{kind}"] = {0: "batch_size", 2: "past_sequence_length"}
                outputs.append(f"present.{i}.{kind}")
                dynamic[f"present.{i}.{kind}"] = {0: "batch_size", 2: total}
    return GraphLayout(
        task="CAUSAL_LM", inputs=inputs, outputs=outputs, dynamic_axes=dynamic, num_layers=num_layers,
        with_past=with_past,
    )


def seq2seq_layouts(num_layers: int, with_past: bool) -> dict[str, GraphLayout]:
    """Optimum's text2text-generation(-with-past) graphs, by file name.

    ``decoder_model.onnx`` runs the first step (no past) and returns both caches; ``decoder_with_past_model.onnx``
    runs the later steps: it reads the cross-attention keys/values from the past (so it has no
    ``encoder_hidden_states`` input) and returns only the grown self-attention cache, as Optimum's does.
    """
    encoder_axes = {0: "batch_size", 1: "encoder_sequence_length"}
    encoder = GraphLayout(
        task="SEQ_2_SEQ_LM", inputs=["input_ids", "attention_mask"], outputs=["last_hidden_state"],
        dynamic_axes={name: dict(encoder_axes) for name in ("input_ids", "attention_mask", "last_hidden_state")},
        part="encoder",
    )
    layouts = {ENCODER_FILE_NAME: encoder, DECODER_FILE_NAME: _seq2seq_decoder(num_layers, past=False)}
    if with_past:
        layouts[DECODER_WITH_PAST_FILE_NAME] = _seq2seq_decoder(num_layers, past=True)
    return layouts


def _seq2seq_decoder(num_layers: int, past: bool) -> GraphLayout:
    batch, encoder_length = {0: "batch_size"}, {0: "batch_size", 1: "encoder_sequence_length"}
    decoder_axes = {0: "batch_size", 1: "decoder_sequence_length"}
    total = "past_decoder_sequence_length + decoder_sequence_length" if past else "decoder_sequence_length"
    inputs = ["input_ids", "encoder_attention_mask"] + ([] if past else ["encoder_hidden_states"])
    dynamic = {"input_ids": dict(decoder_axes), "encoder_attention_mask": dict(encoder_length),
               "encoder_hidden_states": dict(encoder_length), "logits": dict(decoder_axes)}
    if past:
        del dynamic["encoder_hidden_states"]
    outputs = ["logits"]
    for i in range(num_layers):
        for attention, length in (("decoder", "past_decoder_sequence_length"), ("encoder", "encoder_sequence_length")):
            for kind in ("key", "value"):
                if past:
                    inputs.append(f"past_key_values.{i}.{attention}.{kind}")
                    dynamic[inputs[-1]] = {**batch, 2: length}
                if attention == "decoder" or not past:
                    outputs.append(f"present.{i}.{attention}.{kind}")
                    dynamic[outputs[-1]] = {**batch, 2: total if attention == "decoder" else length}
    return GraphLayout(
        task="SEQ_2_SEQ_LM", inputs=inputs, outputs=outputs, dynamic_axes=dynamic, num_layers=num_layers,
        with_past=past, part="decoder_with_past" if past else "decoder",
    )


# ------------------------------------------------------------------------------------- layouts of a model config
def build_layouts(config, task: str, with_past: bool) -> dict[str, GraphLayout]:
    """File name -> graph layout of everything an export of ``task`` writes for a model with ``config``."""
    if task == "SEQ_2_SEQ_LM":
        return seq2seq_layouts(num_decoder_layers(config), with_past)
    return {ONNX_FILE_NAME: build_layout(config, task, with_past)}


def build_layout(config, task: str, with_past: bool) -> GraphLayout:
    if task == "CAUSAL_LM":
        return decoder_layout(num_layers(config), with_past)
    return encoder_layout(task, config.model_type, getattr(config, "type_vocab_size", None))


def num_decoder_layers(config) -> int:
    for name in ("num_decoder_layers", "decoder_layers"):  # T5, BART
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return num_layers(config)


def num_layers(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)

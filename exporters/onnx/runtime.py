"""ONNX Runtime models for exported folders, returning transformers' own output classes.

For transformers 5 users Optimum has no runtime; on 4.57 these folders also load in Optimum's ``ORTModelFor*``.
On CUDA, inputs and outputs go through IOBinding and a decoder's cache stays on the device between steps
(``OrtValue``s bound back as the next step's past), so only logits cross to the host.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from . import layout as L

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def create_session(path: str | Path, provider: str = "CPUExecutionProvider", *, session_options=None,
                   provider_options: Mapping[str, Any] | None = None):
    """An InferenceSession that really runs on ``provider``: ORT's silent fallback to CPU is turned into an error."""
    import onnxruntime as ort

    providers: list = [(provider, dict(provider_options or {}))]
    if provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")  # for the few ops a GPU provider leaves to the CPU
    session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
    if provider not in session.get_providers():
        raise RuntimeError(
            f"ONNX Runtime could not start {provider} (available: {ort.get_available_providers()}, session uses "
            f"{session.get_providers()}). For CUDA install onnxruntime-gpu with a matching CUDA/cuDNN."
        )
    return session


class ORTModel:
    """Base class: one ``model.onnx`` session plus the folder's config and export metadata."""

    task: ClassVar[str] = ""

    def __init__(self, session, config, model_dir: Path, metadata: dict | None = None,
                 use_io_binding: bool | None = None) -> None:
        self.session = session
        self.config = config
        self.model_dir = Path(model_dir)
        self.metadata = metadata or {}
        self.provider = session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.use_io_binding = self.device == "cuda" if use_io_binding is None else bool(use_io_binding)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_dtypes = {i.name: _ORT_TO_NUMPY.get(i.type, np.float32) for i in session.get_inputs()}
        self.adapters: list[str] = list(self.metadata.get("adapters") or [])
        if self.task and self.metadata.get("task") not in (None, self.task):
            raise ValueError(
                f"{self.model_dir} holds a {self.metadata['task']} export; {type(self).__name__} serves {self.task}."
            )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, provider: str = "CPUExecutionProvider", *,
                        session_options=None, provider_options: Mapping[str, Any] | None = None,
                        use_io_binding: bool | None = None, file_name: str = L.ONNX_FILE_NAME):
        from transformers import AutoConfig

        model_dir = Path(model_dir)
        path = model_dir / file_name
        if not path.is_file():
            raise FileNotFoundError(f"No {file_name} in {model_dir}; export one with exporters.onnx.export(...).")
        metadata_path = model_dir / L.METADATA_FILE_NAME
        metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
        config = AutoConfig.from_pretrained(str(model_dir))
        session = create_session(path, provider, session_options=session_options, provider_options=provider_options)
        return cls(session, config, model_dir, metadata, use_io_binding)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------ inputs
    def _prepare(self, input_ids, attention_mask=None, token_type_ids=None, adapter_ids=None,
                 adapter_names: Sequence[str] | None = None, **extra) -> dict[str, np.ndarray]:
        ids = _to_numpy(input_ids, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {ids.shape}.")
        feed = {"input_ids": ids}
        feed["attention_mask"] = np.ones_like(ids) if attention_mask is None else _to_numpy(attention_mask, np.int64)
        if "token_type_ids" in self.input_names:
            types = np.zeros_like(ids) if token_type_ids is None else _to_numpy(token_type_ids, np.int64)
            feed["token_type_ids"] = types
        if L.ADAPTER_IDS_INPUT in self.input_names:
            feed[L.ADAPTER_IDS_INPUT] = self._adapter_ids(adapter_ids, adapter_names, ids.shape[0])
        elif adapter_ids is not None or adapter_names is not None:
            raise ValueError("This export holds a single adapter; adapter_ids/adapter_names do not apply.")
        unknown = [k for k, v in extra.items() if v is not None and k not in ("return_dict", "output_attentions",
                                                                              "output_hidden_states")]
        if unknown:
            raise TypeError(f"{type(self).__name__} got unsupported arguments {unknown}.")
        return feed

    def _adapter_ids(self, adapter_ids, adapter_names, batch: int) -> np.ndarray:
        if adapter_names is not None:
            if isinstance(adapter_names, str):
                adapter_names = [adapter_names] * batch
            unknown = sorted(set(adapter_names) - set(self.adapters))
            if unknown:
                raise ValueError(f"Unknown adapters {unknown}; this export holds {self.adapters}.")
            adapter_ids = [self.adapters.index(name) for name in adapter_names]
        if adapter_ids is None:
            raise ValueError(f"This export holds adapters {self.adapters}: pass adapter_names=[...] (one per row).")
        ids = _to_numpy(adapter_ids, np.int64).reshape(-1)
        if ids.shape[0] == 1 and batch > 1:
            ids = np.repeat(ids, batch)
        if ids.shape[0] != batch or ids.min() < 0 or ids.max() >= len(self.adapters):
            raise ValueError(f"adapter_ids must hold {batch} values in [0, {len(self.adapters)}), got {ids.tolist()}.")
        return ids

    # --------------------------------------------------------------------------------------------------- run
    def _run(self, feed: Mapping[str, Any], keep_on_device: Sequence[str] = ()) -> dict[str, Any]:
        """Outputs by name: numpy arrays, except ``keep_on_device`` names, which stay ``OrtValue``s under IOBinding."""
        if not self.use_io_binding:
            arrays = {k: (v.numpy() if hasattr(v, "device_name") else v) for k, v in feed.items()}
            return dict(zip(self.output_names, self.session.run(None, arrays)))
        binding = self.session.io_binding()
        for name, value in feed.items():
            if hasattr(value, "device_name"):  # an OrtValue, possibly already on the device
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: value if name in keep_on_device else value.numpy()
                for name, value in zip(self.output_names, values)}

    def _forward_outputs(self, **kwargs) -> dict[str, torch.Tensor]:
        feed = self._prepare(**kwargs)
        return {name: torch.from_numpy(np.asarray(value)) for name, value in self._run(feed).items()}


def _to_numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value).astype(dtype, copy=False)


class ORTModelForSequenceClassification(ORTModel):
    task = "SEQ_CLS"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        out = self._forward_outputs(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids, **kwargs)
        return SequenceClassifierOutput(logits=out["logits"])


class ORTModelForTokenClassification(ORTModel):
    task = "TOKEN_CLS"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        from transformers.modeling_outputs import TokenClassifierOutput

        out = self._forward_outputs(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids, **kwargs)
        return TokenClassifierOutput(logits=out["logits"])


class ORTModelForQuestionAnswering(ORTModel):
    task = "QUESTION_ANS"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        from transformers.modeling_outputs import QuestionAnsweringModelOutput

        out = self._forward_outputs(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids, **kwargs)
        return QuestionAnsweringModelOutput(start_logits=out["start_logits"], end_logits=out["end_logits"])


class ORTModelForFeatureExtraction(ORTModel):
    task = "FEATURE_EXTRACTION"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        out = self._forward_outputs(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids, **kwargs)
        return BaseModelOutput(last_hidden_state=out["last_hidden_state"])


class ORTModelForCausalLM(ORTModel):
    """Decoder with Optimum's cache layout. The prefix lives in the graph, so the cache holds real tokens only."""

    task = "CAUSAL_LM"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        self.present_names = [n for n in self.output_names if n.startswith("present.")]
        self.can_use_cache = bool(self.past_names) and bool(self.present_names)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if self.past_names:
            shape = inputs[self.past_names[0]].shape  # (batch, kv_heads, past, head_dim): heads/dim are fixed
            self._kv_heads, self._head_dim = int(shape[1]), int(shape[3])
            self._past_dtype = self.input_dtypes[self.past_names[0]]
        self.generation_config = _generation_config(self.model_dir, self.config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        feed, keep = self._decoder_feed(input_ids, attention_mask, position_ids, past_key_values, **kwargs)
        out = self._run(feed)
        logits = torch.from_numpy(out["logits"])
        past = None
        if self.can_use_cache and use_cache is not False:
            flat = [torch.from_numpy(np.asarray(out[name])) for name in self.present_names]
            past = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
        return CausalLMOutputWithPast(logits=logits, past_key_values=past)

    def _decoder_feed(self, input_ids, attention_mask, position_ids, past_key_values, **kwargs):
        ids = _to_numpy(input_ids, np.int64)
        batch, length = ids.shape
        past_flat = _flatten_past(past_key_values)
        past_len = _past_length(past_flat)
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + length), dtype=np.int64)
        mask = _to_numpy(attention_mask, np.int64)
        if mask.shape[1] != past_len + length:
            raise ValueError(
                f"attention_mask covers {mask.shape[1]} positions but past ({past_len}) + input ({length}) = "
                f"{past_len + length}."
            )
        feed = self._prepare(input_ids=ids, attention_mask=mask, **kwargs)
        if "position_ids" in self.input_names:
            if position_ids is None:
                positions = mask.cumsum(-1) - 1
                positions[mask == 0] = 1
                position_ids = positions[:, -length:]
            feed["position_ids"] = _to_numpy(position_ids, np.int64)
        if self.past_names:
            if past_flat is None:
                empty = np.zeros((batch, self._kv_heads, 0, self._head_dim), dtype=self._past_dtype)
                past_flat = [empty] * len(self.past_names)
            if len(past_flat) != len(self.past_names):
                raise ValueError(
                    f"past_key_values holds {len(past_flat)} tensors; the graph takes {len(self.past_names)}."
                )
            for name, value in zip(self.past_names, past_flat):
                feed[name] = value if hasattr(value, "device_name") else _to_numpy(value, self._past_dtype)
        return feed, self.present_names

    # ------------------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int | None = None,
                 max_length: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None, pad_token_id=None,
                 adapter_ids=None, adapter_names=None, generator: torch.Generator | None = None,
                 generation_config=None, **kwargs) -> torch.LongTensor:
        """Greedy or sampled decoding with the cache, as ``transformers``' ``generate`` does it for these settings:
        finished rows continue with ``pad_token_id``; decoding stops when every row finished or at the length cap."""
        config = generation_config or self.generation_config
        if kwargs.pop("num_beams", 1) not in (None, 1):
            raise NotImplementedError("Beam search is not supported by ORTModelForCausalLM.generate; use num_beams=1.")
        kwargs.pop("use_cache", None)
        if kwargs:
            raise TypeError(f"generate() got unsupported arguments {sorted(kwargs)}.")
        ids = torch.as_tensor(_to_numpy(input_ids, np.int64))
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(_to_numpy(attention_mask, np.int64))
        if max_new_tokens is None:
            max_new_tokens = getattr(config, "max_new_tokens", None)
        if max_new_tokens is None:
            max_new_tokens = max(0, (max_length or getattr(config, "max_length", 20) or 20) - ids.shape[1])
        do_sample = bool(getattr(config, "do_sample", False) if do_sample is None else do_sample)
        eos = _as_set(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None))
        pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        if eos and pad is None:
            pad = min(eos)
        warp = _warpers(config, temperature, top_k, top_p) if do_sample else None

        adapter = {"adapter_ids": adapter_ids, "adapter_names": adapter_names}
        past = None
        step_ids = ids
        finished = torch.zeros(ids.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            feed, _ = self._decoder_feed(step_ids, mask, None, past, **adapter)
            out = self._run(feed, keep_on_device=self.present_names)
            logits = torch.from_numpy(np.asarray(out["logits"])[:, -1, :]).float()
            if do_sample:
                scores = warp(ids, logits)
                token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(-1)
            if pad is not None:
                token = torch.where(finished, torch.full_like(token, pad), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if eos:
                finished |= torch.isin(token, torch.tensor(sorted(eos)))
                if bool(finished.all()):
                    break
            if self.can_use_cache:
                past = [out[name] for name in self.present_names]
                step_ids = token[:, None]
            else:  # no cache: every step re-reads the whole sequence
                step_ids = ids
        return ids


def _flatten_past(past) -> list | None:
    if past is None:
        return None
    if hasattr(past, "layers") or hasattr(past, "key_cache"):  # a transformers Cache
        from .export import flatten_cache

        return flatten_cache(past) or None
    flat: list = []
    for item in past:
        if isinstance(item, (tuple, list)):
            flat.extend(item[:2])
        else:
            flat.append(item)
    return flat or None


def _past_length(flat) -> int:
    if not flat:
        return 0
    shape = flat[0].shape() if callable(getattr(flat[0], "shape", None)) else flat[0].shape
    return int(shape[2])


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _warpers(config, temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    temperature = getattr(config, "temperature", 1.0) if temperature is None else temperature
    top_k = getattr(config, "top_k", None) if top_k is None else top_k
    top_p = getattr(config, "top_p", None) if top_p is None else top_p
    processors = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


def _generation_config(model_dir: Path, config):
    from transformers import GenerationConfig

    if (model_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(model_dir))
    return GenerationConfig.from_model_config(config)


TASK_TO_CLASS = {
    "SEQ_CLS": ORTModelForSequenceClassification,
    "TOKEN_CLS": ORTModelForTokenClassification,
    "QUESTION_ANS": ORTModelForQuestionAnswering,
    "FEATURE_EXTRACTION": ORTModelForFeatureExtraction,
    "CAUSAL_LM": ORTModelForCausalLM,
}


def load(model_dir: str | Path, provider: str = "CPUExecutionProvider", **kwargs) -> ORTModel:
    """The right ``ORTModelFor*`` for an exported folder, read from its metadata."""
    metadata_path = Path(model_dir) / L.METADATA_FILE_NAME
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {L.METADATA_FILE_NAME}; pick the ORTModelFor* class yourself.")
    task = json.loads(metadata_path.read_text())["task"]
    return TASK_TO_CLASS[task].from_pretrained(model_dir, provider, **kwargs)

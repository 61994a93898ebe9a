"""ONNX Runtime models for exported folders, returning transformers' own output classes.

For transformers 5 users Optimum has no runtime; on 4.57 these folders also load in Optimum's ``ORTModelFor*``
(encoder-decoder folders in its ``ORTModelForSeq2SeqLM``, non-merged layout).
On CUDA, inputs and outputs go through IOBinding, bound to the session's ``device_id``, and a decoder's cache stays
on the device between steps (``OrtValue``s bound back as the next step's past), so only logits cross to the host:
in ``generate``, and in ``forward`` when it is given ``OrtValue``s (or ``cache_on_device=True``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ptv2_plugin.transformers_compat import cache_kwargs

from . import layout as L
from .prefix_adapters import PrefixAdapter, read_prefix_adapter
from .providers import CPU, CUDA, missing_provider_message, warn_on_wheel_clash

warn_on_wheel_clash()  # two onnxruntime wheels in one folder: say so at import, before CUDA silently goes missing

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def create_session(path: str | Path, provider: str = CPU, *, session_options=None,
                   provider_options: Mapping[str, Any] | None = None):
    """An InferenceSession that really runs on ``provider``: ORT's silent fallback to CPU is turned into an error
    that says which onnxruntime is active and how to fix it."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        raise RuntimeError(missing_provider_message(provider, ort))
    providers: list = [(provider, dict(provider_options or {}))]
    if provider != CPU:
        providers.append(CPU)  # for the few ops a GPU provider leaves to the CPU
    session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
    if provider not in session.get_providers():
        raise RuntimeError(
            f"ONNX Runtime could not start {provider} (available: {ort.get_available_providers()}, session uses "
            f"{session.get_providers()}): the CUDA or cuDNN libraries onnxruntime-gpu {ort.__version__} needs were not "
            "found. Install the matching CUDA/cuDNN, or call onnxruntime.preload_dlls() (onnxruntime-gpu >= 1.21) to "
            "load those of the nvidia-* pip packages PyTorch uses."
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
        self.device = "cuda" if self.provider == CUDA else "cpu"
        self.device_id = int(session.get_provider_options().get(self.provider, {}).get("device_id", 0))
        self.use_io_binding = self.device == "cuda" if use_io_binding is None else bool(use_io_binding)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_dtypes = {i.name: _ORT_TO_NUMPY.get(i.type, np.float32) for i in session.get_inputs()}
        self.adapters: list[str] = list(self.metadata.get("adapters") or [])
        self.prefix_adapters: dict[str, PrefixAdapter] = {}
        if self.task and self.metadata.get("task") not in (None, self.task):
            raise ValueError(
                f"{self.model_dir} holds a {self.metadata['task']} export; {type(self).__name__} serves {self.task}."
            )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, provider: str = CPU, *,
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
        if session_options is None and metadata.get("prefix_as") == "adapter_inputs":
            session_options = swappable_session_options()
        session = create_session(path, provider, session_options=session_options, provider_options=provider_options)
        return cls(session, config, model_dir, metadata, use_io_binding)

    # ------------------------------------------------------------------------------------------ prefix adapters
    def load_prefix_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Make the adapter file ``path`` (``export_prefix_adapter``) selectable as ``adapter=name`` in later calls.

        The graph must be exported with ``prefix_as="adapter_inputs"``; a file for another base model or of another
        geometry is refused. Costs one file read and (on CUDA) one copy to the device; the session is untouched, so
        adapters can be added or replaced while others are served. Returns the name (default: the adapter's own).
        """
        adapter = read_prefix_adapter(path, name, self.session, self.metadata, self.device, self.device_id)
        self.prefix_adapters[adapter.name] = adapter
        return adapter.name

    def unload_prefix_adapter(self, name: str) -> None:
        self._prefix_adapter(name)
        del self.prefix_adapters[name]

    def _prefix_adapter(self, name: str) -> PrefixAdapter:
        adapter = self.prefix_adapters.get(name)
        if adapter is None:
            loaded = sorted(self.prefix_adapters) or "none (use load_prefix_adapter)"
            raise KeyError(f"No prefix adapter named {name!r}; loaded: {loaded}.")
        return adapter

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
    def _run(self, feed: Mapping[str, Any], keep_on_device: Sequence[str] = (),
             adapter: str | None = None) -> dict[str, Any]:
        """Outputs by name: numpy arrays, except ``keep_on_device`` names, which stay ``OrtValue``s under IOBinding.
        ``adapter`` names a loaded prefix adapter to bind for this run (default: the graph's own prefix)."""
        prefix = self._prefix_adapter(adapter) if adapter is not None else None
        if not self.use_io_binding:
            arrays = {k: (v.numpy() if _is_ort_value(v) else v) for k, v in feed.items()}
            options = prefix.run_options if prefix is not None else None
            return dict(zip(self.output_names, self.session.run(None, arrays, options)))
        binding = self.session.io_binding()
        if prefix is not None:
            for name, value in prefix.values.items():
                binding.bind_ortvalue_input(name, value)
        for name, value in feed.items():
            if _is_ort_value(value):  # an OrtValue, possibly already on the device
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: value if name in keep_on_device else value.numpy()
                for name, value in zip(self.output_names, values)}

    def _forward_outputs(self, adapter: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        feed = self._prepare(**kwargs)
        return {name: torch.from_numpy(np.asarray(value)) for name, value in self._run(feed, adapter=adapter).items()}


def swappable_session_options(intra_op_threads: int = 0):
    """Session options for swappable-prefix graphs: ORT warns once per overridable initializer that it will not be
    constant-folded, which is exactly what makes the prefix swappable, so only errors are logged.
    ``intra_op_threads`` 0 is ORT's default (one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = intra_op_threads
    return options


def _is_ort_value(value) -> bool:
    return hasattr(value, "device_name")


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

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                past_key_values=None, cache_on_device: bool | None = None, adapter: str | None = None, **kwargs):
        """One pass, like the PyTorch model's forward. The cache comes as ``cache`` (transformers >= 5.24) or
        ``past_key_values`` (earlier releases) and is returned under the name the installed transformers uses.

        With IOBinding (CUDA), a cache of ``OrtValue``s is bound as is and the new cache comes back as ``OrtValue``s
        on the same device, so a decoding loop never copies the cache to the host; ``cache_on_device`` (default:
        whether the given cache holds ``OrtValue``s) asks for that explicitly, e.g. on the first step."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        past_key_values = _one_cache(cache, past_key_values)
        feed, keep = self._decoder_feed(input_ids, attention_mask, position_ids, past_key_values, **kwargs)
        if cache_on_device is None:
            cache_on_device = any(_is_ort_value(value) for value in _flatten_past(past_key_values) or ())
        on_device = bool(cache_on_device) and self.use_io_binding and self.can_use_cache and use_cache is not False
        out = self._run(feed, keep_on_device=keep if on_device else (), adapter=adapter)
        logits = torch.from_numpy(out["logits"])
        past = None
        if self.can_use_cache and use_cache is not False:
            flat = [out[name] if on_device else torch.from_numpy(np.asarray(out[name])) for name in self.present_names]
            past = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
        return CausalLMOutputWithPast(logits=logits, **cache_kwargs(past))

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
                feed[name] = value if _is_ort_value(value) else _to_numpy(value, self._past_dtype)
        return feed, self.present_names

    # ------------------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, adapter_ids=None, adapter_names=None,
                 adapter: str | None = None, generator: torch.Generator | None = None, generation_config=None,
                 **kwargs) -> torch.LongTensor:
        """Greedy or sampled decoding with the cache, as ``transformers``' ``generate`` does it for these settings:
        finished rows continue with ``pad_token_id``; decoding stops when every row finished or at the length cap.
        Settings (``max_new_tokens``, ``do_sample``, ``eos_token_id``, ...) as in ``DecodingSettings``."""
        ids = torch.as_tensor(_to_numpy(input_ids, np.int64))
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(_to_numpy(attention_mask, np.int64))
        settings = DecodingSettings.resolve(generation_config or self.generation_config, ids.shape[1], kwargs,
                                            type(self).__name__)
        rows = {"adapter_ids": adapter_ids, "adapter_names": adapter_names}
        state: dict[str, Any] = {"past": None, "mask": mask, "seen": 0}

        def step(ids: torch.Tensor) -> torch.Tensor:
            grown = ids.shape[1] - state["mask"].shape[1]
            if grown:
                state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(ids.shape[0], grown)], dim=1)
            # with a cache only the tokens added since the last step run; without one, the whole sequence again
            feed, _ = self._decoder_feed(ids[:, state["seen"] :], state["mask"], None, state["past"], **rows)
            out = self._run(feed, keep_on_device=self.present_names, adapter=adapter)
            if self.can_use_cache:
                state["past"], state["seen"] = [out[name] for name in self.present_names], ids.shape[1]
            return torch.from_numpy(np.asarray(out["logits"])[:, -1, :]).float()

        return decode(ids, step, settings, generator)


class ORTModelForSeq2SeqLM:
    """Encoder-decoder model (T5, BART) over Optimum's seq2seq files: ``encoder_model.onnx``, ``decoder_model.onnx``
    (first step: computes the cross-attention cache) and ``decoder_with_past_model.onnx`` (later steps).

    ``past_key_values`` are per layer ``(self key, self value, cross key, cross value)``, as in transformers' legacy
    format and Optimum. Every prefix is inside the graphs, so the caches hold real tokens only.
    """

    task: ClassVar[str] = "SEQ_2_SEQ_LM"
    main_input_name = "input_ids"

    def __init__(self, encoder: ORTModel, decoder: ORTModel, decoder_with_past: ORTModel | None, config,
                 model_dir: Path, metadata: dict | None = None) -> None:
        self.encoder, self.decoder, self.decoder_with_past = encoder, decoder, decoder_with_past
        self.config = config
        self.model_dir = Path(model_dir)
        self.metadata = metadata or {}
        if self.metadata.get("task") not in (None, self.task):
            raise ValueError(
                f"{self.model_dir} holds a {self.metadata['task']} export; {type(self).__name__} serves {self.task}."
            )
        self.provider, self.device = encoder.provider, encoder.device
        self.adapters = encoder.adapters
        self.can_use_cache = decoder_with_past is not None
        self.generation_config = _generation_config(self.model_dir, config)
        self.present_names = [n for n in decoder.output_names if n.startswith("present.")]
        with_past_inputs = decoder_with_past.input_names if decoder_with_past else []
        self.past_names = [n for n in with_past_inputs if n.startswith("past_key_values.")]
        self.self_present_names = [n for n in self.present_names if ".decoder." in n]

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, provider: str = CPU, *, session_options=None,
                        provider_options: Mapping[str, Any] | None = None, use_io_binding: bool | None = None,
                        use_cache: bool = True):
        from transformers import AutoConfig

        model_dir = Path(model_dir)
        for name in (L.ENCODER_FILE_NAME, L.DECODER_FILE_NAME):
            if not (model_dir / name).is_file():
                raise FileNotFoundError(
                    f"No {name} in {model_dir}; export an encoder-decoder model with exporters.onnx.export(...)."
                )
        metadata_path = model_dir / L.METADATA_FILE_NAME
        metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
        config = AutoConfig.from_pretrained(str(model_dir))

        def part(name: str) -> ORTModel:
            session = create_session(model_dir / name, provider, session_options=session_options,
                                     provider_options=provider_options)
            return ORTModel(session, config, model_dir, metadata, use_io_binding)

        with_past = use_cache and (model_dir / L.DECODER_WITH_PAST_FILE_NAME).is_file()
        decoder_with_past = part(L.DECODER_WITH_PAST_FILE_NAME) if with_past else None
        return cls(part(L.ENCODER_FILE_NAME), part(L.DECODER_FILE_NAME), decoder_with_past, config, model_dir,
                   metadata)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def get_encoder(self):
        return self.encode

    def encode(self, input_ids, attention_mask=None, adapter_ids=None, adapter_names=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        out = self.encoder._forward_outputs(input_ids=input_ids, attention_mask=attention_mask,
                                            adapter_ids=adapter_ids, adapter_names=adapter_names, **kwargs)
        return BaseModelOutput(last_hidden_state=out["last_hidden_state"])

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None,
                cache=None, use_cache=None, adapter_ids=None, adapter_names=None, past_key_values=None, **kwargs):
        """One decoder pass (encoding first unless ``encoder_outputs`` is given), like the PyTorch model's forward.
        The cache comes as ``cache`` or ``past_key_values``, and is returned under the installed transformers' name."""
        from transformers.modeling_outputs import Seq2SeqLMOutput

        past_key_values = _one_cache(cache, past_key_values)
        adapter = {"adapter_ids": adapter_ids, "adapter_names": adapter_names}
        unknown = [k for k, v in kwargs.items() if v is not None and k not in ("return_dict", "output_attentions",
                                                                               "output_hidden_states")]
        if unknown:
            raise TypeError(f"{type(self).__name__} got unsupported arguments {unknown}.")
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (start with the decoder start token).")
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (to encode) or encoder_outputs.")
            encoder_outputs = self.encode(input_ids, attention_mask, **adapter)
        hidden = encoder_outputs if isinstance(encoder_outputs, torch.Tensor) else encoder_outputs[0]
        if attention_mask is None:
            attention_mask = np.ones(tuple(hidden.shape[:2]), dtype=np.int64)
        past = _flatten_past(past_key_values, per_layer=4)
        out = self._decode_step(decoder_input_ids, attention_mask, hidden, past, adapter)
        logits = torch.from_numpy(np.asarray(out["logits"]))
        new_past = None
        if use_cache is not False and (self.can_use_cache or past is None):
            new_past = self._merge_past(out, past, to_torch=True)
        return Seq2SeqLMOutput(logits=logits, **cache_kwargs(new_past),
                               encoder_last_hidden_state=torch.as_tensor(np.asarray(hidden)))

    def _decode_step(self, ids, encoder_mask, hidden, past: list | None, adapter: dict,
                     keep_on_device: Sequence[str] = ()) -> dict[str, Any]:
        """Run ``decoder_model`` (no past) or ``decoder_with_past_model``; outputs by name."""
        ids = _to_numpy(ids, np.int64)
        mask = _to_numpy(encoder_mask, np.int64)
        if past is None:
            part = self.decoder
            feed = {"input_ids": ids, "encoder_attention_mask": mask,
                    "encoder_hidden_states": _to_numpy(hidden, part.input_dtypes["encoder_hidden_states"])}
        else:
            part = self.decoder_with_past
            if part is None:
                raise ValueError(f"{self.model_dir} was exported without {L.DECODER_WITH_PAST_FILE_NAME} (or loaded "
                                 "with use_cache=False): pass the whole decoder sequence without past_key_values.")
            if len(past) != len(self.past_names):
                raise ValueError(f"past_key_values holds {len(past)} tensors; the graph takes {len(self.past_names)} "
                                 "(per layer: self key, self value, cross key, cross value).")
            feed = {"input_ids": ids, "encoder_attention_mask": mask}
            dtype = part.input_dtypes[self.past_names[0]]
            for name, value in zip(self.past_names, past):
                feed[name] = value if _is_ort_value(value) else _to_numpy(value, dtype)
        if L.ADAPTER_IDS_INPUT in part.input_names:
            feed[L.ADAPTER_IDS_INPUT] = part._adapter_ids(adapter["adapter_ids"], adapter["adapter_names"],
                                                          ids.shape[0])
        elif adapter["adapter_ids"] is not None or adapter["adapter_names"] is not None:
            if not self.adapters:
                raise ValueError("This export holds a single adapter; adapter_ids/adapter_names do not apply.")
        return part._run(feed, keep_on_device=keep_on_device)

    def _merge_past(self, out: dict, past: list | None, to_torch: bool = False) -> tuple | list:
        """The next step's past: the new self-attention cache, and the cross-attention cache (computed at the first
        step, carried unchanged afterwards)."""
        if past is None:
            flat = [out[name] for name in self.present_names]
        else:
            own = [out[name] for name in self.self_present_names]
            flat = []
            for layer in range(len(own) // 2):
                flat.extend([own[2 * layer], own[2 * layer + 1], past[4 * layer + 2], past[4 * layer + 3]])
        if not to_torch:
            return flat
        tensors = [v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(
            v.numpy() if _is_ort_value(v) else v)) for v in flat]
        return tuple(tuple(tensors[i : i + 4]) for i in range(0, len(tensors), 4))

    # ------------------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, *, encoder_outputs=None, decoder_input_ids=None,
                 decoder_start_token_id: int | None = None, adapter_ids=None, adapter_names=None,
                 generator: torch.Generator | None = None, generation_config=None, **kwargs) -> torch.LongTensor:
        """Encode once, then decode greedily or by sampling with the cache (same loop and settings as
        ``ORTModelForCausalLM.generate``). Returns the decoder sequences, starting with the decoder start token."""
        config = generation_config or self.generation_config
        adapter = {"adapter_ids": adapter_ids, "adapter_names": adapter_names}
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (to encode) or encoder_outputs.")
            encoder_outputs = self.encode(input_ids, attention_mask, **adapter)
        hidden = encoder_outputs if isinstance(encoder_outputs, torch.Tensor) else encoder_outputs[0]
        batch = hidden.shape[0]
        mask = np.ones(tuple(hidden.shape[:2]), np.int64) if attention_mask is None else attention_mask
        if decoder_input_ids is None:
            start = decoder_start_token_id
            if start is None:
                start = getattr(config, "decoder_start_token_id", None)
            if start is None:
                start = getattr(self.config, "decoder_start_token_id", None)
            if start is None:
                raise ValueError("No decoder_start_token_id in the generation config or model config; pass one.")
            decoder_input_ids = torch.full((batch, 1), int(start), dtype=torch.long)
        ids = torch.as_tensor(_to_numpy(decoder_input_ids, np.int64))
        settings = DecodingSettings.resolve(config, ids.shape[1], kwargs, type(self).__name__)
        state: dict[str, Any] = {"past": None, "seen": 0}

        def step(ids: torch.Tensor) -> torch.Tensor:
            keep = self.present_names if self.can_use_cache else ()
            out = self._decode_step(ids[:, state["seen"] :], mask, hidden, state["past"], adapter, keep)
            if self.can_use_cache:
                state["past"], state["seen"] = self._merge_past(out, state["past"]), ids.shape[1]
            return torch.from_numpy(np.asarray(out["logits"])[:, -1, :]).float()

        return decode(ids, step, settings, generator)


def _one_cache(cache, past_key_values):
    """The cache a runtime call was given under either name; both at once is ambiguous."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the cache once: as cache= or as past_key_values=, not both.")
    return cache if cache is not None else past_key_values


def _flatten_past(past, per_layer: int = 2) -> list | None:
    """Flat past in graph order from a transformers cache or legacy tuples (``per_layer`` tensors per layer: 2 for
    decoders, 4 for encoder-decoders)."""
    if past is None:
        return None
    if hasattr(past, "self_attention_cache"):  # transformers' EncoderDecoderCache
        from .seq2seq import flatten_encoder_decoder_cache

        return flatten_encoder_decoder_cache(past) or None
    if hasattr(past, "layers") or hasattr(past, "key_cache"):  # a transformers Cache
        from .export import flatten_cache

        return flatten_cache(past) or None
    flat: list = []
    for item in past:
        if isinstance(item, (tuple, list)):
            flat.extend(item[:per_layer])
        else:
            flat.append(item)
    return flat or None


def _past_length(flat) -> int:
    if not flat:
        return 0
    shape = flat[0].shape() if callable(getattr(flat[0], "shape", None)) else flat[0].shape
    return int(shape[2])


# ------------------------------------------------------------------------------------------------- decoding
@dataclass
class DecodingSettings:
    """What ``generate`` does, resolved from its arguments over the generation config, as transformers does it for
    greedy search and sampling. ``start_length`` is the length of the sequence decoding continues (prompt, or the
    decoder start token)."""

    max_new_tokens: int
    do_sample: bool
    eos: set[int]
    pad: int | None
    processors: Any  # LogitsProcessorList: min length, forced BOS/EOS, repetition penalty, no-repeat n-grams
    warpers: Any  # LogitsProcessorList: temperature, top-k, top-p (sampling only)

    KEYS: ClassVar[tuple[str, ...]] = (
        "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
        "eos_token_id", "pad_token_id", "forced_bos_token_id", "forced_eos_token_id", "repetition_penalty",
        "no_repeat_ngram_size",
    )

    @classmethod
    def resolve(cls, config, start_length: int, kwargs: dict, owner: str) -> DecodingSettings:
        from transformers.generation import logits_process as lp

        if kwargs.pop("num_beams", 1) not in (None, 1):
            raise NotImplementedError(f"Beam search is not supported by {owner}.generate; use num_beams=1.")
        kwargs.pop("use_cache", None)
        unknown = sorted(k for k in kwargs if k not in cls.KEYS)
        if unknown:
            raise TypeError(f"generate() got unsupported arguments {unknown}.")

        def get(name: str, default=None):
            value = kwargs.get(name)
            return value if value is not None else getattr(config, name, default)

        max_new = kwargs.get("max_new_tokens")
        if max_new is None and kwargs.get("max_length") is None:
            max_new = getattr(config, "max_new_tokens", None)
        if max_new is None:
            max_new = max(0, (get("max_length", 20) or 20) - start_length)
        eos = _as_set(get("eos_token_id"))
        pad = get("pad_token_id")
        if eos and pad is None:
            pad = min(eos)
        processors = lp.LogitsProcessorList()
        if (get("repetition_penalty", 1.0) or 1.0) != 1.0:
            processors.append(lp.RepetitionPenaltyLogitsProcessor(float(get("repetition_penalty"))))
        if get("no_repeat_ngram_size", 0):
            processors.append(lp.NoRepeatNGramLogitsProcessor(int(get("no_repeat_ngram_size"))))
        min_new = max(int(get("min_new_tokens", 0) or 0), int(get("min_length", 0) or 0) - start_length)
        if eos and min_new > 0:
            processors.append(lp.MinNewTokensLengthLogitsProcessor(start_length, min_new, sorted(eos)))
        if get("forced_bos_token_id") is not None:
            processors.append(lp.ForcedBOSTokenLogitsProcessor(int(get("forced_bos_token_id"))))
        if get("forced_eos_token_id") is not None:
            processors.append(lp.ForcedEOSTokenLogitsProcessor(start_length + max_new, get("forced_eos_token_id")))
        do_sample = bool(get("do_sample", False))
        warpers = _warpers(config, kwargs.get("temperature"), kwargs.get("top_k"), kwargs.get("top_p"))
        return cls(int(max_new), do_sample, eos, pad, processors, warpers if do_sample else None)


def decode(ids: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], settings: DecodingSettings,
           generator: torch.Generator | None = None) -> torch.LongTensor:
    """The token loop shared by decoder-only and encoder-decoder models.

    ``step(ids)`` returns the next-token logits (batch, vocab) for the sequences so far; it keeps its own cache.
    """
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    eos = torch.tensor(sorted(settings.eos), dtype=torch.long)
    for _ in range(settings.max_new_tokens):
        scores = settings.processors(ids, step(ids))
        if settings.do_sample:
            scores = settings.warpers(ids, scores)
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
        else:
            token = scores.argmax(-1)
        if settings.pad is not None:
            token = torch.where(finished, torch.full_like(token, settings.pad), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        if settings.eos:
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
    return ids


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
    "SEQ_2_SEQ_LM": ORTModelForSeq2SeqLM,
}


def load(model_dir: str | Path, provider: str = CPU, **kwargs) -> ORTModel | ORTModelForSeq2SeqLM:
    """The right ``ORTModelFor*`` for an exported folder, read from its metadata."""
    metadata_path = Path(model_dir) / L.METADATA_FILE_NAME
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {L.METADATA_FILE_NAME}; pick the ORTModelFor* class yourself.")
    task = json.loads(metadata_path.read_text())["task"]
    return TASK_TO_CLASS[task].from_pretrained(model_dir, provider, **kwargs)

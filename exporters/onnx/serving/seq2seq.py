"""Served encoder-decoder models (T5, BART) over Optimum's seq2seq files: ``encoder_model.onnx``,
``decoder_model.onnx`` (first step: computes the cross-attention cache) and ``decoder_with_past_model.onnx`` (later
steps). Every prefix is inside the graphs, so the caches hold real tokens only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import AutoConfig
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from ptv2_plugin.transformers_compat import cache_kwargs

from .. import layout as L
from ..caches import SEQ2SEQ_PER_LAYER, flatten_cache, group_layers
from ..providers import CPU
from .generation import DecodingSettings, decode, generation_config
from .session import ORTModel, create_session, is_ort_value, one_cache, read_metadata, to_numpy


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
        self.generation_config = generation_config(self.model_dir, config)
        self.present_names = [n for n in decoder.output_names if n.startswith("present.")]
        with_past_inputs = decoder_with_past.input_names if decoder_with_past else []
        self.past_names = [n for n in with_past_inputs if n.startswith("past_key_values.")]
        self.self_present_names = [n for n in self.present_names if ".decoder." in n]

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, provider: str = CPU, *, session_options=None,
                        provider_options: Mapping[str, Any] | None = None, use_io_binding: bool | None = None,
                        use_cache: bool = True, metadata: dict | None = None):
        model_dir = Path(model_dir)
        for name in (L.ENCODER_FILE_NAME, L.DECODER_FILE_NAME):
            if not (model_dir / name).is_file():
                raise FileNotFoundError(
                    f"No {name} in {model_dir}; export an encoder-decoder model with exporters.onnx.export(...)."
                )
        metadata = read_metadata(model_dir) if metadata is None else metadata
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
        out = self.encoder._forward_outputs(input_ids=input_ids, attention_mask=attention_mask,
                                            adapter_ids=adapter_ids, adapter_names=adapter_names, **kwargs)
        return BaseModelOutput(last_hidden_state=out["last_hidden_state"])

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None,
                cache=None, use_cache=None, adapter_ids=None, adapter_names=None, past_key_values=None, **kwargs):
        """One decoder pass (encoding first unless ``encoder_outputs`` is given), like the PyTorch model's forward.
        The cache comes as ``cache`` or ``past_key_values``, and is returned under the installed transformers' name."""
        past_key_values = one_cache(cache, past_key_values)
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
        past = flatten_cache(past_key_values, per_layer=SEQ2SEQ_PER_LAYER) or None
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
        ids = to_numpy(ids, np.int64)
        mask = to_numpy(encoder_mask, np.int64)
        if past is None:
            part = self.decoder
            feed = {"input_ids": ids, "encoder_attention_mask": mask,
                    "encoder_hidden_states": to_numpy(hidden, part.input_dtypes["encoder_hidden_states"])}
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
                feed[name] = value if is_ort_value(value) else to_numpy(value, dtype)
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
            v.numpy() if is_ort_value(v) else v)) for v in flat]
        return group_layers(tensors, SEQ2SEQ_PER_LAYER)

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
        ids = torch.as_tensor(to_numpy(decoder_input_ids, np.int64))
        settings = DecodingSettings.resolve(config, ids.shape[1], kwargs, type(self).__name__)
        state: dict[str, Any] = {"past": None, "seen": 0}

        def step(ids: torch.Tensor) -> torch.Tensor:
            keep = self.present_names if self.can_use_cache else ()
            out = self._decode_step(ids[:, state["seen"] :], mask, hidden, state["past"], adapter, keep)
            if self.can_use_cache:
                state["past"], state["seen"] = self._merge_past(out, state["past"]), ids.shape[1]
            return torch.from_numpy(np.asarray(out["logits"])[:, -1, :]).float()

        return decode(ids, step, settings, generator)

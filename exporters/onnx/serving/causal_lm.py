"""Served decoder-only language models: one graph with Optimum's cache layout, a forward that accepts and returns
transformers' caches, and ``generate``. The prefix lives in the graph, so the cache holds real tokens only."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ptv2_plugin.transformers_compat import cache_kwargs

from ..caches import DECODER_PER_LAYER, flatten_cache, group_layers, past_length
from .generation import DecodingSettings, decode, generation_config
from .session import ORTModel, is_ort_value, one_cache, to_numpy


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
        self.generation_config = generation_config(self.model_dir, self.config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                past_key_values=None, cache_on_device: bool | None = None, adapter: str | None = None, **kwargs):
        """One pass, like the PyTorch model's forward. The cache comes as ``cache`` (transformers >= 5.24) or
        ``past_key_values`` (earlier releases) and is returned under the name the installed transformers uses.

        With IOBinding (CUDA), a cache of ``OrtValue``s is bound as is and the new cache comes back as ``OrtValue``s
        on the same device, so a decoding loop never copies the cache to the host; ``cache_on_device`` (default:
        whether the given cache holds ``OrtValue``s) asks for that explicitly, e.g. on the first step."""
        past_key_values = one_cache(cache, past_key_values)
        feed, keep = self._decoder_feed(input_ids, attention_mask, position_ids, past_key_values, **kwargs)
        if cache_on_device is None:
            cache_on_device = any(is_ort_value(value) for value in flatten_cache(past_key_values))
        on_device = bool(cache_on_device) and self.use_io_binding and self.can_use_cache and use_cache is not False
        out = self._run(feed, keep_on_device=keep if on_device else (), adapter=adapter)
        logits = torch.from_numpy(out["logits"])
        past = None
        if self.can_use_cache and use_cache is not False:
            flat = [out[name] if on_device else torch.from_numpy(np.asarray(out[name])) for name in self.present_names]
            past = group_layers(flat, DECODER_PER_LAYER)
        return CausalLMOutputWithPast(logits=logits, **cache_kwargs(past))

    def _decoder_feed(self, input_ids, attention_mask, position_ids, past_key_values, **kwargs):
        ids = to_numpy(input_ids, np.int64)
        batch, length = ids.shape
        past_flat = flatten_cache(past_key_values, per_layer=DECODER_PER_LAYER) or None
        past_len = past_length(past_flat)
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + length), dtype=np.int64)
        mask = to_numpy(attention_mask, np.int64)
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
            feed["position_ids"] = to_numpy(position_ids, np.int64)
        if self.past_names:
            if past_flat is None:
                empty = np.zeros((batch, self._kv_heads, 0, self._head_dim), dtype=self._past_dtype)
                past_flat = [empty] * len(self.past_names)
            if len(past_flat) != len(self.past_names):
                raise ValueError(
                    f"past_key_values holds {len(past_flat)} tensors; the graph takes {len(self.past_names)}."
                )
            for name, value in zip(self.past_names, past_flat):
                feed[name] = value if is_ort_value(value) else to_numpy(value, self._past_dtype)
        return feed, self.present_names

    # ------------------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, adapter_ids=None, adapter_names=None,
                 adapter: str | None = None, generator: torch.Generator | None = None, generation_config=None,
                 **kwargs) -> torch.LongTensor:
        """Greedy or sampled decoding with the cache, as ``transformers``' ``generate`` does it for these settings:
        finished rows continue with ``pad_token_id``; decoding stops when every row finished or at the length cap.
        Settings (``max_new_tokens``, ``do_sample``, ``eos_token_id``, ...) as in ``DecodingSettings``."""
        ids = torch.as_tensor(to_numpy(input_ids, np.int64))
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(to_numpy(attention_mask, np.int64))
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

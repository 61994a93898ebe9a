"""Token-by-token decoding for served generative models, as transformers' ``generate`` does it for greedy search and
sampling: settings resolved over the generation config, logits processors, and one loop shared by decoder-only and
encoder-decoder models (each supplies a ``step`` that keeps its own cache)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp


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
    temperature = getattr(config, "temperature", 1.0) if temperature is None else temperature
    top_k = getattr(config, "top_k", None) if top_k is None else top_k
    top_p = getattr(config, "top_p", None) if top_p is None else top_p
    processors = lp.LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        processors.append(lp.TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(lp.TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(lp.TopPLogitsWarper(top_p))
    return processors


def generation_config(model_dir: Path, config) -> GenerationConfig:
    """The folder's ``generation_config.json``, else the defaults transformers derives from the model config."""
    if (model_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(model_dir))
    return GenerationConfig.from_model_config(config)

"""Our own code never uses a deprecated name for the KV cache (transformers 5.24 renamed ``past_key_values`` to
``cache``): the deprecation is turned into an error during forward, generate, export and ONNX Runtime generate."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("onnxruntime")

from peft import get_peft_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.utils import generic  # noqa: E402

from exporters.onnx import ORTModelForCausalLM, ORTModelForSeq2SeqLM, export  # noqa: E402
from ptv2_plugin import PTuningV2Config  # noqa: E402
from ptv2_plugin.transformers_compat import (  # noqa: E402
    CACHE_NAME,
    LEGACY_CACHE_NAME,
    cache_from_output,
    cache_kwargs,
    checkpointing_arguments,
    checkpointing_enabled,
    enable_checkpointing,
)
from tests.exporter_matrix import DYNAMO, only  # noqa: E402
from tests.tiny_models import sample_inputs, tiny_model  # noqa: E402

DEPRECATED = r".*(past_key_values|cache_params).*"


class CacheNameDeprecation(AssertionError):
    """transformers warned that a deprecated cache name was used."""


@pytest.fixture
def cache_deprecations_are_errors(monkeypatch) -> Iterator[None]:
    """The argument rename warns with a FutureWarning; reading the old output field logs through ``warning_once``
    (cached: it would log once per process), so both are turned into errors here."""

    def warning_once(message, *args, **kwargs):
        if "past_key_values" in str(message) or "cache_params" in str(message):
            raise CacheNameDeprecation(str(message))

    monkeypatch.setattr(generic.logger, "warning_once", warning_once, raising=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=DEPRECATED, category=FutureWarning)
        yield


def _decoder(arch: str = "llama"):
    return get_peft_model(tiny_model(arch, "CAUSAL_LM"), PTuningV2Config(task_type="CAUSAL_LM", num_virtual_tokens=3))


def test_the_guard_catches_the_deprecated_name(cache_deprecations_are_errors):
    """Control: where transformers deprecated the old name, using it fails under the guard; elsewhere it is the
    current name and works."""
    model = tiny_model("llama", "CAUSAL_LM").eval()
    inputs = sample_inputs("llama", batch=1, length=3)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = cache_from_output(out)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3
        step = {"input_ids": inputs["input_ids"][:, :1], "attention_mask": torch.ones(1, 4, dtype=torch.long)}
        if CACHE_NAME == LEGACY_CACHE_NAME:
            assert model(**step, past_key_values=cache).logits.shape[1] == 1
        else:
            with pytest.raises(FutureWarning, match="past_key_values"):
                model(**step, past_key_values=cache)
            with pytest.raises(CacheNameDeprecation):
                _ = out.past_key_values


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_and_generate_use_the_current_name(cache_deprecations_are_errors, arch):
    model = _decoder(arch).eval()
    inputs = sample_inputs(arch, batch=2, length=4)
    inputs["attention_mask"][0, :2] = 0
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        step = {"input_ids": inputs["input_ids"][:, :1],
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)}
        assert model(**step, **cache_kwargs(cache_from_output(out))).logits.shape[:2] == (2, 1)
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, 7)


@pytest.mark.parametrize("exporter", only(DYNAMO))
def test_export_and_ort_generate_use_the_current_name(cache_deprecations_are_errors, tmp_path, exporter):
    model = _decoder("llama").eval()
    folder = export(model, tmp_path / "llama")  # traces with a cache and validates step by step
    runtime = ORTModelForCausalLM.from_pretrained(folder)
    inputs = sample_inputs("llama", batch=2, length=4)
    inputs["attention_mask"][0, :2] = 0
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
    assert runtime.generate(**inputs, **kwargs).tolist() == expected.tolist()
    step = runtime(**inputs)
    assert len(cache_from_output(step)) == model.config.num_hidden_layers


def test_seq2seq_export_and_generate_use_the_current_name(cache_deprecations_are_errors, tmp_path):
    model = get_peft_model(tiny_model("t5", "SEQ_2_SEQ_LM"),
                           PTuningV2Config(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)).eval()
    folder = export(model, tmp_path / "t5")
    runtime = ORTModelForSeq2SeqLM.from_pretrained(folder)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert runtime.generate(input_ids=ids, attention_mask=mask, **kwargs).tolist() == expected.tolist()


def test_runtime_takes_either_name_but_not_both(tmp_path):
    folder = export(_decoder("llama").eval(), tmp_path / "llama", validate=False)
    runtime = ORTModelForCausalLM.from_pretrained(folder)
    inputs = sample_inputs("llama", batch=1, length=3)
    first = cache_from_output(runtime(**inputs))
    step = {"input_ids": inputs["input_ids"][:, :1], "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    by_new, by_old = runtime(**step, cache=first).logits, runtime(**step, past_key_values=first).logits
    assert torch.equal(by_new, by_old)
    with pytest.raises(ValueError, match="not both"):
        runtime(**step, cache=first, past_key_values=first)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_training_uses_the_current_names(reentrant):
    model = _decoder("llama")  # get_peft_model itself is PEFT's code (it reads the old flag): outside the guard
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning)
        warnings.filterwarnings("error", category=DeprecationWarning)
        enable_checkpointing(model, use_reentrant=reentrant)
        assert checkpointing_enabled(model.get_base_model())
        model.train()
        inputs = sample_inputs("llama", batch=2, length=4)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.base_model.prefix_encoder().parameters() if p.requires_grad)
    arguments = checkpointing_arguments(use_reentrant=reentrant)
    assert list(arguments.values()) == [True, {"use_reentrant": reentrant}]

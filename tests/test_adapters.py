"""Several adapters on one model, unloading, configuration errors, position numbering, attention backends."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from ptv2_plugin import PTuningV2Config, PTuningV2Layer
from ptv2_plugin.attention import PrefixedAttentionConfig
from tests.tiny_models import DECODERS, ENCODERS, default_task, sample_inputs, tiny_model


def config(arch: str, **kwargs) -> PTuningV2Config:
    kwargs.setdefault("prefix_init_std", 1.0)
    return PTuningV2Config(task_type=default_task(arch), num_virtual_tokens=kwargs.pop("n", 3), **kwargs)


def logits(model, arch):
    with torch.no_grad():
        return model(**sample_inputs(arch)).logits


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_add_set_delete_and_disable(arch):
    base = tiny_model(arch)
    reference = logits(copy.deepcopy(base), arch)
    model = get_peft_model(base, config(arch)).eval()
    first = logits(model, arch)
    model.add_adapter("other", config(arch, n=5))
    assert torch.equal(logits(model, arch), first), "adding an adapter must not change the active one"
    model.set_adapter("other")
    other = logits(model, arch)
    assert not torch.allclose(other, first)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "ptv2_prefix_encoder" in n}
    assert trainable and all(".other." in n for n in trainable)
    with model.disable_adapter():
        assert torch.equal(logits(model, arch), reference)
    model.set_adapter("default")
    assert torch.equal(logits(model, arch), first)
    model.delete_adapter("other")
    assert "other" not in model.base_model.ptv2_prefix_encoder
    assert all("other" not in layer.ptv2_slot for layer in model.modules() if isinstance(layer, PTuningV2Layer))
    assert torch.equal(logits(model, arch), first)
    with pytest.raises(ValueError, match="not found"):
        model.base_model.set_adapter("missing")


def test_two_active_adapters_concatenate_their_prefixes():
    model = get_peft_model(tiny_model("llama"), config("llama", n=2)).eval()
    model.add_adapter("b", config("llama", n=3))
    model.base_model.set_adapter(["default", "b"])
    layer = next(m for m in model.modules() if isinstance(m, PTuningV2Layer))
    prefix = layer.prefix(layer.active_adapters)
    assert prefix.key.shape == (1, 2, 5, 8)  # two KV heads (GQA), 2 + 3 virtual tokens, head_dim 8


def test_unload_gives_back_the_untouched_base_model():
    base = tiny_model("gpt2")
    reference = logits(copy.deepcopy(base), "gpt2")
    model = get_peft_model(base, config("gpt2"))
    restored = model.unload()
    assert not any(isinstance(m, PTuningV2Layer) for m in restored.modules())
    assert not any(isinstance(getattr(m, "config", None), PrefixedAttentionConfig) for m in restored.modules())
    assert torch.equal(logits(restored.eval(), "gpt2"), reference)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        get_peft_model(tiny_model("gpt2"), config("gpt2")).merge_and_unload()


def test_gqa_gets_one_prefix_per_kv_head():
    model = get_peft_model(tiny_model("mistral"), config("mistral", n=4))
    key, value = model.base_model.prefix_encoder().all_key_values()[0]
    assert key.shape == value.shape == (2, 4, 8)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "modernbert", "gpt2", "llama", "gemma"])
def test_eager_and_sdpa_agree(arch):
    outputs = []
    for implementation in ("eager", "sdpa"):
        base = tiny_model(arch, attn_implementation=implementation)
        model = get_peft_model(base, config(arch)).eval()
        inputs = sample_inputs(arch)
        if arch in ENCODERS:
            inputs["attention_mask"][0, -2:] = 0
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_unsupported_attention_backend_is_refused_with_a_clear_error():
    base = tiny_model("llama")
    base.config._attn_implementation = "flex_attention"
    with pytest.raises(NotImplementedError, match="'eager' or 'sdpa'"):
        get_peft_model(base, config("llama"))


@pytest.mark.parametrize("arch", ["bert", "roberta", "llama"])
def test_shift_position_ids_numbers_real_tokens_from_n(arch):
    inputs = sample_inputs(arch)
    shifted = get_peft_model(tiny_model(arch), config(arch, shift_position_ids=True)).eval()
    plain = get_peft_model(tiny_model(arch), config(arch)).eval()
    plain.load_state_dict(shifted.state_dict())
    length = inputs["input_ids"].shape[1]
    start = 3 + (2 if arch == "roberta" else 0)  # RoBERTa numbers from padding_idx + 1 = 2
    explicit = torch.arange(start, start + length).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(shifted(**inputs).logits, plain(**inputs, position_ids=explicit).logits)
        assert not torch.allclose(shifted(**inputs).logits, plain(**inputs).logits)


def test_layers_to_transform_prefixes_only_those_layers():
    model = get_peft_model(tiny_model("bert", num_hidden_layers=3), config("bert", layers_to_transform=[1]))
    wrapped = [name for name, m in model.named_modules() if isinstance(m, PTuningV2Layer)]
    assert wrapped == ["base_model.model.bert.encoder.layer.1.attention.self"]
    assert len(model.base_model.prefix_encoder().slots) == 1


def test_no_projection_trains_free_key_values():
    model = get_peft_model(tiny_model("llama"), config("llama", prefix_projection=False, n=4))
    encoder = model.base_model.prefix_encoder()
    assert encoder.transform is None
    assert encoder.embedding.weight.shape == (4, 2 * (2 * 2 * 8))  # 4 tokens x (2 layers x K,V x 2 heads x 8)


def test_encoder_hidden_size_sets_the_mlp_width():
    model = get_peft_model(tiny_model("bert"), config("bert", encoder_hidden_size=7))
    assert model.base_model.prefix_encoder().transform[0].out_features == 7


def test_unknown_architecture_names_itself_and_the_fix():
    from transformers import MptConfig, MptForCausalLM

    base = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=64))
    with pytest.raises(ValueError, match=r"'mpt'.*target_modules"):
        get_peft_model(base, PTuningV2Config(task_type="CAUSAL_LM"))


def test_target_that_is_not_attention_is_refused():
    with pytest.raises(NotImplementedError, match="self-attention"):
        get_peft_model(tiny_model("llama"), PTuningV2Config(task_type="CAUSAL_LM", target_modules=["mlp"]))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_virtual_tokens": 0}, ValueError, "between 1 and"),
        ({"num_virtual_tokens": -3}, ValueError, "between 1 and"),
        ({"num_virtual_tokens": 100_000}, ValueError, "between 1 and"),
        ({"num_virtual_tokens": 2.5}, TypeError, "must be an int"),
        ({"num_virtual_tokens": True}, TypeError, "must be an int"),
        ({"prefix_dropout": 1.0}, ValueError, "prefix_dropout"),
        ({"encoder_hidden_size": 0}, ValueError, "encoder_hidden_size"),
        ({"prefix_init_std": 0.0}, ValueError, "prefix_init_std"),
        ({"prefix_projection": "yes"}, TypeError, "prefix_projection"),
        ({"layers_pattern": "layer"}, ValueError, "layers_to_transform"),
    ],
)
def test_bad_config_values_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        PTuningV2Config(task_type="SEQ_CLS", **kwargs)


def test_registration_is_idempotent():
    import importlib

    import peft

    import ptv2_plugin

    first = ptv2_plugin.register()
    importlib.reload(ptv2_plugin)
    assert ptv2_plugin.register() is first
    assert peft.PeftType("P_TUNING_V2") is first
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[first].__name__ == "PTuningV2Config"


@pytest.mark.parametrize("arch", DECODERS[:2])
def test_dtype_follows_a_half_precision_base(arch):
    model = get_peft_model(tiny_model(arch).to(torch.bfloat16), config(arch)).eval()
    with torch.no_grad():
        out = model(**sample_inputs(arch)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()

"""prefix_init (random, real_tokens, zeros) on an encoder (BERT), a GQA decoder (Llama) and T5, with and without the
MLP: what the layers receive at step 0, that loading never re-initialises, and config validation."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

from ptv2_plugin import PTuningV2Config, PTuningV2Layer
from ptv2_plugin import initialization as init_module
from ptv2_plugin.initialization import init_token_ids
from ptv2_plugin.transformers_compat import cache_from_output
from tests.tiny_models import tiny_model

ARCHS = [("bert", "SEQ_CLS"), ("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")]
N = 5


def _peft(arch: str, task: str, init: str, projection: bool, n: int = N, **kwargs):
    config = PTuningV2Config(task_type=task, num_virtual_tokens=n, prefix_projection=projection, prefix_init=init,
                             **kwargs)
    return get_peft_model(tiny_model(arch, task), config)


def _layers(model, adapter: str = "default") -> dict[str, PTuningV2Layer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PTuningV2Layer) and adapter in m.ptv2_slot}


def _emitted(model, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What each wrapped attention layer is handed as its prefix, (kv_heads, n, head_dim) keys and values."""
    out = {}
    for name, layer in _layers(model, adapter).items():
        prefix = layer.prefix([adapter])
        out[name] = (prefix.key[0].detach(), prefix.value[0].detach())
    return out


@torch.no_grad()
def _reference(model, arch: str, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The base model's own keys/values of ``ids`` in every prefixed module, read independently of the
    implementation: projection outputs for BERT and T5 (no rotary; T5's decoder and cross-attention included, the
    decoder reading the same tokens), the KV cache of a plain forward for Llama (keys after rotary)."""
    layers = _layers(model)
    if arch == "llama":
        with model.disable_adapter():
            cache = cache_from_output(model(input_ids=ids[None], use_cache=True))
        return {name: (cache.layers[layer.base_layer.layer_idx].keys[0], cache.layers[layer.base_layer.layer_idx]
                       .values[0]) for name, layer in layers.items()}
    store, handles = {}, []
    for name, layer in layers.items():
        base = layer.base_layer
        key, value = (base.key, base.value) if arch == "bert" else (base.k, base.v)
        heads = base.num_attention_heads if arch == "bert" else base.n_heads

        def shaped(o, heads=heads):
            return o[0].reshape(o.shape[1], heads, -1).transpose(0, 1)

        handles.append(key.register_forward_hook(lambda m, a, o, name=name: store.setdefault(name, {})
                                                 .update(k=shaped(o))))
        handles.append(value.register_forward_hook(lambda m, a, o, name=name: store.setdefault(name, {})
                                                   .update(v=shaped(o))))
    kwargs = {"decoder_input_ids": ids[None]} if arch == "t5" else {}
    with model.disable_adapter():
        model(input_ids=ids[None], **kwargs)
    for handle in handles:
        handle.remove()
    return {name: (kv["k"], kv["v"]) for name, kv in store.items()}


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max(float((a[k][i] - b[k][i]).abs().max()) for k in a for i in (0, 1))


def _scale(kv: dict) -> float:
    return max(float(t.abs().max()) for pair in kv.values() for t in pair)


@pytest.mark.parametrize("projection", [True, False], ids=["mlp", "no_mlp"])
@pytest.mark.parametrize("arch,task", ARCHS)
def test_real_tokens_start_as_the_models_own_keys_and_values(arch, task, projection):
    model = _peft(arch, task, "real_tokens", projection)
    ids = init_token_ids(model.peft_config["default"], model.config, N)
    reference = _reference(model, arch, ids)
    if arch == "t5":  # all three places: encoder self-, decoder self- and cross-attention
        assert {name.split(".")[-1] for name in reference} == {"SelfAttention", "EncDecAttention"}
        assert any(".decoder." in name for name in reference) and any(".encoder." in name for name in reference)
    scale = _scale(reference)
    assert scale > 0.05
    assert _max_diff(_emitted(model), reference) < 1e-4 * scale + 1e-6
    random_start = _peft(arch, task, "random", projection)
    assert _max_diff(_emitted(random_start), reference) > 0.3 * scale  # the default start is nothing like it


@pytest.mark.parametrize("projection", [True, False], ids=["mlp", "no_mlp"])
@pytest.mark.parametrize("arch,task", ARCHS)
def test_zeros_start_at_zero_and_still_learn(arch, task, projection):
    model = _peft(arch, task, "zeros", projection)
    emitted = _emitted(model)
    assert all(not k.any() and not v.any() for k, v in emitted.values())
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "labels": torch.tensor([1] if task == "SEQ_CLS" else
                                                                                [[4, 5, 6, 7]])}
    model.train()
    model(**batch).loss.backward()
    encoder = model.base_model.prefix_encoder()
    trained = encoder.transform[2].weight if projection else encoder.embedding.weight
    assert trained.grad is not None and trained.grad.abs().max() > 0


@pytest.mark.parametrize("projection", [True, False], ids=["mlp", "no_mlp"])
def test_gqa_decoder_with_shifted_positions_starts_as_a_hard_prompt(projection):
    """Llama (2 KV heads for 4 query heads): with shift_position_ids the real-token prefix is, at step 0, the same as
    writing the init tokens in front of the input: a behavioural check that needs no key/value bookkeeping."""
    model = _peft("llama", "CAUSAL_LM", "real_tokens", projection, shift_position_ids=True).eval()
    ids = init_token_ids(model.peft_config["default"], model.config, N)
    x = torch.tensor([[7, 9, 11, 13, 17, 19]])
    with torch.no_grad():
        prefixed = model(input_ids=x).logits
        with model.disable_adapter():
            prompted = model(input_ids=torch.cat([ids[None], x], dim=1)).logits[:, N:]
        random_start = _peft("llama", "CAUSAL_LM", "random", projection, shift_position_ids=True).eval()
        random_logits = random_start(input_ids=x).logits
    scale = float((random_logits - prompted).abs().max())
    assert scale > 0.05
    assert float((prefixed - prompted).abs().max()) < 1e-3 * scale


def test_real_tokens_on_some_layers_and_on_a_second_adapter():
    """layers_to_transform maps each slot to its own layer's keys; a new adapter's init sees the base model, not the
    prefix of the adapter already there."""
    model = _peft("llama", "CAUSAL_LM", "random", True)
    with torch.no_grad():
        for p in model.base_model.prefix_encoder().parameters():
            p.add_(0.5)  # the first adapter has "trained": its prefix would change the keys if it were left on
    config = PTuningV2Config(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_init="real_tokens",
                             layers_to_transform=[1], prefix_init_seed=7)
    model.add_adapter("second", config)
    ids = init_token_ids(config, model.config, 3)
    with torch.no_grad(), model.disable_adapter():
        cache = cache_from_output(model(input_ids=ids[None], use_cache=True))
    emitted = _emitted(model, "second")
    assert len(emitted) == 1
    key, value = next(iter(emitted.values()))
    assert torch.allclose(key, cache.layers[1].keys[0], atol=1e-5)
    assert torch.allclose(value, cache.layers[1].values[0], atol=1e-5)
    assert not torch.allclose(key, cache.layers[0].keys[0], atol=1e-2)


@pytest.mark.parametrize("arch,task", ARCHS)
def test_loading_restores_saved_weights_and_never_reinitialises(arch, task, tmp_path, monkeypatch):
    model = _peft(arch, task, "real_tokens", True)
    with torch.no_grad():
        for p in model.base_model.prefix_encoder().parameters():
            p.mul_(1.5).add_(0.01)  # as after training: the saved weights are no init's output
    saved = {k: v.clone() for k, v in model.base_model.prefix_encoder().state_dict().items()}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["prefix_init"] == "real_tokens"

    def refuse(*args, **kwargs):
        raise AssertionError("the init ran while loading")

    monkeypatch.setattr(init_module, "real_token_key_values", refuse)
    loaded = PeftModel.from_pretrained(tiny_model(arch, task), tmp_path)
    state = loaded.base_model.prefix_encoder().state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    loaded.load_adapter(tmp_path, adapter_name="again")  # the second load path (load_adapter) too
    again = loaded.base_model.prefix_encoder("again").state_dict()
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    with pytest.raises(AssertionError, match="the init ran"):  # and a new adapter does initialise
        get_peft_model(tiny_model(arch, task), PTuningV2Config(task_type=task, prefix_init="real_tokens"))


def test_init_tokens_are_deterministic_and_skip_special_tokens():
    model = tiny_model("llama", "CAUSAL_LM")
    config = PTuningV2Config(prefix_init="real_tokens", prefix_init_seed=3)
    first = init_token_ids(config, model.config, 64)
    assert torch.equal(first, init_token_ids(config, model.config, 64))
    assert not torch.equal(first, init_token_ids(PTuningV2Config(prefix_init="real_tokens", prefix_init_seed=4),
                                                 model.config, 64))
    special = {model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id}
    assert not special & set(first.tolist()) and int(first.max()) < model.config.vocab_size


def test_init_text_is_tokenized_and_repeated_to_n():
    from transformers import AutoTokenizer

    from examples.common import minilm_path

    config = PTuningV2Config(prefix_init="real_tokens", prefix_init_text="a great movie",
                             tokenizer_name_or_path=str(minilm_path()))
    words = AutoTokenizer.from_pretrained(minilm_path())("a great movie", add_special_tokens=False)["input_ids"]
    assert init_token_ids(config, None, 7).tolist() == (words * 3)[:7]
    no_tokenizer = PTuningV2Config(prefix_init="real_tokens", prefix_init_text="a great movie")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        init_token_ids(no_tokenizer, None, 7)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"prefix_init": "normal"}, ValueError, "prefix_init must be one of \\['random', 'real_tokens', 'zeros'\\]"),
        ({"prefix_init": None}, ValueError, "prefix_init must be one of"),
        ({"prefix_init_text": "hello"}, ValueError, "only used with prefix_init='real_tokens'"),
        ({"prefix_init": "real_tokens", "prefix_init_text": "  "}, ValueError, "non-empty text"),
        ({"prefix_init": "real_tokens", "prefix_init_text": 5}, TypeError, "prefix_init_text must be a string"),
        ({"prefix_init_seed": -1}, ValueError, "prefix_init_seed must be between"),
        ({"prefix_init_seed": "1"}, TypeError, "prefix_init_seed must be an int"),
        ({"tokenizer_name_or_path": 3}, TypeError, "tokenizer_name_or_path must be a string"),
    ],
)
def test_bad_init_settings_are_refused_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        PTuningV2Config(**kwargs)


def test_bad_init_in_a_saved_config_is_refused(tmp_path):
    PTuningV2Config(task_type="SEQ_CLS").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prefix_init": "bogus"}))
    with pytest.raises(ValueError, match="prefix_init must be one of"):
        PeftConfig.from_pretrained(tmp_path)


def test_the_init_forward_leaves_every_module_mode_as_it_was():
    base = tiny_model("bert", "SEQ_CLS").train()
    base.bert.embeddings.eval()  # a mode the user chose for one part
    config = PTuningV2Config(task_type="SEQ_CLS", prefix_init="real_tokens", prefix_projection=False)
    model = get_peft_model(base, config).base_model.model
    assert model.bert.encoder.training and model.classifier.training and not model.bert.embeddings.training
    assert not model.bert.embeddings.dropout.training

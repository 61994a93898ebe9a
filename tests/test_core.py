"""Core properties of P-Tuning v2, checked on a tiny model of every supported architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from ptv2_plugin import PTuningV2Config
from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs, enable_checkpointing
from tests.tiny_models import ARCHITECTURES, DECODERS, ENCODERS, default_task, sample_inputs, tiny_model


def make(arch: str, task: str | None = None, *, n: int = 4, init_std: float = 1.0, **config):
    task = task or default_task(arch)
    base = tiny_model(arch, task)
    reference = copy.deepcopy(base)
    cfg = PTuningV2Config(task_type=task, num_virtual_tokens=n, prefix_init_std=init_std, **config)
    return reference, get_peft_model(base, cfg).eval()


def loss_of(model, arch: str, inputs: dict) -> torch.Tensor:
    if arch in ENCODERS:
        return model(**inputs, labels=torch.tensor([0, 1])).loss
    return model(**inputs, labels=inputs["input_ids"]).loss


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_outputs_differ_and_disable_gives_base_exactly(arch):
    reference, model = make(arch)
    inputs = sample_inputs(arch)
    with torch.no_grad():
        base = reference(**inputs, output_hidden_states=True)
        tuned = model(**inputs, output_hidden_states=True)
        with model.disable_adapter():
            disabled = model(**inputs, output_hidden_states=True)
    assert (tuned.hidden_states[-1] - base.hidden_states[-1]).abs().max() > 1e-2
    assert not torch.equal(tuned.logits, base.logits)
    assert torch.equal(disabled.logits, base.logits)
    assert torch.equal(disabled.hidden_states[-1], base.hidden_states[-1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_prefix_and_head_train_and_every_prefix_parameter_gets_gradient(arch):
    _, model = make(arch)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    prefix = {name for name in trainable if ".ptv2_prefix_encoder." in name}
    head = trainable - prefix
    assert prefix, "no prefix parameters are trainable"
    assert all("modules_to_save" in name for name in head), head
    if arch in DECODERS:
        assert not head
    model.train()
    inputs = sample_inputs(arch)
    loss_of(model, arch, inputs).backward()
    for name, p in model.named_parameters():
        if name in prefix:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        elif not p.requires_grad:
            assert p.grad is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_few_steps_lower_the_loss(arch):
    _, model = make(arch, init_std=0.02)
    model.train()
    for module in model.modules():  # dropout off: compare losses, not noise
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = sample_inputs(arch, batch=2, length=6)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_of(model, arch, inputs)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("arch", ENCODERS)
def test_right_padding_does_not_change_real_tokens(arch):
    _, model = make(arch, "TOKEN_CLS")
    inputs = sample_inputs(arch, batch=1, length=5)
    padded_ids = torch.cat([inputs["input_ids"], torch.full((1, 3), model.config.pad_token_id or 0)], dim=1)
    padded_mask = torch.cat([inputs["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(**inputs).logits
        padded = model(input_ids=padded_ids, attention_mask=padded_mask).logits[:, :5]
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_left_padding_with_position_ids_does_not_change_real_tokens(arch):
    _, model = make(arch)
    inputs = sample_inputs(arch, batch=1, length=5)
    pad = torch.full((1, 3), 0)
    ids = torch.cat([pad, inputs["input_ids"]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(**inputs).logits
        padded = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_with_cache_matches_greedy_without_cache(arch):
    """Batched, left-padded generation: the same tokens with the cache, without it, and for each row alone."""
    _, model = make(arch)
    inputs = sample_inputs(arch, batch=3, length=5)
    inputs["attention_mask"][0, :1] = 0  # left-padded rows of different lengths
    inputs["attention_mask"][2, :3] = 0
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
        for row in range(3):
            real = inputs["input_ids"][row : row + 1, inputs["attention_mask"][row].bool()]
            alone = model.generate(input_ids=real, attention_mask=torch.ones_like(real), **kwargs)
            # and the same by hand: repeated full forwards, argmax of the last position
            ids = real
            for _ in range(6):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            assert torch.equal(alone, ids), (arch, row)
            assert torch.equal(cached[row, -6:], ids[0, -6:]), (arch, row)


@pytest.mark.parametrize("arch", DECODERS)
def test_prefix_never_enters_the_cache(arch):
    _, model = make(arch)
    inputs = sample_inputs(arch, batch=1, length=5)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert cache_from_output(out).get_seq_length() == 5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_decoder_matches_the_prefix_as_a_prefilled_cache(arch):
    """Independent reference: the base model given the prefix as past keys/values (positions kept unshifted)."""
    from transformers import DynamicCache

    reference, model = make(arch, n=3)
    encoder = model.base_model.prefix_encoder()
    inputs = sample_inputs(arch, batch=2, length=6)
    inputs["attention_mask"][1, :2] = 0
    cache = DynamicCache(config=reference.config) if _cache_takes_config() else DynamicCache()
    for layer, (k, v) in enumerate(encoder.all_key_values()):
        cache.update(k.unsqueeze(0).expand(2, -1, -1, -1), v.unsqueeze(0).expand(2, -1, -1, -1), layer)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(
            input_ids=inputs["input_ids"], attention_mask=mask, position_ids=position_ids, **cache_kwargs(cache)
        ).logits
        got = model(**inputs, position_ids=position_ids).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def _cache_takes_config() -> bool:
    import inspect

    from transformers import DynamicCache

    return "config" in inspect.signature(DynamicCache.__init__).parameters


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_encoder_attention_matches_a_hand_written_reference(arch):
    """softmax(Q [K_p; K]^T / sqrt(d)) [V_p; V] for one self-attention layer, written out by hand."""
    _, model = make(arch, n=3)
    layer = model.base_model.model.base_model.encoder.layer[0].attention.self
    attention = layer.base_layer
    key_prefix, value_prefix = model.base_model.prefix_encoder().all_key_values()[0]
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = layer(hidden)[0]
        heads, dim = 4, 8

        def split(x):
            return x.view(2, -1, heads, dim).transpose(1, 2)

        q, k, v = split(attention.query(hidden)), split(attention.key(hidden)), split(attention.value(hidden))
        k = torch.cat([key_prefix.unsqueeze(0).expand(2, -1, -1, -1), k], dim=2)
        v = torch.cat([value_prefix.unsqueeze(0).expand(2, -1, -1, -1), v], dim=2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5, dim=-1)
        expected = (weights @ v).transpose(1, 2).reshape(2, 5, heads * dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains_the_prefix(arch, reentrant):
    _, model = make(arch, init_std=0.02)
    enable_checkpointing(model, use_reentrant=reentrant)
    model.train()
    encoder = model.base_model.prefix_encoder()
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_of(model, arch, sample_inputs(arch)).backward()
    optimizer.step()
    for name, p in encoder.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change under checkpointing"


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_eval_forward_does_not_rerun_the_mlp(arch):
    _, model = make(arch)
    encoder = model.base_model.prefix_encoder()
    calls = []
    encoder.transform[0].register_forward_hook(lambda *_: calls.append(1))
    inputs = sample_inputs(arch)
    with torch.no_grad():
        first = model(**inputs).logits
        assert len(calls) == 1, "the MLP should run once for all layers"
        second = model(**inputs).logits
        assert len(calls) == 1, "a second eval forward ran the MLP again"
    assert torch.equal(first, second)
    # a weight update invalidates the cached prefix
    with torch.no_grad():
        encoder.transform[2].bias.add_(0.5)
        third = model(**inputs).logits
    assert len(calls) == 2
    assert not torch.equal(first, third)
    # training mode never uses the cache and runs the MLP per layer from the leaf parameters
    model.train()
    model(**inputs)
    assert len(calls) > 2


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"])
def test_encoder_task_types(task):
    reference, model = make("bert", task)
    inputs = sample_inputs("bert")
    with torch.no_grad():
        out = model(**inputs)
        base = reference(**inputs)
    first = out[0] if not hasattr(out, "logits") else out.logits
    expected = base[0] if not hasattr(base, "logits") else base.logits
    if task == "QUESTION_ANS":
        first, expected = out.start_logits, base.start_logits
    assert first.shape == expected.shape
    assert not torch.allclose(first, expected)
    head = {n for n, p in model.named_parameters() if p.requires_grad and "ptv2_prefix_encoder" not in n}
    if task == "FEATURE_EXTRACTION":
        assert not head
    else:
        assert head, f"{task} head should train"


def test_decoder_sequence_classification():
    reference, model = make("llama", "SEQ_CLS")
    inputs = sample_inputs("llama")
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, reference(**inputs).logits)
    assert any("score" in n for n, p in model.named_parameters() if p.requires_grad)

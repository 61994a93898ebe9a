"""The eval fast path (ptv2_plugin/serving_plan.py): one prefix table per forward, never stale, never where it
must not be.

The reference for "what the layers compute" is the same model with the table withheld (``general_path``): every
layer then looks its prefix up itself, as before the fast path existed.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from peft import get_peft_model

from ptv2_plugin import PTuningV2Config, PTuningV2Layer
from ptv2_plugin.attention import PLANNED_PREFIXES
from ptv2_plugin.serving_plan import ServingPlanner
from tests.tiny_models import ARCHITECTURES, SEQ2SEQ, default_task, sample_inputs, tiny_model


def make(arch: str, n: int = 4, **config):
    task = default_task(arch)
    cfg = PTuningV2Config(task_type=task, num_virtual_tokens=n, prefix_init_std=1.0, **config)
    return get_peft_model(tiny_model(arch, task), cfg).eval()


def padded_inputs(arch: str) -> dict[str, torch.Tensor]:
    inputs = sample_inputs(arch)
    inputs["attention_mask"][1, :2] = 0  # a padded row: the prefix must widen a real mask too
    return inputs


@contextmanager
def general_path():
    """Withhold the table: every layer finds its own prefix (the path training and mixed batches take)."""
    original = ServingPlanner.table
    ServingPlanner.table = lambda self: None
    try:
        yield
    finally:
        ServingPlanner.table = original


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def both_paths(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    fast = logits(model, inputs)
    with general_path():
        general = logits(model, inputs)
    return fast, general


@contextmanager
def counting_lookups():
    """Counts per-layer prefix lookups (``PTuningV2Layer.own_prefix``), the per-layer work the table replaces."""
    calls = []
    original = PTuningV2Layer.own_prefix

    def prefix(self, names):
        calls.append(self)
        return original(self, names)

    PTuningV2Layer.own_prefix = prefix
    try:
        yield calls
    finally:
        PTuningV2Layer.own_prefix = original


@pytest.mark.parametrize("arch", ARCHITECTURES + SEQ2SEQ)
def test_fast_path_equals_the_general_path_exactly(arch):
    model = make(arch)
    for inputs in (sample_inputs(arch), padded_inputs(arch)):
        fast, general = both_paths(model, inputs)
        assert torch.equal(fast, general)
    with torch.no_grad(), model.disable_adapter():
        base = model(**sample_inputs(arch)).logits
    assert (both_paths(model, sample_inputs(arch))[0] - base).abs().max() > 1e-2  # the prefix is in effect


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_eval_forwards_look_no_layer_up_once_the_table_is_built(arch):
    model = make(arch)
    inputs = sample_inputs(arch)
    layers = [m for m in model.modules() if isinstance(m, PTuningV2Layer)]
    with counting_lookups() as calls:
        logits(model, inputs)  # builds the table: one lookup per layer
        assert sorted(map(id, calls)) == sorted(map(id, layers))
        calls.clear()
        logits(model, inputs)
        logits(model, inputs)
        assert calls == []
        with general_path():
            logits(model, inputs)
        assert len(calls) == len(layers)  # the counter does see per-layer lookups
    assert PLANNED_PREFIXES.get() is None  # withdrawn after each forward


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_eval_output_equals_training_mode_without_dropout(arch):
    model = make(arch)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout_prob", None), float):  # BERT's SDPA attention on transformers 4.57
            module.dropout_prob = 0.0
    inputs = padded_inputs(arch)
    served = logits(model, inputs)
    model.train()
    trained = logits(model, inputs)  # per-layer MLP from the leaf parameters, no cache, no table
    model.eval()
    torch.testing.assert_close(served, trained, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits(model, inputs), served)  # back in eval: a fresh table, the same answer


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_weight_changes_after_an_eval_forward_reach_the_next_one(arch):
    model = make(arch)
    inputs = sample_inputs(arch)
    encoder = model.base_model.prefix_encoder()
    first = logits(model, inputs)
    with torch.no_grad():
        encoder.transform[2].bias.add_(0.5)  # in place (an optimizer step)
    second, general = both_paths(model, inputs)
    assert not torch.allclose(first, second) and torch.equal(second, general)
    encoder.embedding.weight = torch.nn.Parameter(encoder.embedding.weight.detach() * 2)  # a new parameter
    third, general = both_paths(model, inputs)
    assert not torch.allclose(second, third) and torch.equal(third, general)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_load_state_dict_after_an_eval_forward_is_served(arch):
    model, other = make(arch), make(arch)
    with torch.no_grad():
        for p in other.base_model.prefix_encoder().parameters():
            p.mul_(-1.5)
    inputs = sample_inputs(arch)
    before = logits(model, inputs)
    expected = logits(other, inputs)
    model.load_state_dict(other.state_dict())
    after = logits(model, inputs)
    assert not torch.allclose(before, after)
    assert torch.equal(after, expected)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_switching_adapters_never_serves_a_stale_table(arch):
    model = make(arch)
    task = default_task(arch)
    model.add_adapter("other", PTuningV2Config(task_type=task, num_virtual_tokens=6, prefix_init_std=1.0))
    inputs = sample_inputs(arch)
    first = logits(model, inputs)
    model.set_adapter("other")
    other, general = both_paths(model, inputs)
    assert not torch.allclose(first, other) and torch.equal(other, general)
    model.set_adapter("default")
    assert torch.equal(logits(model, inputs), first)
    model.delete_adapter("other")
    assert torch.equal(logits(model, inputs), first)


def test_several_active_adapters_take_the_fast_path_correctly():
    model = make("llama")  # a decoder: no task head, whose PEFT wrapper takes one active adapter only
    model.add_adapter("other", PTuningV2Config(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_init_std=1.0))
    model.base_model.set_adapter(["default", "other"])
    inputs = padded_inputs("llama")
    fast, general = both_paths(model, inputs)
    assert torch.equal(fast, general)
    with torch.no_grad():
        model.base_model.prefix_encoder("other").embedding.weight.add_(1.0)
    fast_again, general_again = both_paths(model, inputs)
    assert not torch.allclose(fast, fast_again) and torch.equal(fast_again, general_again)


def test_mixed_batches_and_disabled_adapters_after_eval_forwards():
    model = make("bert")
    model.add_adapter("other", PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=6, prefix_init_std=1.0))
    inputs = sample_inputs("bert")
    alone = logits(model, inputs)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["default", "other"]).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
    model.set_adapter("other")
    other = logits(model, inputs)
    torch.testing.assert_close(mixed[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], other[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(disabled, logits(tiny_model("bert", "SEQ_CLS"), inputs))  # the same seed: the base model


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_prefix_that_wants_gradients_is_never_served_from_the_table(arch):
    model = make(arch)  # eval mode, prefix trainable, grad enabled: every forward builds a fresh graph to the prefix
    inputs = sample_inputs(arch)
    encoder = model.base_model.prefix_encoder()

    def gradients() -> list[torch.Tensor]:
        encoder.zero_grad(set_to_none=True)
        model(**inputs).logits.sum().backward()
        return [p.grad.clone() for p in encoder.parameters()]

    with general_path():
        expected = gradients()
    for _ in range(2):  # the second backward would fail on a graph kept from the first
        for got, want in zip(gradients(), expected):
            assert got.abs().sum() > 0 and torch.equal(got, want)


def test_the_table_is_withdrawn_when_a_forward_raises():
    model = make("bert")
    layer = next(m for m in model.modules() if isinstance(m, PTuningV2Layer))

    def fail(*_):
        raise RuntimeError("boom")

    handle = layer.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model(**sample_inputs("bert"))
    handle.remove()
    assert PLANNED_PREFIXES.get() is None


def test_generation_takes_the_fast_path_and_matches_the_general_one():
    model = make("llama")
    inputs = sample_inputs("llama")
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        fast = model.generate(**inputs, **kwargs)
        with general_path():
            general = model.generate(**inputs, **kwargs)
    assert torch.equal(fast, general)


def test_a_deep_copy_serves_its_own_prefix_from_its_own_table():
    model = make("bert")
    inputs = sample_inputs("bert")
    first = logits(model, inputs)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.base_model.prefix_encoder().transform[2].bias.add_(0.5)
    with counting_lookups() as calls:
        changed = logits(twin, inputs)
        calls.clear()
        assert torch.equal(logits(twin, inputs), changed) and calls == []  # the twin's table, not the original's
    with general_path():
        assert torch.equal(logits(twin, inputs), changed)
    assert not torch.allclose(changed, first) and torch.equal(logits(model, inputs), first)

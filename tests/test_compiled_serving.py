"""Serving under torch.compile: dynamo traces a prefixed model's forward in one graph (no ContextVar, no per-layer
cache check), gives the eager logits, and never serves a stale prefix.

Dynamo runs with ``backend="eager"``: what is tested is what dynamo traces and guards, not inductor's kernels
(which would only add minutes of compilation to CI).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from peft import get_peft_model

from ptv2_plugin import PTuningV2Config, PTuningV2Layer
from ptv2_plugin.attention import InterfaceInjection
from tests.tiny_models import default_task, sample_inputs, tiny_model


def make(arch: str, n: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    task = default_task(arch)
    config = PTuningV2Config(task_type=task, num_virtual_tokens=n, prefix_init_std=1.0)
    return get_peft_model(tiny_model(arch, task), config).eval()


def kwargs_injected(model) -> bool:
    """Whether every prefixed layer hands its prefix to attention as a call argument (the graph-break-free path)."""
    layers = [m for m in model.modules() if isinstance(m, PTuningV2Layer)]
    return bool(layers) and all(isinstance(m.injection, InterfaceInjection) and m.injection.forwards_kwargs
                                for m in layers)


def compiled(model):
    torch._dynamo.reset()
    return torch.compile(model, backend="eager")


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# Each injection path: the attention interface with **kwargs passed plainly (BERT, GPT-2 on transformers 5) or inside
# a call with nested parentheses (Mistral's sliding_window), and inline attention (DeBERTa; BERT on 4.57).
PATHS = ["bert", "gpt2", "mistral", "deberta-v2"]


@pytest.mark.parametrize("arch", PATHS)
def test_compiled_eval_forward_matches_eager_and_follows_weight_changes(arch):
    model, inputs = make(arch), sample_inputs(arch)
    fast = compiled(model)
    eager = logits(model, inputs)
    with model.disable_adapter():
        base = logits(model, inputs)
    assert (eager - base).abs().max() > 1e-2  # the prefix matters, so the comparisons below can fail
    torch.testing.assert_close(logits(fast, inputs), eager, rtol=1e-5, atol=1e-5)
    encoder = model.base_model.prefix_encoder()
    with torch.no_grad():
        encoder.transform[2].bias.add_(0.5)  # in place, in eval: only the cache check can notice
    changed = logits(fast, inputs)  # compiled first: nothing eager refreshes the cache for it
    assert (changed - eager).abs().max() > 1e-2
    torch.testing.assert_close(changed, logits(model, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "mistral"])
def test_a_served_model_compiles_to_one_graph(arch):
    model, inputs = make(arch), sample_inputs(arch)
    if not kwargs_injected(model):
        pytest.skip(f"{arch} computes attention inline on this transformers version: it takes the ContextVar path")
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]


def test_compiled_mixed_batches_adapter_switches_and_disabling_stay_correct():
    model, inputs = make("llama"), sample_inputs("llama")
    model.add_adapter("other", PTuningV2Config(task_type=default_task("llama"), num_virtual_tokens=3,
                                               prefix_init_std=1.0))
    model.eval()
    fast = compiled(model)
    rows = ["other", "default"][: len(inputs["input_ids"])]
    with torch.no_grad():
        mixed = fast(**inputs, adapter_names=rows).logits
        torch.testing.assert_close(mixed, model(**inputs, adapter_names=rows).logits, rtol=1e-5, atol=1e-5)
        first = fast(**inputs).logits
        model.set_adapter("other")
        switched = fast(**inputs).logits
        assert (switched - first).abs().max() > 1e-2
        torch.testing.assert_close(switched, model(**inputs).logits, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(fast(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)

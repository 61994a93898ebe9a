"""One frozen model, many task prompts: ``model(**batch, adapter_names=[...])`` with one adapter per row."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from ptv2_plugin import PTuningV2Config
from tests.tiny_models import ARCHITECTURES, ENCODERS, SEQ2SEQ, default_task, sample_inputs, tiny_model

ROWS = ["a", "b", "__base__", "a"]


def two_adapter_model(arch: str, **overrides):
    task = default_task(arch)
    first = PTuningV2Config(task_type=task, num_virtual_tokens=2, prefix_init_std=1.0)
    model = get_peft_model(tiny_model(arch, **overrides), first, adapter_name="a")
    model.add_adapter("b", PTuningV2Config(task_type=task, num_virtual_tokens=5, prefix_init_std=1.0))
    with torch.no_grad():  # distinct task heads, as after training, so rows must pick their own
        for name, param in model.named_parameters():
            if "modules_to_save.b." in name:
                param.add_(torch.randn_like(param))
    return model.eval()


def batch(arch: str) -> dict:
    inputs = sample_inputs(arch, batch=len(ROWS), length=6)
    inputs["attention_mask"][1, -2:] = 0  # a padded row; decoders pad on the right here, which is fine
    return inputs


def single(model, inputs: dict, row: int, adapter: str) -> torch.Tensor:
    one = {k: v[row : row + 1] for k, v in inputs.items()}
    if adapter == "__base__":
        with model.disable_adapter():
            return model(**one).logits
    model.set_adapter(adapter)
    return model(**one).logits


CASES = [(arch, "default") for arch in ARCHITECTURES + SEQ2SEQ] + [
    # Their masks take other forms under eager attention (DistilBERT: 2-D on transformers 4.57).
    (arch, "eager") for arch in ("distilbert", "modernbert", "deberta-v2")
]


@pytest.mark.parametrize("arch,implementation", CASES)
def test_each_row_matches_its_adapter_alone(arch, implementation):
    overrides = {} if implementation == "default" else {"attn_implementation": implementation}
    model = two_adapter_model(arch, **overrides)
    inputs = batch(arch)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=ROWS).logits
        expected = [single(model, inputs, row, adapter) for row, adapter in enumerate(ROWS)]
    for row, adapter in enumerate(ROWS):
        real = inputs["attention_mask"][row].bool() if arch not in ENCODERS + SEQ2SEQ else slice(None)
        got, want = mixed[row : row + 1], expected[row]
        if arch not in ENCODERS + SEQ2SEQ:
            got, want = got[:, real], want[:, real]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"row {row} ({adapter})")
    assert not torch.allclose(expected[0], expected[2], atol=1e-4), "adapter rows must differ from base rows"


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"] if "t5" in SEQ2SEQ else ["bert", "llama", "bart"])
def test_backward_touches_only_adapters_in_the_batch(arch):
    model = two_adapter_model(arch)
    model.train()
    model.base_model.ptv2_prefix_encoder["b"].requires_grad_(True)  # both trainable
    inputs = sample_inputs(arch, batch=2)
    labels = torch.tensor([0, 1]) if arch in ENCODERS else inputs.get("decoder_input_ids", inputs["input_ids"])
    model(**inputs, labels=labels, adapter_names=["a", "__base__"]).loss.backward()
    encoders = model.base_model.ptv2_prefix_encoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoders["a"].parameters())
    assert all(p.grad is None for p in encoders["b"].parameters())


def test_mixed_batches_in_training_mode_keep_rows_apart():
    model = two_adapter_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.train()
    inputs = batch("bert")
    mixed = model(**inputs, adapter_names=ROWS).logits
    with torch.no_grad():
        expected = torch.cat([single(model, inputs, row, adapter) for row, adapter in enumerate(ROWS)])
    torch.testing.assert_close(mixed.detach(), expected, atol=1e-5, rtol=1e-5)


def test_bad_adapter_names_are_reported():
    model = two_adapter_model("bert")
    inputs = batch("bert")
    with pytest.raises(ValueError, match=r"unknown adapters \['c'\]"):
        model(**inputs, adapter_names=["a", "c", "a", "a"])
    with pytest.raises(ValueError, match="one adapter name per row"):
        model(**inputs, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="one adapter name"):
        model(**inputs, adapter_names="a")

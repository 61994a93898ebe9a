"""T5 and BART: prefixes in encoder self-attention, decoder self-attention and cross-attention."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model

from ptv2_plugin import PTuningV2Config, PTuningV2Layer
from ptv2_plugin.architectures import CROSS_ATTENTION, DECODER_SELF_ATTENTION, ENCODER_SELF_ATTENTION
from ptv2_plugin.transformers_compat import enable_checkpointing
from tests.child_process import run_python
from tests.tiny_models import SEQ2SEQ, sample_inputs, tiny_model

LOCATIONS = [ENCODER_SELF_ATTENTION, DECODER_SELF_ATTENTION, CROSS_ATTENTION]


def make(arch: str, init_std: float = 1.0, **kwargs):
    base = tiny_model(arch)
    reference = copy.deepcopy(base)
    config = PTuningV2Config(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, prefix_init_std=init_std, **kwargs)
    return reference, get_peft_model(base, config).eval()


def slots_by_location(model) -> dict[str, list[int]]:
    from ptv2_plugin.architectures import attention_location

    found: dict[str, list[int]] = {location: [] for location in LOCATIONS}
    for name, module in model.named_modules():
        if isinstance(module, PTuningV2Layer):
            found[attention_location(name)].append(module.ptv2_slot["default"])
    return found


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_all_three_locations_are_prefixed_and_disable_gives_base(arch):
    reference, model = make(arch)
    assert all(len(slots) == 2 for slots in slots_by_location(model).values())
    inputs = sample_inputs(arch)
    with torch.no_grad():
        base = reference(**inputs).logits
        tuned = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
    assert (tuned - base).abs().max() > 1e-3
    assert torch.equal(disabled, base)


@pytest.mark.parametrize("arch", SEQ2SEQ)
@pytest.mark.parametrize("location", LOCATIONS)
def test_switching_a_location_off_changes_the_output(arch, location):
    _, full = make(arch, prefix_projection=False)
    _, partial = make(arch, prefix_projection=False, **{f"prefix_{location}": False})
    assert slots_by_location(partial)[location] == []
    # Same prefix everywhere else: copy each remaining layer's block of the free prefix across.
    full_slots = {n: m.ptv2_slot["default"] for n, m in full.named_modules() if isinstance(m, PTuningV2Layer)}
    source, target = full.base_model.prefix_encoder(), partial.base_model.prefix_encoder()
    with torch.no_grad():
        for name, module in partial.named_modules():
            if isinstance(module, PTuningV2Layer):
                f, p = full_slots[name], module.ptv2_slot["default"]
                block = source.embedding.weight[:, source.offsets[f] : source.offsets[f + 1]]
                target.embedding.weight[:, target.offsets[p] : target.offsets[p + 1]] = block
    inputs = sample_inputs(arch)
    with torch.no_grad():
        a, b = full(**inputs, output_hidden_states=True), partial(**inputs, output_hidden_states=True)
    watched = "encoder_last_hidden_state" if location == ENCODER_SELF_ATTENTION else "decoder_hidden_states"
    first, second = getattr(a, watched), getattr(b, watched)
    if isinstance(first, tuple):
        first, second = first[-1], second[-1]
    changed = (first - second).abs().max()
    assert changed > 1e-2, f"switching off {location} changed nothing"


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_every_location_carries_gradient(arch):
    _, model = make(arch, init_std=0.5, prefix_projection=False)
    model.train()
    inputs = sample_inputs(arch)
    model(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
    encoder = model.base_model.prefix_encoder()
    grad = encoder.embedding.weight.grad
    for location, slots in slots_by_location(model).items():
        for slot in slots:
            block = grad[:, encoder.offsets[slot] : encoder.offsets[slot + 1]]
            assert block.abs().sum() > 0, f"{location} slot {slot} got no gradient"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("ptv2_prefix_encoder" in n for n in trainable)


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_encoder_padding_does_not_change_the_output(arch):
    _, model = make(arch)
    inputs = sample_inputs(arch, batch=1, length=5)
    pad = model.config.pad_token_id
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([inputs["input_ids"], torch.full((1, 3), pad)], dim=1)
    padded["attention_mask"] = torch.cat([inputs["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_generate_with_and_without_cache_agree(arch):
    _, model = make(arch)
    inputs = sample_inputs(arch, batch=2, length=6)
    inputs.pop("decoder_input_ids")
    inputs["attention_mask"][0, -2:] = 0
    kwargs = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert cached.shape[1] >= 7
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch", SEQ2SEQ)
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains_every_location(arch, reentrant):
    _, model = make(arch, init_std=0.02)
    enable_checkpointing(model, use_reentrant=reentrant)
    model.train()
    encoder = model.base_model.prefix_encoder()
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    inputs = sample_inputs(arch)
    model(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
    torch.optim.SGD(encoder.parameters(), lr=0.1).step()
    for name, p in encoder.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change under checkpointing"


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_save_and_load_in_a_fresh_process(arch, tmp_path):
    tiny_model(arch).save_pretrained(tmp_path / "base")
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, PTuningV2Config(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, prefix_init_std=1.0))
    model.eval().save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(**sample_inputs(arch)).logits
    script = textwrap.dedent(
        f"""
        import torch, ptv2_plugin
        from peft import PeftModel
        from transformers import AutoModelForSeq2SeqLM
        from tests.tiny_models import sample_inputs
        model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained({str(tmp_path / "base")!r}),
                                          {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            torch.save(model(**sample_inputs({arch!r})).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    run_python(script, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=0, rtol=0)
    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert slots_by_location(reloaded) == slots_by_location(model)


def test_t5_prefix_keys_get_no_relative_position_bias():
    """Reference for the first encoder layer's attention weights: softmax(q [k_prefix; k]^T + [0 | bias] + mask),
    with T5's own relative-position bias on the real keys and none on the prefix keys (they have no position)."""
    config = PTuningV2Config(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, prefix_init_std=1.0)
    model = get_peft_model(tiny_model("t5", attn_implementation="eager"), config).eval()
    attention = model.base_model.model.encoder.block[0].layer[0].SelfAttention
    assert isinstance(attention, PTuningV2Layer)
    base = attention.base_layer
    captured = {}
    hooks = [
        base.q.register_forward_hook(lambda m, a, o: captured.__setitem__("q", o)),
        base.k.register_forward_hook(lambda m, a, o: captured.__setitem__("k", o)),
    ]
    inputs = sample_inputs("t5")
    inputs["attention_mask"][1, -2:] = 0
    try:
        with torch.no_grad():
            weights = model(**inputs, output_attentions=True).encoder_attentions[0]
    finally:
        for hook in hooks:
            hook.remove()
    batch, length = inputs["input_ids"].shape
    heads, head_dim = base.n_heads, base.key_value_proj_dim

    def split(x):
        return x.view(batch, length, heads, head_dim).transpose(1, 2)

    prefix_key = model.base_model.prefix_encoder().all_key_values()[attention.ptv2_slot["default"]][0]
    keys = torch.cat([prefix_key.unsqueeze(0).expand(batch, -1, -1, -1), split(captured["k"])], dim=2)
    with torch.no_grad():
        with model.disable_adapter():
            bias = base.compute_bias(length, length)  # no prefix active: T5's bias among the real tokens
    mask = torch.zeros(batch, 1, 1, length).masked_fill(inputs["attention_mask"][:, None, None, :] == 0, -1e9)
    scores = split(captured["q"]) @ keys.transpose(-1, -2)
    scores = scores + torch.nn.functional.pad(bias + mask, (3, 0))
    torch.testing.assert_close(weights, scores.softmax(-1), atol=1e-5, rtol=1e-4)
    assert weights[..., :3].sum() > 0.01  # the prefix is actually attended



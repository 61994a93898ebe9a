"""Bad input gets an error that names the problem (configs, files, forward arguments)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

from ptv2_plugin import PTuningV2Config
from tests.tiny_models import sample_inputs, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    tiny_model("bert").save_pretrained(root / "base")
    base = AutoModelForSequenceClassification.from_pretrained(root / "base")
    get_peft_model(base, PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3)).save_pretrained(root / "adapter")
    return root


def load(base_folder, adapter_folder):
    return PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_folder), adapter_folder)


def edited_adapter(saved, tmp_path, **changes):
    config = json.loads((saved / "adapter" / "adapter_config.json").read_text())
    config.update(changes)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes((saved / "adapter" / "adapter_model.safetensors").read_bytes())
    return tmp_path


def test_adapter_on_a_model_with_another_hidden_size(saved, tmp_path):
    other = tiny_model("bert", hidden_size=48, intermediate_size=64)
    other.save_pretrained(tmp_path / "base48")
    with pytest.raises(
        ValueError, match=r"does not fit the base model: embedding.weight: adapter \(3, 32\), model \(3, 48\)"
    ):
        load(tmp_path / "base48", saved / "adapter")


def test_adapter_on_a_model_with_another_layer_count(saved, tmp_path):
    tiny_model("bert", num_hidden_layers=3).save_pretrained(tmp_path / "base3")
    with pytest.raises(ValueError, match=r"transform.2.weight: adapter \(128, 32\), model \(192, 32\)"):
        load(tmp_path / "base3", saved / "adapter")


def test_config_with_an_invalid_prefix_length(saved, tmp_path):
    with pytest.raises(ValueError, match="num_virtual_tokens must be between 1 and"):
        load(saved / "base", edited_adapter(saved, tmp_path, num_virtual_tokens=-1))


def test_config_with_a_string_where_a_number_belongs(saved, tmp_path):
    with pytest.raises(TypeError, match="num_virtual_tokens must be an int, got str"):
        load(saved / "base", edited_adapter(saved, tmp_path, num_virtual_tokens="3"))


def test_config_with_a_bad_dropout(saved, tmp_path):
    with pytest.raises(ValueError, match="prefix_dropout must be in"):
        load(saved / "base", edited_adapter(saved, tmp_path, prefix_dropout=7))


def test_truncated_weights_file(saved, tmp_path):
    folder = edited_adapter(saved, tmp_path)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)deserializ|incomplete|invalid|truncat"):
        load(saved / "base", folder)


def test_pickled_weights_are_refused(saved, tmp_path):
    folder = edited_adapter(saved, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load(saved / "base", folder)


@pytest.fixture()
def model():
    return get_peft_model(tiny_model("bert"), PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3)).eval()


def test_input_longer_than_the_position_table(model):
    ids = torch.randint(3, 100, (1, 65))
    with pytest.raises(ValueError, match="65 tokens; the prefix does not count.*64 positions"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_input_too_long_once_the_shifted_prefix_counts():
    model = get_peft_model(
        tiny_model("bert"), PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3, shift_position_ids=True)
    )
    ids = torch.randint(3, 100, (1, 63))
    with pytest.raises(ValueError, match=r"63 tokens plus the prefix's 3 positions"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_padding_without_an_attention_mask(model):
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    with pytest.raises(ValueError, match="padding id 0 but no attention_mask"):
        model(input_ids=ids)


def test_float_token_ids(model):
    with pytest.raises(TypeError, match="integer token ids, got dtype torch.float32"):
        model(input_ids=torch.ones(1, 4), attention_mask=torch.ones(1, 4))


def test_token_ids_outside_the_vocabulary(model):
    ids = torch.tensor([[5, 6, 500]])
    with pytest.raises(ValueError, match="vocabulary has 128 entries"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_mask_that_does_not_match_the_ids(model):
    ids = torch.randint(3, 100, (2, 5))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\) but input_ids \(2, 5\)"):
        model(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_mask_on_another_device(model):
    ids = torch.randint(3, 100, (2, 5))
    with pytest.raises(ValueError, match="attention_mask is on meta but input_ids on cpu"):
        model(input_ids=ids, attention_mask=torch.ones(2, 5, dtype=torch.long, device="meta"))


def test_embeddings_in_another_dtype(model):
    with pytest.raises(TypeError, match="inputs_embeds are torch.float64 on cpu but the model is torch.float32"):
        model(inputs_embeds=torch.zeros(1, 4, 32, dtype=torch.float64), attention_mask=torch.ones(1, 4))


def test_one_dimensional_ids(model):
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, sequence\)"):
        model(input_ids=torch.tensor([5, 6, 7]), attention_mask=torch.ones(3))


def test_all_prefix_locations_off():
    with pytest.raises(ValueError, match="All three prefix locations are switched off"):
        PTuningV2Config(
            prefix_encoder_self_attention=False, prefix_decoder_self_attention=False, prefix_cross_attention=False
        )


def test_two_adapters_may_not_both_shift_positions():
    model = get_peft_model(tiny_model("bert"), PTuningV2Config(task_type="SEQ_CLS", shift_position_ids=True))
    with pytest.raises(ValueError, match="Only one adapter on a model may use shift_position_ids"):
        model.add_adapter("second", PTuningV2Config(task_type="SEQ_CLS", shift_position_ids=True))


def test_good_input_still_runs(model):
    with torch.no_grad():
        assert model(**sample_inputs("bert")).logits.shape == (2, 2)

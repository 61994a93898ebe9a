"""Bad input gets an error that names the problem (configs, files, forward arguments)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from ptv2_plugin import PTuningV2Config, persistence
from ptv2_plugin.persistence import UnsafeWeightsError
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


# ----------------------------------------------------------------------- hostile or broken adapter_config.json
@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"encoder_hidden_size": 10**9}, ValueError, "encoder_hidden_size must be between 1 and 65536, got 1000000000"),
        ({"encoder_hidden_size": 200}, ValueError,
         r"encoder_hidden_size=200 is larger than 4 x the bert model's hidden size \(32\) = 128"),
        ({"target_modules": "(a+)+"}, ValueError, r"target_modules regex '\(a\+\)\+' has a repeat inside a repeated"),
        ({"target_modules": "(attention|self)*x"}, ValueError, "an alternation inside a repeated group"),
        ({"target_modules": ".*.*.*.*self"}, ValueError, r"4 unbounded repeats \(at most 3\)"),
        ({"target_modules": "a" * 300}, ValueError, "regex of 300 characters; at most 256"),
        ({"target_modules": "self["}, ValueError, "target_modules is not a valid regex"),
        ({"target_modules": ["self", 1]}, TypeError, "target_modules entries must be non-empty strings, got 1"),
        ({"target_modules": ["m"] * 2000}, ValueError, "target_modules has 2000 entries; at most 1024"),
        ({"exclude_modules": "(.*)*"}, ValueError, "exclude_modules regex"),
        ({"layers_to_transform": [0, 5]}, ValueError, r"layers_to_transform names layer 5, but the bert model has 2 "
                                                      r"layers \(0 to 1\)"),
        ({"layers_to_transform": ["0"]}, TypeError, "layers_to_transform entry must be an int, got str"),
        ({"layers_to_transform": [-1]}, ValueError, "layers_to_transform entry must be between 0 and"),
        ({"layers_to_transform": [1, 1]}, ValueError, "layers_to_transform lists a layer twice"),
        ({"layers_to_transform": [0], "layers_pattern": "layer.*"}, ValueError,
         r"layers_pattern entries must be plain dotted module names .* got 'layer\.\*'"),
        ({"modules_to_save": "classifier"}, TypeError, "modules_to_save must be a list of module names, got str"),
        ({"modules_to_save": [""]}, TypeError, "modules_to_save entries must be non-empty strings"),
        ({"prefix_init_std": float("inf")}, TypeError, "prefix_init_std must be a finite number"),
        ({"shift_position_ids": "yes"}, TypeError, r"shift_position_ids must be a bool \(true/false\), got str"),
        ({"inference_mode": "false"}, TypeError, "inference_mode must be a bool"),
        ({"num_virtual_tokens": 70, "shift_position_ids": True}, ValueError,
         "num_virtual_tokens=70 with shift_position_ids=True leaves no position for the input: the bert model has 64"),
        ({"auto_mapping": {"base_model_class": "system", "parent_library": "os"}}, ValueError,
         "auto_mapping.parent_library must name a transformers module, got 'os'"),
        ({"base_model_name_or_path": ["not", "a", "path"]}, TypeError, "base_model_name_or_path must be a string"),
    ],
)
def test_hostile_config_values_are_refused_before_anything_is_allocated(saved, tmp_path, changes, error, message):
    with pytest.raises(error, match=message):
        load(saved / "base", edited_adapter(saved, tmp_path, **changes))


def test_a_regex_from_a_config_file_that_is_safe_still_works(saved, tmp_path):
    model = load(saved / "base", edited_adapter(saved, tmp_path, target_modules=r".*\.attention\.(self)"))
    assert len([m for m in model.modules() if type(m).__name__ == "PTuningV2Layer"]) == 2


# ------------------------------------------------------------------------------ safetensors only, hub included
def bin_only_adapter(saved, folder):
    """The saved adapter with its weights as a pickle (what PEFT writes with safe_serialization=False)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_bytes((saved / "adapter" / "adapter_config.json").read_bytes())
    torch.save(load_file(saved / "adapter" / "adapter_model.safetensors"), folder / "adapter_model.bin")
    return folder


def test_bin_only_folder_gets_a_conversion_recipe(saved, tmp_path):
    folder = bin_only_adapter(saved, tmp_path / "bin")
    with pytest.raises(UnsafeWeightsError, match=r"only as adapter_model.bin \(a pickle\).*torch.load\("
                                                 r"'adapter_model.bin', weights_only=True\).*save_file"):
        load(saved / "base", folder)


def test_bin_only_folder_is_refused_on_every_load_path(saved, tmp_path):
    folder = bin_only_adapter(saved, tmp_path / "bin")
    model = load(saved / "base", saved / "adapter")
    with pytest.raises(UnsafeWeightsError, match="adapter_model.bin"):
        model.load_adapter(folder, adapter_name="second")
    config = PTuningV2Config.from_pretrained(str(folder))
    with pytest.raises(UnsafeWeightsError, match="adapter_model.bin"):
        PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(saved / "base"), folder,
                                  config=config)
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(UnsafeWeightsError, match="has no adapter_model.safetensors"):
        load(saved / "base", folder)


def hub_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache holding one snapshot of ``repo`` (the layout huggingface_hub reads offline)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return root


def test_hub_adapter_with_only_a_pickle_is_refused_offline(saved, tmp_path):
    """PEFT's offline path falls back to a cached adapter_model.bin; ours refuses it."""
    pickled = bin_only_adapter(saved, tmp_path / "bin")
    cache = hub_cache(tmp_path / "cache", "someone/tiny-ptv2", {
        "adapter_config.json": (pickled / "adapter_config.json").read_bytes(),
        "adapter_model.bin": (pickled / "adapter_model.bin").read_bytes(),
    })
    base = AutoModelForSequenceClassification.from_pretrained(saved / "base")
    with pytest.raises(UnsafeWeightsError, match=r"someone/tiny-ptv2 has no adapter_model.safetensors in the local "
                                                 r"cache .*weights_only=True"):
        PeftModel.from_pretrained(base, "someone/tiny-ptv2", cache_dir=str(cache))


def test_hub_adapter_with_safetensors_loads_offline(saved, tmp_path):
    cache = hub_cache(tmp_path / "cache", "someone/tiny-ptv2", {
        name: (saved / "adapter" / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")
    })
    base = AutoModelForSequenceClassification.from_pretrained(saved / "base")
    model = PeftModel.from_pretrained(base, "someone/tiny-ptv2", cache_dir=str(cache))
    assert model.base_model.prefix_encoder().embedding.weight.shape == (3, 32)


def test_hub_adapter_without_safetensors_is_refused_online(monkeypatch):
    """Online, the hub is asked whether the safetensors file exists (simulated: no network in tests)."""
    asked = []

    def fake_file_exists(repo_id, filename, **kwargs):
        asked.append((repo_id, filename, kwargs.get("revision")))
        return repo_id == "someone/safe"

    monkeypatch.setattr(persistence.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(persistence, "file_exists", fake_file_exists)
    with pytest.raises(UnsafeWeightsError, match="someone/pickled has no sub/adapter_model.safetensors on the hub"):
        persistence.require_safetensors("someone/pickled", subfolder="sub", revision="v1")
    persistence.require_safetensors("someone/safe")
    assert asked == [("someone/pickled", "sub/adapter_model.safetensors", "v1"),
                     ("someone/safe", "adapter_model.safetensors", None)]

"""Saving and loading adapters: a fresh process reproduces the logits and resumes training exactly."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from ptv2_plugin import PTuningV2Config
from tests.child_process import run_python
from tests.tiny_models import ARCHITECTURES, ENCODERS, default_task, sample_inputs, tiny_model

LOADER = textwrap.dedent(
    """
    import json, sys, torch
    import ptv2_plugin
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from tests.tiny_models import ENCODERS, sample_inputs

    for arch, folder in json.loads(sys.argv[1]).items():
        auto = AutoModelForSequenceClassification if arch in ENCODERS else AutoModelForCausalLM
        frozen = PeftModel.from_pretrained(auto.from_pretrained(folder + "/base"), folder + "/adapter").eval()
        with torch.no_grad():
            logits = frozen(**sample_inputs(arch)).logits
        trainable = PeftModel.from_pretrained(
            auto.from_pretrained(folder + "/base"), folder + "/adapter", is_trainable=True
        )
        encoder = trainable.base_model.prefix_encoder()
        state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        state["__logits__"] = logits
        assert all(p.requires_grad for p in encoder.parameters()), "is_trainable=True must train the prefix"
        assert not any(p.requires_grad for p in frozen.base_model.prefix_encoder().parameters())
        save_file(state, folder + "/reloaded.safetensors")
    """
)


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """Train each architecture one step (so weights are not the initial ones), save base + adapter + logits."""
    root = tmp_path_factory.mktemp("adapters")
    folders, expected = {}, {}
    for arch in ARCHITECTURES:
        folder = root / arch
        tiny_model(arch).save_pretrained(folder / "base")
        base = type(tiny_model(arch)).from_pretrained(folder / "base")  # records base_model_name_or_path
        model = get_peft_model(base, PTuningV2Config(task_type=default_task(arch), num_virtual_tokens=3))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        inputs = sample_inputs(arch)
        labels = torch.tensor([0, 1]) if arch in ENCODERS else inputs["input_ids"]
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
        model.save_pretrained(folder / "adapter")
        encoder_state = {k: v.detach().clone() for k, v in model.base_model.prefix_encoder().state_dict().items()}
        folders[arch] = str(folder)
        expected[arch] = (logits, encoder_state)
    run_python(LOADER, args=[json.dumps(folders)], timeout=300)
    return folders, expected


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fresh_process_reproduces_logits_and_resumes_exact_weights(saved_adapters, arch):
    folders, expected = saved_adapters
    logits, encoder_state = expected[arch]
    reloaded = load_file(os.path.join(folders[arch], "reloaded.safetensors"))
    torch.testing.assert_close(reloaded.pop("__logits__"), logits, atol=0, rtol=0)
    assert reloaded.keys() == encoder_state.keys()
    for key, value in encoder_state.items():
        assert torch.equal(reloaded[key], value), f"{key} differs after reload"


def test_adapter_file_holds_the_mlp_and_head_without_adapter_names(saved_adapters):
    folders, _ = saved_adapters
    state = load_file(os.path.join(folders["bert"], "adapter", "adapter_model.safetensors"))
    assert set(state) == {
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
        "base_model.ptv2_prefix_encoder.embedding.weight",
        "base_model.ptv2_prefix_encoder.transform.0.weight",
        "base_model.ptv2_prefix_encoder.transform.0.bias",
        "base_model.ptv2_prefix_encoder.transform.2.weight",
        "base_model.ptv2_prefix_encoder.transform.2.bias",
    }
    config = json.loads(open(os.path.join(folders["bert"], "adapter", "adapter_config.json")).read())
    assert config["peft_type"] == "P_TUNING_V2" and config["num_virtual_tokens"] == 3
    files = os.listdir(os.path.join(folders["bert"], "adapter"))
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files), "adapters are safetensors only"


def test_peft_config_and_auto_classes_load_our_adapters(saved_adapters):
    folders, expected = saved_adapters
    config = PeftConfig.from_pretrained(os.path.join(folders["bert"], "adapter"))
    assert isinstance(config, PTuningV2Config)
    for arch, auto in (("bert", AutoPeftModelForSequenceClassification), ("llama", AutoPeftModelForCausalLM)):
        model = auto.from_pretrained(os.path.join(folders[arch], "adapter")).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**sample_inputs(arch)).logits, expected[arch][0], atol=0, rtol=0)


def test_load_adapter_under_another_name_and_switch(saved_adapters):
    folders, expected = saved_adapters
    from transformers import AutoModelForSequenceClassification

    folder = folders["bert"]
    base = AutoModelForSequenceClassification.from_pretrained(os.path.join(folder, "base"))
    model = get_peft_model(base, PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=5)).eval()
    model.load_adapter(os.path.join(folder, "adapter"), adapter_name="trained")
    inputs = sample_inputs("bert")
    with torch.no_grad():
        fresh = model(**inputs).logits
        model.set_adapter("trained")
        trained = model(**inputs).logits
    torch.testing.assert_close(trained, expected["bert"][0], atol=0, rtol=0)
    assert not torch.allclose(fresh, trained)


def test_loading_with_a_different_prefix_length_fails_loudly(saved_adapters, tmp_path):
    folders, _ = saved_adapters
    state = load_file(os.path.join(folders["bert"], "adapter", "adapter_model.safetensors"))
    config = json.loads(open(os.path.join(folders["bert"], "adapter", "adapter_config.json")).read())
    config["num_virtual_tokens"] = 7
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(os.path.join(folders["bert"], "base"))
    expected = r"does not fit the base model: embedding.weight: adapter \(3, 32\), model \(7, 32\)"
    with pytest.raises(ValueError, match=expected):
        PeftModel.from_pretrained(base, str(tmp_path))

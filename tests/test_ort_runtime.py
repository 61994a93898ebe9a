"""ONNX Runtime models: transformers output classes, generate(), loading rules and errors; Optimum interop (4.57)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("onnxruntime")

from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput  # noqa: E402

from exporters.onnx import (  # noqa: E402
    ORTModelForCausalLM,
    ORTModelForSequenceClassification,
    ORTModelForTokenClassification,
    create_session,
    export,
    load,
    providers,  # noqa: E402
)
from exporters.onnx.providers import CPU, CUDA, missing_provider_message, wheel_clash  # noqa: E402
from ptv2_plugin.transformers_compat import cache_from_output  # noqa: E402
from tests.parity import assert_parity  # noqa: E402
from tests.test_export_onnx import batch, peft_model  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort")
    bert, llama = peft_model("bert"), peft_model("llama")
    return {
        "bert": (bert, export(bert, root / "bert")),
        "llama": (llama, export(llama, root / "llama")),
    }


def test_outputs_are_transformers_classes_and_load_picks_the_class(folders):
    model, folder = folders["bert"]
    runtime = load(folder)
    assert isinstance(runtime, ORTModelForSequenceClassification)
    inputs = batch(2, 5, right_pad=2)
    out = runtime(**inputs)
    assert isinstance(out, SequenceClassifierOutput) and isinstance(out.logits, torch.Tensor)
    # numpy and list inputs work too; a missing attention mask means "no padding"
    assert torch.equal(runtime(input_ids=inputs["input_ids"].numpy()).logits,
                       runtime(input_ids=inputs["input_ids"].tolist()).logits)
    lm = load(folders["llama"][1])
    step = lm(**batch(1, 4))
    assert isinstance(lm, ORTModelForCausalLM) and isinstance(step, CausalLMOutputWithPast)
    assert len(cache_from_output(step)) == lm.config.num_hidden_layers


def test_wrong_class_missing_files_and_bad_arguments(folders, tmp_path):
    _, folder = folders["bert"]
    with pytest.raises(ValueError, match="SEQ_CLS export"):
        ORTModelForTokenClassification.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        ORTModelForSequenceClassification.from_pretrained(tmp_path)
    runtime = ORTModelForSequenceClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match="single adapter"):
        runtime(**batch(1, 3), adapter_ids=[0])
    with pytest.raises(TypeError, match="unsupported"):
        runtime(**batch(1, 3), labels=torch.tensor([1]))
    lm = ORTModelForCausalLM.from_pretrained(folders["llama"][1])
    with pytest.raises(NotImplementedError, match="Beam search"):
        lm.generate(**batch(1, 3), num_beams=2)
    with pytest.raises(ValueError, match="attention_mask covers"):
        lm(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_generate_stops_at_eos_and_pads_finished_rows_like_transformers(folders):
    model, folder = folders["llama"]
    runtime = ORTModelForCausalLM.from_pretrained(folder)
    inputs = batch(3, 4, left_pad=1, seed=11)
    with torch.no_grad():
        free = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    eos = int(free[0, 5])  # a token row 0 really produces: it must finish there and pad afterwards
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
    actual = runtime.generate(**inputs, **kwargs)
    assert actual.tolist() == expected.tolist()


def test_sampling_is_reproducible_with_a_generator(folders):
    runtime = ORTModelForCausalLM.from_pretrained(folders["llama"][1])
    inputs = batch(2, 3, seed=5)
    kwargs = dict(max_new_tokens=5, do_sample=True, top_k=20, top_p=0.9, temperature=0.7, pad_token_id=0)
    first = runtime.generate(**inputs, generator=torch.Generator().manual_seed(3), **kwargs)
    second = runtime.generate(**inputs, generator=torch.Generator().manual_seed(3), **kwargs)
    assert first.shape == (2, 8) and torch.equal(first, second)


def test_unavailable_provider_is_an_error_that_names_the_active_onnxruntime(folders):
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the fallback check needs a CPU-only build")
    with pytest.raises(RuntimeError, match="CUDA was requested but the imported onnxruntime") as error:
        create_session(folders["bert"][1] / "model.onnx", CUDA)
    assert ort.__version__ in str(error.value) and 'pip install "ptv2-plugin[gpu]"' in str(error.value)


def test_two_onnxruntime_wheels_in_one_folder_are_reported(monkeypatch):
    fake_ort = SimpleNamespace(__version__="1.0", __file__="/site/onnxruntime/__init__.py",
                               get_available_providers=lambda: [CPU])
    clash = {"onnxruntime": "/site", "onnxruntime-gpu": "/site"}
    message = missing_provider_message(CUDA, fake_ort, clash)
    assert "onnxruntime and onnxruntime-gpu are installed side by side in /site" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in message and "/site/onnxruntime" in message
    # a GPU wheel in its own folder earlier on sys.path (pip install --target) does not clash
    assert wheel_clash({"onnxruntime": "/site", "onnxruntime-gpu": "/tmp/ortsite"}) is None
    assert "comes first on sys.path" in missing_provider_message(
        CUDA, fake_ort, {"onnxruntime": "/site", "onnxruntime-gpu": "/tmp/ortsite"})
    assert "onnxruntime-gpu is not installed" in missing_provider_message(CUDA, fake_ort, {"onnxruntime": "/site"})
    monkeypatch.setattr(providers, "installed_onnxruntime_wheels", lambda: clash)
    with pytest.warns(RuntimeWarning, match="side by side"):
        providers.warn_on_wheel_clash()


def test_io_binding_binds_outputs_to_the_sessions_device_id(folders, monkeypatch):
    runtime = ORTModelForSequenceClassification.from_pretrained(folders["bert"][1], use_io_binding=True)
    assert runtime.device_id == 0
    bound, make_binding = [], runtime.session.io_binding

    class RecordingBinding:
        def __init__(self) -> None:
            self.inner = make_binding()

        def bind_output(self, name, device_type="cpu", device_id=0):
            bound.append((name, device_type, device_id))
            self.inner.bind_output(name, device_type)  # a CPU session has device 0 only

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(runtime.session, "io_binding", RecordingBinding)
    runtime.device_id = 3  # as read from provider_options={"device_id": "3"} on a machine with four GPUs
    runtime(**batch(2, 4))
    assert bound == [("logits", "cpu", 3)]


def test_forward_keeps_an_ortvalue_cache_off_the_host(folders, monkeypatch):
    """With IOBinding (CUDA's path, exercised on CPU), a cache of OrtValues is bound back as is: per step only the
    logits are copied out, and the new cache comes back as OrtValues."""
    import onnxruntime as ort

    _, folder = folders["llama"]
    bound = ORTModelForCausalLM.from_pretrained(folder, use_io_binding=True)
    plain = ORTModelForCausalLM.from_pretrained(folder)
    inputs = batch(2, 5, seed=3)
    first = bound(**inputs, cache_on_device=True)
    expected = plain(**inputs)
    assert all(isinstance(t, ort.OrtValue) for layer in cache_from_output(first) for t in layer)
    torch.testing.assert_close(first.logits, expected.logits, atol=1e-6, rtol=0)
    copied, to_numpy = [], ort.OrtValue.numpy
    monkeypatch.setattr(ort.OrtValue, "numpy", lambda self: copied.append(tuple(self.shape())) or to_numpy(self))
    past, reference = cache_from_output(first), cache_from_output(expected)
    mask = inputs["attention_mask"]
    for step in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        token = {"input_ids": torch.full((2, 1), 7 + step), "attention_mask": mask}
        copied.clear()
        out = bound(**token, cache=past)  # our runtime takes either name
        assert copied == [(2, 1, bound.config.vocab_size)]  # the logits, nothing of the cache
        expected = plain(**token, cache=reference)
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=0)
        assert isinstance(cache_from_output(out)[0][0], ort.OrtValue)
        assert cache_from_output(out)[0][0].shape()[2] == 6 + step
        past, reference = cache_from_output(out), cache_from_output(expected)
    token = {"input_ids": torch.full((2, 1), 3), "attention_mask": torch.ones(2, mask.shape[1] + 1, dtype=mask.dtype)}
    assert isinstance(cache_from_output(bound(**token, cache=reference))[0][0], torch.Tensor)  # as given


# ------------------------------------------------------------------------------------------- Optimum interop
def _optimum():
    try:
        import optimum.onnxruntime as optimum_ort
    except ImportError as error:
        pytest.skip(f"optimum-onnx is not installed in this lane (it needs transformers < 4.58): {error}")
    return optimum_ort


def test_optimum_loads_the_sequence_classification_export(folders):
    optimum_ort = _optimum()
    model, folder = folders["bert"]
    runtime = optimum_ort.ORTModelForSequenceClassification.from_pretrained(folder)
    inputs = batch(3, 6, right_pad=2)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert_parity(runtime(**inputs).logits, expected)


def test_optimum_loads_the_causal_lm_export_and_generates_the_same_tokens(folders):
    optimum_ort = _optimum()
    model, folder = folders["llama"]
    runtime = optimum_ort.ORTModelForCausalLM.from_pretrained(folder)
    assert runtime.can_use_cache
    inputs = batch(2, 5, left_pad=2, seed=9)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        reference = model(**inputs, position_ids=positions).logits
    assert runtime.generate(**inputs, **kwargs).tolist() == expected.tolist()
    assert_parity(runtime(**inputs, position_ids=positions).logits, reference)


def test_io_binding_path_gives_the_same_tokens(folders):
    """The IOBinding code path (used on CUDA, cache kept as OrtValues) exercised on CPU."""
    model, folder = folders["llama"]
    runtime = ORTModelForCausalLM.from_pretrained(folder, use_io_binding=True)
    inputs = batch(2, 4, left_pad=1, seed=2)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
    assert runtime.generate(**inputs, **kwargs).tolist() == expected.tolist()
    encoder = ORTModelForSequenceClassification.from_pretrained(folders["bert"][1], use_io_binding=True)
    plain = ORTModelForSequenceClassification.from_pretrained(folders["bert"][1])
    inputs = batch(2, 5, right_pad=1)
    assert torch.equal(encoder(**inputs).logits, plain(**inputs).logits)

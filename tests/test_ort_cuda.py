"""ONNX Runtime on CUDA (float32 and float16). Skipped, with the reason, where the CUDA provider cannot really run.

Whether CUDA works is decided by running a session (``providers.cuda_unavailable_reason``), not by listing providers.
Sessions run with TF32 off (``cuda_provider_options()``), as export validation does, unless a test says otherwise.
"""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from exporters.onnx import (  # noqa: E402
    ORTModelForCausalLM,
    ORTModelForSequenceClassification,
    cuda_provider_options,
    export,
)
from exporters.onnx.providers import CUDA, cuda_unavailable_reason  # noqa: E402
from exporters.onnx.tolerances import default_tolerance  # noqa: E402
from exporters.onnx.validate import check_parity  # noqa: E402
from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs  # noqa: E402
from tests.parity import assert_parity  # noqa: E402
from tests.test_export_onnx import batch, peft_model, without_prefix  # noqa: E402


@pytest.fixture(scope="module")
def cuda():
    reason = cuda_unavailable_reason()  # runs a session: listing providers is not enough
    if reason:
        pytest.skip(reason)


def _runtime(cls, folder, **kwargs):
    return cls.from_pretrained(folder, provider=CUDA, provider_options=cuda_provider_options(), **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_encoder_on_cuda(cuda, tmp_path, dtype):
    model = peft_model("bert")
    folder = export(model, tmp_path / dtype, dtype=dtype)  # traced on CPU; the graph itself is device-agnostic
    runtime = _runtime(ORTModelForSequenceClassification, folder)
    assert runtime.provider == CUDA and runtime.use_io_binding and runtime.device_id == 0
    inputs = batch(3, 7, right_pad=3)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert_parity(runtime(**inputs).logits, expected, without_prefix=without_prefix(model, **inputs).logits,
                  dtype=dtype, provider=CUDA)
    report = check_parity(model, folder, provider=CUDA)
    assert report.ok and not report.tf32, report.lines()
    if dtype == "float32":  # TF32 on: looser bound, still far below the prefix's effect
        assert check_parity(model, folder, provider=CUDA, tf32=True).ok


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decoder_on_cuda_matches_values_and_tokens(cuda, tmp_path, dtype):
    model = peft_model("llama")
    folder = export(model, tmp_path / dtype, dtype=dtype)
    report = check_parity(model, folder, provider=CUDA)
    assert report.ok, report.lines()
    runtime = _runtime(ORTModelForCausalLM, folder)
    inputs = batch(2, 5, seed=3)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
        reference = model(input_ids=expected).logits  # teacher-forced over the whole sequence
    # values: every position of the generated sequence, in one pass
    assert_parity(runtime(input_ids=expected).logits, reference, dtype=dtype, provider=CUDA)
    # tokens: identical wherever PyTorch's choice is decisive (top-2 margin above twice the tolerance)
    tokens = runtime.generate(**inputs, **kwargs)
    prompt = inputs["input_ids"].shape[1]
    top2 = reference[:, prompt - 1 : -1].topk(2, dim=-1).values
    bound = default_tolerance(dtype, CUDA).bound(reference.abs().max().item())
    decisive = (top2[..., 0] - top2[..., 1]) > 2 * bound
    assert decisive.float().mean() >= 0.5, "too few decisive tokens for a meaningful check"
    for row in range(expected.shape[0]):
        undecided = (~decisive[row]).nonzero()
        agree_until = int(undecided[0]) + 1 if len(undecided) else decisive.shape[1]  # a tie may go either way
        assert tokens[row, prompt : prompt + agree_until].tolist() == expected[row, prompt : prompt + agree_until]\
            .tolist(), (row, decisive[row].tolist())
    if dtype == "float32":
        assert tokens.tolist() == expected.tolist()


def test_decoder_forward_keeps_the_cache_on_the_gpu(cuda, tmp_path):
    model = peft_model("llama")
    folder = export(model, tmp_path / "fp32")
    runtime = _runtime(ORTModelForCausalLM, folder)
    inputs = batch(2, 4, seed=1)
    out = runtime(**inputs, cache_on_device=True)
    with torch.no_grad():
        reference = model(**inputs, use_cache=True)
    mask = inputs["attention_mask"]
    for step in range(3):
        assert all(t.device_name() == "cuda" for layer in cache_from_output(out) for t in layer)
        assert_parity(out.logits, reference.logits, provider=CUDA, context=step)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        token = {"input_ids": torch.full((2, 1), 5 + step), "attention_mask": mask}
        out = runtime(**token, **cache_kwargs(cache_from_output(out)))
        with torch.no_grad():
            reference = model(**token, **cache_kwargs(cache_from_output(reference)), use_cache=True)

"""ONNX Runtime on CUDA (float32 and float16). Skipped, with the reason, where the CUDA provider cannot really run.

Whether CUDA works is decided by creating and running a session, not by listing providers: onnxruntime-gpu lists
CUDAExecutionProvider even when the driver, CUDA or cuDNN libraries are missing, and then silently runs on CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from exporters.onnx import ORTModelForCausalLM, ORTModelForSequenceClassification, export  # noqa: E402
from exporters.onnx.validate import check_parity  # noqa: E402
from tests.parity import assert_parity  # noqa: E402
from tests.test_export_onnx import batch, peft_model  # noqa: E402

CUDA = "CUDAExecutionProvider"


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    import numpy as np
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA])
        if session.get_providers()[0] != CUDA:
            return f"onnxruntime {ort.__version__} fell back to {session.get_providers()} (no usable CUDA device)"
        result = session.run(None, {"x": np.ones(2, dtype=np.float32)})[0]
        if result.tolist() != [2.0, 2.0]:
            return "CUDA session returned wrong results"
    except Exception as error:  # noqa: BLE001 - any failure to start or run means "no CUDA here"
        return f"CUDAExecutionProvider cannot run here: {type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="module")
def cuda():
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_encoder_on_cuda(cuda, tmp_path, dtype):
    model = peft_model("bert")
    folder = export(model, tmp_path / dtype, dtype=dtype)  # traced on CPU; the graph itself is device-agnostic
    runtime = ORTModelForSequenceClassification.from_pretrained(folder, provider=CUDA)
    assert runtime.provider == CUDA and runtime.use_io_binding
    inputs = batch(3, 7, right_pad=3)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert_parity(runtime(**inputs).logits, expected, dtype=dtype, provider=CUDA)
    assert check_parity(model, folder, provider=CUDA).ok


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decoder_on_cuda_keeps_the_cache_on_device(cuda, tmp_path, dtype):
    model = peft_model("llama")
    folder = export(model, tmp_path / dtype, dtype=dtype)
    runtime = ORTModelForCausalLM.from_pretrained(folder, provider=CUDA)
    report = check_parity(model, folder, provider=CUDA)
    assert report.ok, report.lines()
    inputs = batch(2, 5, left_pad=2, seed=3)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = runtime.generate(**inputs, **kwargs)
    assert tokens.shape == (2, 11)
    if dtype == "float32":
        with torch.no_grad():
            assert tokens.tolist() == model.generate(**inputs, **kwargs).tolist()

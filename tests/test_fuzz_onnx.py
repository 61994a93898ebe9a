"""Property-based parity of exported graphs: ONNX Runtime vs PyTorch on random padded batches.

One export per (architecture, prefix length, projection) is reused across examples. Short run in CI; the long run
is ``PTV2_FUZZ_EXAMPLES=1000 python -m pytest tests/test_fuzz_onnx.py`` (see README).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from ptv2_plugin import PTuningV2Config
from tests.parity import assert_parity
from tests.tiny_models import ARCHITECTURES, DECODERS, VOCAB, default_task, tiny_model

EXAMPLES = int(os.environ.get("PTV2_FUZZ_EXAMPLES", "12"))
WORKDIR = tempfile.mkdtemp(prefix="ptv2-fuzz-onnx-")
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)  # the cached exports live until the process ends


@functools.cache
def exported(arch: str, n: int, projection: bool):
    from exporters.onnx import export, load

    config = PTuningV2Config(
        task_type=default_task(arch), num_virtual_tokens=n, prefix_projection=projection, prefix_init_std=1.0
    )
    model = get_peft_model(tiny_model(arch), config).eval()
    folder = tempfile.mkdtemp(prefix=f"{arch}-{n}-{projection}-", dir=WORKDIR)
    export(model, folder, validate=False, with_past=False)
    return model, load(folder)


@st.composite
def cases(draw):
    # the prefix lengths and projections drawn from a small set so that exports are reused
    arch = draw(st.sampled_from(ARCHITECTURES))
    n = draw(st.sampled_from([1, 4]))
    projection = draw(st.booleans()) if EXAMPLES > 50 else True
    lengths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**16))
    return arch, n, projection, lengths, seed


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases())
def test_onnx_runtime_matches_pytorch(case):
    arch, n, projection, lengths, seed = case
    model, session = exported(arch, n, projection)
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        if arch in DECODERS:
            mask[row, width - length :] = 1
        else:
            mask[row, :length] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch in DECODERS:
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    got = torch.as_tensor(np.asarray(session(**{k: v.numpy() for k, v in inputs.items()}).logits))
    if arch in DECODERS:  # compare the real positions only
        real = mask.bool()
        expected, got, base = expected[real], got[real], base[real]
    assert_parity(got, expected, without_prefix=base, context=case)

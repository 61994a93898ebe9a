"""Property-based parity: random architecture, batch, lengths, padding, prefix length, projection, adapters.

Short run in CI; the long run is ``PTV2_FUZZ_EXAMPLES=1000 python -m pytest tests/test_fuzz.py`` (see README).
"""

from __future__ import annotations

import functools
import os
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model

from ptv2_plugin import PTuningV2Config
from tests.tiny_models import ARCHITECTURES, DECODERS, SEQ2SEQ, VOCAB, default_task, tiny_model

EXAMPLES = int(os.environ.get("PTV2_FUZZ_EXAMPLES", "20"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 50,  # the CI run is reproducible; the long run explores
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.lru_cache(maxsize=64)
def adapted(arch: str, n: tuple[int, ...], projection: bool):
    """One model per combination, with one adapter per entry of ``n`` (names a0, a1, ...)."""
    task = default_task(arch)
    configs = [
        PTuningV2Config(task_type=task, num_virtual_tokens=k, prefix_projection=projection, prefix_init_std=1.0)
        for k in n
    ]
    model = get_peft_model(tiny_model(arch), configs[0], adapter_name="a0")
    for index, config in enumerate(configs[1:], start=1):
        model.add_adapter(f"a{index}", config)
    return model.eval()


@st.composite
def cases(draw):
    arch = draw(st.sampled_from(ARCHITECTURES + SEQ2SEQ))
    n = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    lengths[0] = length  # at least one full row
    rows = draw(
        st.lists(st.sampled_from([f"a{i}" for i in range(len(n))] + ["__base__"]), min_size=batch, max_size=batch)
    )
    seed = draw(st.integers(0, 2**16))
    return arch, n, draw(st.booleans()), lengths, rows, seed


def make_batch(arch: str, lengths: list[int], seed: int) -> tuple[dict, list[slice]]:
    """Right padding for encoders and encoder-decoders, left padding (with position ids) for decoders."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    real = []
    for row, length in enumerate(lengths):
        span = slice(width - length, width) if arch in DECODERS else slice(0, length)
        mask[row, span] = 1
        ids[row, mask[row] == 0] = 0
        real.append(span)
    batch = {"input_ids": ids, "attention_mask": mask}
    if arch in DECODERS:
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if arch in SEQ2SEQ:
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (len(lengths), 3), generator=generator)
    return batch, real


def row_alone(model, batch: dict, row: int, span: slice, arch: str, adapter: str) -> torch.Tensor:
    single = {k: v[row : row + 1] for k, v in batch.items()}
    single["input_ids"] = single["input_ids"][:, span]
    single["attention_mask"] = single["attention_mask"][:, span]
    if "position_ids" in single:
        single["position_ids"] = single["position_ids"][:, span]
    if adapter == "__base__":
        with model.disable_adapter():
            return model(**single).logits
    model.set_adapter(adapter)
    return model(**single).logits


@FUZZ
@given(cases())
def test_mixed_padded_batch_matches_each_row_alone(case):
    arch, n, projection, lengths, rows, seed = case
    model = adapted(arch, n, projection)
    batch, real = make_batch(arch, lengths, seed)
    with torch.no_grad():
        first = model(**batch, adapter_names=rows).logits
        second = model(**batch, adapter_names=rows).logits
        assert torch.equal(first, second), "a second eval forward changed the output"
        for row, (span, adapter) in enumerate(zip(real, rows)):
            alone = row_alone(model, batch, row, span, arch, adapter)
            got = first[row : row + 1]
            if arch in DECODERS:  # token logits: compare the real positions
                got = got[:, span]
            torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-4, msg=f"{case}: row {row}")


@FUZZ
@given(cases())
def test_save_and_load_reproduce_every_adapter(case):
    arch, n, projection, lengths, rows, seed = case
    model = adapted(arch, n, projection)
    batch, _ = make_batch(arch, lengths, seed)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = None
        for index in range(len(n)):
            path = os.path.join(folder, f"a{index}")  # PEFT saves non-"default" adapters in subfolders
            if reloaded is None:
                reloaded = PeftModel.from_pretrained(tiny_model(arch), path, adapter_name="a0").eval()
            else:
                reloaded.load_adapter(path, adapter_name=f"a{index}")
    with torch.no_grad():
        expected = model(**batch, adapter_names=rows).logits
        got = reloaded(**batch, adapter_names=rows).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)

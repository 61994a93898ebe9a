"""Parity check run by ``export``: PyTorch (the PeftModel, as users run it) against ONNX Runtime on the same inputs.

Several batch sizes and lengths with padded rows; decoders are stepped from an empty past, so the check also proves
the prefix never entered the cache. Encoder-decoder models: the encoder output, the first decoder pass (padded
encoder rows) and several cached steps are compared, and the caches themselves. With several adapters, each row's
adapter is compared with PyTorch running that adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs

from . import layout as L
from .caches import flatten_cache
from .providers import CPU, CUDA, cuda_provider_options
from .sample_inputs import sample_inputs
from .serving import load
from .serving.session import read_metadata
from .tolerances import Tolerance, default_tolerance

ENCODER_SHAPES = ((1, 4), (2, 7), (3, 11))
DECODER_SHAPES = ((1, 3), (3, 6))
DECODE_STEPS = 3
SEQ2SEQ_SHAPES = ((1, 4, 1), (3, 7, 3))  # batch, encoder length, decoder length of the first pass


@dataclass(frozen=True)
class ParityCase:
    name: str
    diff: float  # max |PyTorch - ONNX Runtime|
    reference_max: float  # max |PyTorch|, which scales the allowed difference


@dataclass
class ParityReport:
    tolerance: Tolerance
    provider: str
    cases: list[ParityCase] = field(default_factory=list)
    tf32: bool = False  # CUDA float32 MatMuls were allowed TF32 (on both sides)

    @property
    def atol(self) -> float:
        return self.tolerance.atol

    @property
    def max_abs_diff(self) -> float:
        return max((c.diff for c in self.cases), default=0.0)

    def _ratio(self, case: ParityCase) -> float:
        """How much of its allowance a case uses (above 1: failed)."""
        bound = self.tolerance.bound(case.reference_max)
        return case.diff / bound if bound > 0 else float("inf")

    @property
    def worst_case(self) -> ParityCase | None:
        return max(self.cases, key=self._ratio) if self.cases else None

    @property
    def worst(self) -> str:
        return self.worst_case.name if self.cases else "-"

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(self.tolerance.allows(c.diff, c.reference_max) for c in self.cases)

    def add(self, case: str, reference: torch.Tensor, actual: torch.Tensor) -> None:
        if reference.shape != actual.shape:
            raise AssertionError(f"{case}: ONNX output shape {tuple(actual.shape)} != PyTorch {tuple(reference.shape)}")
        if not reference.numel():
            self.cases.append(ParityCase(case, 0.0, 0.0))
            return
        expected = reference.detach().float().cpu()
        got = torch.as_tensor(actual).float()
        diff = (expected - got).abs().max().item()
        if not torch.isfinite(got).all():
            diff = float("inf")  # NaN compares false with any bound; inf fails it explicitly
        self.cases.append(ParityCase(case, float(diff), float(expected.abs().max().item())))

    def as_dict(self) -> dict:
        worst = self.worst_case
        return {"max_abs_diff": self.max_abs_diff, "atol": self.tolerance.atol, "rtol": self.tolerance.rtol,
                "provider": self.provider, "tf32": self.tf32, "ok": self.ok, "cases": len(self.cases),
                "worst_case": self.worst, "worst_diff": worst.diff if worst else 0.0,
                "worst_bound": self.tolerance.bound(worst.reference_max) if worst else 0.0}

    def worst_detail(self) -> str:
        worst = self.worst_case
        if worst is None:
            return "no comparisons"
        allowed = self.tolerance.bound(worst.reference_max)
        return (f"worst: {worst.name}, |diff| {worst.diff:.3g} vs allowed {allowed:.3g} "
                f"(max|torch| {worst.reference_max:.3g})")

    def lines(self) -> list[str]:
        status = "OK" if self.ok else "FAILED"
        return [
            f"Parity ({self.provider}, {len(self.cases)} comparisons): max |PyTorch - ONNX Runtime| = "
            f"{self.max_abs_diff:.3g} ({self.tolerance.describe()}) -> {status}; {self.worst_detail()}"
        ]


def check_parity(model, folder: str | Path, adapters: list[str] | None = None, *,
                 provider: str = CPU, tolerance: Tolerance | None = None,
                 tf32: bool = False, metadata: dict | None = None) -> ParityReport:
    """Compare ``model`` (PyTorch, float32) with the exported ``folder`` on ONNX Runtime ``provider``.

    ``tolerance`` defaults to the one for the folder's dtype and ``provider``. On CUDA, TF32 is off on both sides
    unless ``tf32``: ONNX Runtime's CUDA provider enables it by default, and its rounding alone can exceed a float32
    tolerance, rejecting good exports (or, with a loose tolerance, hiding real differences). ``metadata``: the
    folder's ``ptv2_export.json`` content when the file is not written yet (the exporter validates before).
    """
    metadata = read_metadata(folder) if metadata is None else metadata
    if tolerance is None:
        tolerance = default_tolerance(metadata.get("dtype", "float32"), provider, tf32=tf32)
    options = cuda_provider_options(tf32=tf32) if provider == CUDA else None
    ort_model = load(folder, provider, provider_options=options, metadata=metadata)
    report = ParityReport(tolerance=tolerance, provider=provider, tf32=tf32 and provider == CUDA)
    names = adapters or [None]
    with torch_tf32(tf32):
        for index, name in enumerate(names):
            with _active_adapter(model, name), torch.no_grad():
                if ort_model.task == "SEQ_2_SEQ_LM":
                    _check_seq2seq(model, ort_model, report, index if adapters else None, name)
                elif ort_model.task == "CAUSAL_LM":
                    _check_decoder(model, ort_model, report, index if adapters else None, name)
                else:
                    _check_encoder(model, ort_model, report, index if adapters else None, name)
    return report


@contextmanager
def torch_tf32(enabled: bool) -> Iterator[None]:
    """PyTorch's float32 CUDA matmuls with (``high``) or without (``highest``) TF32 while comparing; restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextmanager
def _active_adapter(model, name: str | None):
    if name is None:
        yield
        return
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def _device_inputs(model, inputs: dict) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in inputs.items()}


def _check_encoder(model, ort_model, report: ParityReport, adapter_id, name) -> None:
    graph = L.build_layout(model.base_model.model.config, ort_model.task, with_past=False)
    generator = torch.Generator().manual_seed(1)
    tag = f"[{name}] " if name else ""
    for batch, length in ENCODER_SHAPES:
        inputs = sample_inputs(model.config, graph, batch=batch, length=length, generator=generator)
        if batch > 1:
            inputs["attention_mask"][-1, -min(2, length - 1) :] = 0
        reference = model(**_device_inputs(model, inputs))
        actual = ort_model(**inputs, adapter_ids=_ids(adapter_id, batch))
        for output in graph.outputs:
            report.add(f"{tag}{output} batch={batch} len={length}", getattr(reference, output), getattr(actual, output))


def _check_decoder(model, ort_model, report: ParityReport, adapter_id, name) -> None:
    graph = L.decoder_layout(0, with_past=False)
    generator = torch.Generator().manual_seed(1)
    tag = f"[{name}] " if name else ""
    for batch, length in DECODER_SHAPES:
        inputs = sample_inputs(model.config, graph, batch=batch, length=length, generator=generator)
        if batch > 1:
            inputs["attention_mask"][-1, : min(2, length - 1)] = 0
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        mask = inputs["attention_mask"]
        reference = model(**_device_inputs(model, inputs), use_cache=ort_model.can_use_cache)
        actual = ort_model(**inputs, adapter_ids=_ids(adapter_id, batch))
        report.add(f"{tag}logits batch={batch} len={length} (empty past)", reference.logits, actual.logits)
        if not ort_model.can_use_cache:
            continue
        torch_past, ort_past = cache_from_output(reference), cache_from_output(actual)
        for step in range(DECODE_STEPS):
            token = torch.randint(3, int(model.config.vocab_size), (batch, 1), generator=generator)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
            position = mask.sum(-1, keepdim=True) - 1
            step_inputs = {"input_ids": token, "attention_mask": mask, "position_ids": position}
            reference = model(**_device_inputs(model, step_inputs), **cache_kwargs(torch_past), use_cache=True)
            actual = ort_model(**step_inputs, **cache_kwargs(ort_past), adapter_ids=_ids(adapter_id, batch))
            report.add(f"{tag}logits batch={batch} len={length} step={step + 1}", reference.logits, actual.logits)
            torch_past, ort_past = cache_from_output(reference), cache_from_output(actual)
        expected = flatten_cache(torch_past)
        got = flatten_cache(ort_past)
        report.add(f"{tag}present batch={batch} len={length}", torch.stack([t.float() for t in expected]),
                   torch.stack([t.float() for t in got]))


def _check_seq2seq(model, ort_model, report: ParityReport, adapter_id, name) -> None:
    generator = torch.Generator().manual_seed(1)
    tag = f"[{name}] " if name else ""
    vocab = int(model.config.vocab_size)
    for batch, length, decoder_length in SEQ2SEQ_SHAPES:
        case = f"{tag}batch={batch} len={length}"
        ids = torch.randint(3, vocab, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[-1, -2:] = 0
        decoder_ids = torch.randint(3, vocab, (batch, decoder_length), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
        reference = model(**_device_inputs(model, inputs), use_cache=True)
        actual = ort_model(**inputs, adapter_ids=_ids(adapter_id, batch))
        report.add(f"{tag}encoder last_hidden_state {case}", reference.encoder_last_hidden_state,
                   actual.encoder_last_hidden_state)
        report.add(f"{tag}logits {case} (empty past)", reference.logits, actual.logits)
        if not ort_model.can_use_cache:
            continue
        encoder_outputs = (reference.encoder_last_hidden_state,)
        torch_past, ort_past = cache_from_output(reference), cache_from_output(actual)
        for step in range(DECODE_STEPS):
            token = torch.randint(3, vocab, (batch, 1), generator=generator)
            reference = model(encoder_outputs=encoder_outputs, **_device_inputs(model, {"attention_mask": mask,
                              "decoder_input_ids": token}), **cache_kwargs(torch_past), use_cache=True)
            actual = ort_model(encoder_outputs=actual.encoder_last_hidden_state, attention_mask=mask,
                               decoder_input_ids=token, **cache_kwargs(ort_past), adapter_ids=_ids(adapter_id, batch))
            report.add(f"{tag}logits {case} step={step + 1}", reference.logits, actual.logits)
            torch_past, ort_past = cache_from_output(reference), cache_from_output(actual)
        expected = flatten_cache(torch_past)
        got = flatten_cache(ort_past)
        for kind, index in (("self-attention", 0), ("cross-attention", 2)):
            pick = [i for i in range(len(expected)) if i % 4 in (index, index + 1)]
            report.add(f"{tag}{kind} cache {case}", torch.stack([expected[i].float() for i in pick]),
                       torch.stack([got[i].float() for i in pick]))


def _ids(adapter_id, batch: int):
    return None if adapter_id is None else torch.full((batch,), adapter_id, dtype=torch.long)

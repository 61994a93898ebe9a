"""Parity check run by ``export``: PyTorch (the PeftModel, as users run it) against ONNX Runtime on the same inputs.

Several batch sizes and lengths with padded rows; decoders are stepped from an empty past, so the check also proves
the prefix never entered the cache. Encoder-decoder models: the encoder output, the first decoder pass (padded
encoder rows) and several cached steps are compared, and the caches themselves. With several adapters, each row's
adapter is compared with PyTorch running that adapter.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs

from . import layout as L
from .export import build_layout, sample_inputs

ENCODER_SHAPES = ((1, 4), (2, 7), (3, 11))
DECODER_SHAPES = ((1, 3), (3, 6))
DECODE_STEPS = 3
SEQ2SEQ_SHAPES = ((1, 4, 1), (3, 7, 3))  # batch, encoder length, decoder length of the first pass


@dataclass
class ParityReport:
    atol: float
    provider: str
    cases: list[tuple[str, float]] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((d for _, d in self.cases), default=0.0)

    @property
    def worst(self) -> str:
        return max(self.cases, key=lambda c: c[1])[0] if self.cases else "-"

    @property
    def ok(self) -> bool:
        return bool(self.cases) and self.max_abs_diff <= self.atol

    def add(self, case: str, reference: torch.Tensor, actual: torch.Tensor) -> None:
        if reference.shape != actual.shape:
            raise AssertionError(f"{case}: ONNX output shape {tuple(actual.shape)} != PyTorch {tuple(reference.shape)}")
        diff = (reference.detach().float().cpu() - actual.float()).abs().max().item() if reference.numel() else 0.0
        self.cases.append((case, float(diff)))

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "atol": self.atol, "provider": self.provider, "ok": self.ok,
                "cases": len(self.cases), "worst_case": self.worst}

    def lines(self) -> list[str]:
        status = "OK" if self.ok else "FAILED"
        return [
            f"Parity ({self.provider}, {len(self.cases)} comparisons): max |PyTorch - ONNX Runtime| = "
            f"{self.max_abs_diff:.3g} (atol {self.atol:g}) -> {status}; worst: {self.worst}"
        ]


def check_parity(model, folder: str | Path, adapters: list[str] | None = None, *,
                 provider: str = "CPUExecutionProvider", atol: float = 1e-4) -> ParityReport:
    from .runtime import load

    ort_model = load(folder, provider)
    report = ParityReport(atol=atol, provider=provider)
    names = adapters or [None]
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
    graph = build_layout(model.base_model.model.config, ort_model.task, with_past=False)
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
        from .export import flatten_cache

        expected = flatten_cache(torch_past)
        got = [t for pair in ort_past for t in pair]
        report.add(f"{tag}present batch={batch} len={length}", torch.stack([t.float() for t in expected]),
                   torch.stack([t.float() for t in got]))


def _check_seq2seq(model, ort_model, report: ParityReport, adapter_id, name) -> None:
    from .seq2seq import flatten_encoder_decoder_cache

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
        expected = flatten_encoder_decoder_cache(torch_past)
        got = [t for layer in ort_past for t in layer]
        for kind, index in (("self-attention", 0), ("cross-attention", 2)):
            pick = [i for i in range(len(expected)) if i % 4 in (index, index + 1)]
            report.add(f"{tag}{kind} cache {case}", torch.stack([expected[i].float() for i in pick]),
                       torch.stack([got[i].float() for i in pick]))


def _ids(adapter_id, batch: int):
    return None if adapter_id is None else torch.full((batch,), adapter_id, dtype=torch.long)

"""Parity tolerances: the one place that says how far ONNX Runtime may be from PyTorch.

A comparison passes when ``max|ort - torch| <= atol + rtol * max|torch|``. The relative term scales the bound with
the output, so a check on logits of order 1 and one on caches of order 10 are equally strict, and an absolute-only
bound can no longer sit above the signal it should detect (a prefix that moves the logits by less than a fixed atol
could be dropped unnoticed). Defaults depend on the graph's dtype and on where it runs:

- float32 on CPU: errors are reordering noise (~1e-6 relative), so the bound is tight.
- float32 on CUDA with TF32 off (what validation uses): kernels reorder sums differently, a little looser.
- float32 on CUDA with TF32 on: MatMuls round their inputs to 10 mantissa bits, like float16; only for callers who
  opt in to TF32.
- float16: storage and MatMuls in half precision (norms and softmax stay float32, see ``float16.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .providers import CPU, CUDA


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def bound(self, reference_max: float) -> float:
        """The largest difference allowed for an output whose largest magnitude is ``reference_max``."""
        return self.atol + self.rtol * reference_max

    def allows(self, diff: float, reference_max: float) -> bool:
        return diff <= self.bound(reference_max)

    def describe(self) -> str:
        return f"atol {self.atol:g} + rtol {self.rtol:g} * max|torch|"


_FLOAT32_CPU = Tolerance(atol=1e-5, rtol=1e-4)
_FLOAT32_CUDA = Tolerance(atol=1e-5, rtol=3e-4)
_TF32 = Tolerance(atol=1e-4, rtol=5e-3)
_FLOAT16 = Tolerance(atol=2e-3, rtol=1e-2)


def default_tolerance(dtype: Any = "float32", provider: str = CPU, *, tf32: bool = False) -> Tolerance:
    """Default bound for a graph of ``dtype`` (name or ``torch.dtype``) run on ``provider`` (``tf32``: CUDA float32
    MatMuls may use TF32)."""
    if str(dtype).removeprefix("torch.") in ("float16", "fp16"):
        return _FLOAT16
    if provider == CUDA:
        return _TF32 if tf32 else _FLOAT32_CUDA
    return _FLOAT32_CPU


def resolve_tolerance(dtype: Any, provider: str, *, atol: float | None = None,
                      rtol: float | None = None, tf32: bool = False) -> Tolerance:
    """The default for ``dtype``/``provider``, with ``atol``/``rtol`` overriding each part the caller gave."""
    default = default_tolerance(dtype, provider, tf32=tf32)
    return Tolerance(atol=default.atol if atol is None else float(atol),
                     rtol=default.rtol if rtol is None else float(rtol))

"""Parity assertions for the export tests, with the exporter's own tolerances (``exporters/onnx/tolerances.py``).

A parity check proves the prefix is in the graph only if the prefix moves the outputs by more than the check allows.
So, given the PyTorch output without the prefix, ``assert_parity`` also asserts that the allowed difference is below
the prefix's effect (a graph that dropped the prefix fails) and that the error is a small share of that effect.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from exporters.onnx.providers import CPU
from exporters.onnx.tolerances import Tolerance, default_tolerance

EFFECT_SHARE = 0.05  # the parity error must stay below this share of the prefix's effect


def as_float(value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.astype(np.float32))
    return torch.as_tensor(value).detach().float().cpu()


def max_diff(a: Any, b: Any) -> float:
    return (as_float(a) - as_float(b)).abs().max().item()


def assert_parity(actual: Any, expected: Any, *, without_prefix: Any = None, dtype: str = "float32",
                  provider: str = CPU, tolerance: Tolerance | None = None, context: Any = "") -> float:
    """``actual`` (ONNX Runtime) within the default tolerance of ``expected`` (PyTorch); returns the difference."""
    tolerance = tolerance or default_tolerance(dtype, provider)
    got, want = as_float(actual), as_float(expected)
    assert got.shape == want.shape, (context, tuple(got.shape), tuple(want.shape))
    assert torch.isfinite(got).all(), (context, "non-finite ONNX Runtime output")
    diff = (got - want).abs().max().item()
    allowed = tolerance.bound(want.abs().max().item())
    assert diff <= allowed, f"{context}: |ort - torch| {diff:.3g} > allowed {allowed:.3g} ({tolerance.describe()})"
    if without_prefix is not None:
        effect = max_diff(want, without_prefix)
        assert allowed < effect, f"{context}: tolerance {allowed:.3g} would pass a graph without the prefix " \
                                 f"(prefix effect {effect:.3g})"
        assert diff < EFFECT_SHARE * effect, f"{context}: parity error {diff:.3g} is not far below the prefix " \
                                             f"effect {effect:.3g}"
    return diff

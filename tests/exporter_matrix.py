"""Which torch exporter each export test runs with (``export(..., exporter=...)``).

dynamo (the library default) takes about 12x as long as the legacy TorchScript exporter on the tiny test models
(two-layer BERT: 6.0 s vs 0.43 s, same process, ``/tmp`` A/B in the issue-15 notes), and the three CI lanes must
stay within their time budget. So:

- the parity matrix (every architecture, every task, encoder-decoder parts) and every export feature (float16,
  fused attention, several adapters, swappable prefixes) run with dynamo;
- the TorchScript fallback runs the same tests on a representative subset: one encoder, one decoder and one
  encoder-decoder model (``LEGACY_ARCHS``);
- tests whose subject does not depend on the exporter (output folder atomicity, bad input, CLI plumbing, the
  Trainer callback, fuzzing) call ``export()`` without naming an exporter and run with ``UNNAMED``.

A test opts in by taking an ``exporter`` argument (parametrize it with ``over_exporters``); ``tests/conftest.py``
makes that the exporter ``export()`` uses when the test does not pass one itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest

DYNAMO, TORCHSCRIPT = "dynamo", "torchscript"
LEGACY_ARCHS = ("bert", "llama", "t5")
UNNAMED = TORCHSCRIPT  # exporter-agnostic tests: the fast path (the default path is covered by the opted-in tests)


def over_exporters(cases: Iterable[Any], arch: Callable[[Any], str] = lambda case: case,
                   legacy: Iterable[str] = LEGACY_ARCHS) -> list:
    """``cases`` x exporters as pytest params ``(*case, exporter)``: every case with dynamo, the cases whose
    architecture is in ``legacy`` with torchscript as well."""
    legacy = set(legacy)
    params = []
    for case in cases:
        values = case if isinstance(case, tuple) else (case,)
        params.append(pytest.param(*values, DYNAMO, id="-".join(map(str, (*values, DYNAMO)))))
        if arch(case) in legacy:
            params.append(pytest.param(*values, TORCHSCRIPT, id="-".join(map(str, (*values, TORCHSCRIPT)))))
    return params

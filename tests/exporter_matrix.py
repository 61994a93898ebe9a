"""Which torch exporter each export test runs with (``export(..., exporter=...)``).

dynamo is the library default (exporters/onnx/graph_export.py); a dynamo export takes about 10x as long as a legacy
TorchScript one on the tiny test models (2.9 s vs 0.25 s for a two-layer BERT), and each CI lane runs the suite
within a time budget (scripts/test.sh runs both matrices on the tf457 and tf5 lanes, dynamo's on tf523, over two
pytest-xdist workers). So:

- TorchScript, the fallback, keeps the whole matrix the suite ran before the dynamo path existed: it is cheap;
- dynamo runs every architecture and every task (encoder tasks cycled over the encoders, each decoder
  with its cache, both encoder-decoder models) and each export feature (float16, fused attention, several adapters,
  swappable prefixes) on one or two representative models; int8 of a dynamo graph runs in tests/test_main_job.py,
  whose subprocess exports with the library default;
- tests whose subject does not depend on the exporter (folder atomicity, bad input, CLI plumbing, the Trainer
  callback, fuzzing) call ``export()`` without naming one and run with ``UNNAMED``;
- a test marked ``library_default`` gets the library's own default (tests/test_graph_export.py checks it is dynamo
  and warns nothing).

A test opts in by taking an ``exporter`` argument (parametrized with ``over_exporters``); ``tests/conftest.py`` makes
it the exporter ``export()`` uses when the test does not pass one. ``PTV2_TEST_EXPORTERS`` (comma-separated, default
both) restricts the parametrized cases of a run, e.g. to spend a lane's time on one exporter only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable
from typing import Any

import pytest

DYNAMO, TORCHSCRIPT = "dynamo", "torchscript"
UNNAMED = TORCHSCRIPT  # exporter-agnostic tests: the fast path (the default is covered by the opted-in tests)
SELECTED = tuple(name.strip() for name in os.environ.get("PTV2_TEST_EXPORTERS", f"{DYNAMO},{TORCHSCRIPT}").split(",")
                 if name.strip())


def over_exporters(cases: Iterable[Any], *, dynamo: Collection[Any] | None = None,
                   arch: Callable[[Any], str] = lambda case: case[0] if isinstance(case, tuple) else case) -> list:
    """``cases`` x exporters as pytest params ``(*case, exporter)``: every case with torchscript, and with dynamo
    the cases (or architectures) in ``dynamo`` (None: all)."""
    params = []
    for case in cases:
        values = case if isinstance(case, tuple) else (case,)
        exporters = [TORCHSCRIPT]
        if dynamo is None or case in dynamo or arch(case) in dynamo:
            exporters.insert(0, DYNAMO)
        params += [pytest.param(*values, name, id="-".join(map(str, (*values, name))))
                   for name in exporters if name in SELECTED]
    return params


def only(*exporters: str) -> list[str]:
    """The given exporters that this run selects (for tests parametrized over ``exporter`` alone)."""
    return [name for name in exporters if name in SELECTED]

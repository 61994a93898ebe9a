from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import ptv2_plugin  # noqa: E402,F401  (registers the method)
from exporters.onnx import graph_export  # noqa: E402
from tests.exporter_matrix import UNNAMED  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _exporter(request, monkeypatch):
    """The exporter ``export()`` uses when a test names none: the test's ``exporter`` parameter if it has one,
    else ``tests.exporter_matrix.UNNAMED`` (see there why); tests marked ``library_default`` keep the library's."""
    if request.node.get_closest_marker("library_default"):
        return
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    monkeypatch.setattr(graph_export, "DEFAULT_EXPORTER", params.get("exporter", UNNAMED))

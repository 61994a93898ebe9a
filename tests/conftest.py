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
# Each pytest-xdist worker gets its share of the cores: two workers with two threads each on CI's two cores made
# each other's parallel ops wait (`PTV2_LANES=tf523 bash scripts/test.sh` on the 2-core machine: 327 s with 2 threads
# per worker, 293 s with 1). Capping ONNX Runtime's sessions (a thread per core by default) the same way measured no
# different (295 s).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

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

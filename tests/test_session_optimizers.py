"""CPU sessions skip ONNX Runtime's SkipLayerNormalization rewrite, which is slower on CPU than what it replaces
(``exporters/onnx/providers.py``, measured by ``python -m benchmarks.ort_fusions``), and only that."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # noqa: E402

from exporters.onnx import export, load  # noqa: E402
from exporters.onnx.providers import CPU, CUDA, disabled_optimizers  # noqa: E402
from exporters.onnx.serving import create_session  # noqa: E402
from tests.test_export_onnx import batch, peft_model  # noqa: E402


def _optimized_ops(path: Path, out: Path, **create) -> Counter:
    """Op types of the graph ONNX Runtime runs after its rewrites (written by ``optimized_model_filepath``)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out)
    if create.pop("raw", False):
        ort.InferenceSession(str(path), options, providers=[CPU])
    else:
        create_session(path, CPU, session_options=options, **create)
    return Counter(node.op_type for node in onnx.load(str(out)).graph.node)


@pytest.mark.library_default
def test_cpu_sessions_skip_the_skip_layernorm_fusion_and_nothing_else(tmp_path):
    """The fusion needs the shapes of both Add inputs. A fresh default export carries none (``graph_export`` drops
    torch.export's annotations), but a graph that went through ONNX Runtime's symbolic shape inference (its
    quantizer does that: every torchscript int8 graph) carries them all, so that is the graph tested here."""
    model = peft_model("bert")
    folder = export(model, tmp_path / "bert", validate=False)
    path = folder / "model.onnx"
    onnx.save(SymbolicShapeInference.infer_shapes(onnx.load(str(path)), auto_merge=True), str(path))
    plain = _optimized_ops(path, tmp_path / "plain.onnx", raw=True)
    # precondition: with shapes known, ORT's CPU rewrites do produce the fused node
    assert plain["SkipLayerNormalization"] > 0, plain
    ours = _optimized_ops(path, tmp_path / "ours.onnx")
    assert ours["SkipLayerNormalization"] == 0 and ours["LayerNormalization"] >= plain["SkipLayerNormalization"]
    # every other rewrite still runs (the fused attention and GELU nodes are kept)
    assert {op: n for op, n in ours.items() if op not in ("Add", "LayerNormalization")} == \
        {op: n for op, n in plain.items() if op not in ("Add", "LayerNormalization", "SkipLayerNormalization")}
    assert _optimized_ops(path, tmp_path / "asked.onnx", skip_optimizers=[])["SkipLayerNormalization"] > 0

    served = load(folder)  # the runtime classes go through create_session: same outputs either way
    inputs = batch(2, 7, right_pad=2)
    reference = model(**inputs).logits.detach()
    assert (torch.as_tensor(served(**inputs).logits) - reference).abs().max() < 1e-5


def test_the_skip_list_is_per_provider():
    assert disabled_optimizers(CPU) == ["SkipLayerNormFusion"]
    assert disabled_optimizers(CUDA) == []

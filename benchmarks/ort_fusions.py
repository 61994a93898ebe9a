"""Is ONNX Runtime's CPU SkipLayerNormalization faster than the Add + LayerNormalization it replaces?

Why this exists: ``exporters.onnx.providers.DISABLED_OPTIMIZERS`` makes every CPU session of the runtime classes skip
ORT's ``SkipLayerNormFusion``. That is only right while the fused CPU kernels are the slower ones, so this script
measures them against the unfused pair, alone (one graph of one node pair, ORT's own rewrites off), per hidden size,
batch shape and thread count, as paired ratios with 95% intervals (``benchmarks/stats.py``).

    python -m benchmarks.ort_fusions [--threads 1 2] [--out benchmarks/results/ort_fusions]

A ratio above 1 means the fused kernel is slower. Rerun it when the onnxruntime lock moves; if fused wins, drop
the entry from ``DISABLED_OPTIMIZERS``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from . import stats

NORMS = {  # name -> (fused contrib op, unfused standard op, opset of the unfused op)
    "LayerNorm": ("SkipLayerNormalization", "LayerNormalization", 17),
    "RMSNorm": ("SkipSimplifiedLayerNormalization", "RMSNormalization", 23),
}


def norm_graph(norm: str, hidden: int, fused: bool) -> bytes:
    """``y = norm(x + skip)`` as one fused contrib node or as Add + the standard norm node."""
    fused_op, plain_op, opset = NORMS[norm]
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "sequence", hidden])
              for name in ("x", "skip", "y")]
    weights = [numpy_helper.from_array(np.ones(hidden, np.float32), "gamma")]
    if norm == "LayerNorm":
        weights.append(numpy_helper.from_array(np.zeros(hidden, np.float32), "beta"))
    params = [w.name for w in weights]
    if fused:
        nodes = [helper.make_node(fused_op, ["x", "skip", *params], ["y"], domain="com.microsoft", epsilon=1e-6)]
    else:
        nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
                 helper.make_node(plain_op, ["sum", *params], ["y"], epsilon=1e-6, axis=-1)]
    graph = helper.make_graph(nodes, norm, values[:2], values[2:], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # time the kernels as written
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, nargs="+", default=[384, 768, 2048])
    parser.add_argument("--shapes", nargs="+", default=["1x16", "8x64", "32x64"], help="batch x sequence")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json (optional)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    print(f"onnxruntime {ort.__version__}; ratio = fused / (Add + norm), > 1: the fusion slows the CPU down")
    for norm in NORMS:
        for hidden in args.hidden:
            for threads in args.threads:
                for shape in args.shapes:
                    batch, sequence = map(int, shape.split("x"))
                    feed = {name: rng.standard_normal((batch, sequence, hidden)).astype(np.float32)
                            for name in ("x", "skip")}
                    sessions = {kind: session(norm_graph(norm, hidden, kind == "fused"), threads)
                                for kind in ("fused", "unfused")}
                    np.testing.assert_allclose(*(s.run(None, feed)[0] for s in sessions.values()), atol=1e-4)
                    calls = {kind: (lambda s=s, feed=feed: s.run(None, feed)) for kind, s in sessions.items()}
                    estimate, _ = stats.measure_ratio(calls, "fused", "unfused", target=1.0, per_round_calls=20,
                                                      min_rounds=10, max_rounds=60, max_seconds=20)
                    rows.append({"norm": norm, "hidden": hidden, "threads": threads, "shape": shape,
                                 **estimate.as_dict()})
                    print(f"{norm:9s} hidden {hidden:5d} threads {threads} {shape:6s} fused/unfused {estimate}",
                          flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                                                           "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

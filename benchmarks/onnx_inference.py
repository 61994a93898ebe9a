"""Inference in ONNX Runtime (CPU): the default export vs the base model's best ORT graph, fused vs plain attention,
the int8 graph vs PyTorch eager and on SST-2 dev, and decoder generation; every ratio with a 95% interval.

    python -m benchmarks.onnx_inference [--n 16] [--max-seconds 150] [--train-size 2000] [--work-dir DIR]

Encoder: all-MiniLM-L6-v2 (SEQ_CLS) with a P-Tuning v2 adapter trained for one short epoch on SST-2 train
(``--train-size`` examples, the quality benchmark's recipe), so the int8 accuracy means something. Graphs (in a
temporary ``--work-dir``, never in results/):

- ``base/sdpa``, ``base/eager``: the base classifier traced (TorchScript exporter), SDPA and eager
  attention; ``base/sdpa+opt``, ``base/eager+opt``: those through ORT's transformer optimizer
  (``optimize_model(model_type="bert")``). The best base graph is the fastest of these four at each shape.
- ``ptv2``: ``export(model)``, the DEFAULT export (dynamo exporter, opset 20, ``fused_attention="auto"``: one
  ``com.microsoft.Attention`` per prefixed layer, packed onto its query/key/value GEMM with the prefix as its past),
  as a user gets it, no optimizer on top.
- ``ptv2-plain``: ``export(model, fused_attention=False)``, the A/B partner (plain ONNX attention ops).
- ``ptv2-int8``: ``export(model, quantize="int8")`` (dynamic int8 weight MatMuls, prefix float32).
- ``ptv2-torchscript``: ``export(model, exporter="torchscript")``, the A/B partner of the exporter choice.
- ``torch:ptv2``: the same adapter in PyTorch eager float32 (``torch.inference_mode``).

Every ORT session, ours and the base's, skips what the runtime classes skip on CPU (``SkipLayerNormFusion``,
``exporters/onnx/providers.py``).

At each shape all candidates run round-robin, in a shuffled order per round; a ratio is the geometric mean of
per-round median ratios with a percentile-bootstrap interval (``benchmarks/stats.py``), and rounds are added until
every targeted ratio's interval clears its target or ``--max-seconds`` ends (then INCONCLUSIVE). Targeted ratios use
a Bonferroni interval per look (``stats.look_confidence``), so stopping at the first look that clears the target keeps
wrong verdicts to about 5%; the others a 95% one. Targets (issue 16): default / best base
<= 1.05 at b1 x s16, b1 x s128, b32 x s64; PyTorch eager / int8 >= 2 at b1 x s128 and b32 x s64; SST-2 dev
accuracy of the int8 graph within 0.5 points of the float32 graph (paired bootstrap over dev examples; the same
comparison on ``--heldout-size`` SST-2 train sentences the adapter never saw, which can resolve it); decoder
generation tokens/s ours / base model's own ORT graph >= 0.95 at b1 and b8 (a small Llama built from a config with
random weights: no decoder weights are available offline; speed does not depend on the weights). Every missed
target gets a node-type profile (ORT's profiler) of the graphs compared.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.transformers.optimizer import optimize_model
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import ptv2_plugin
from benchmarks import common, stats
from exporters.onnx import ORTModelForCausalLM, export
from exporters.onnx import layout as L
from exporters.onnx.caches import flatten_cache
from exporters.onnx.model_patcher import traceable_masks
from exporters.onnx.providers import CPU, disabled_optimizers
from exporters.onnx.sample_inputs import sample_inputs
from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs

SHAPES = [(1, 16), (1, 128), (32, 64)]
DEFAULT = "ptv2"  # our default export (fused attention where it applies)
PLAIN, INT8, EAGER = "ptv2-plain", "ptv2-int8", "torch:ptv2"
LEGACY = "ptv2-torchscript"  # the same export through the fallback exporter (A/B of the exporter choice)
BASE_GRAPHS = ("base/sdpa", "base/sdpa+opt", "base/eager", "base/eager+opt")
VS_BASE_TARGET = 1.05
INT8_TARGET, INT8_SHAPES = 2.0, [(1, 128), (32, 64)]
ACCURACY_POINTS = 0.5
DECODER_TARGET, DECODER_BATCHES, PROMPT, NEW_TOKENS = 0.95, (1, 8), 16, 32
DECODER_CONFIG = dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)


# --------------------------------------------------------------------------------------------------- graphs
def export_base(model: torch.nn.Module, path: Path, opset: int = 17) -> Path:
    """The base classifier as one ONNX graph with dynamic batch and length (TorchScript exporter)."""

    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = common.random_batch(model.config.vocab_size, 2, 8)
    sample["attention_mask"][-1, -1] = 0  # a padded row, so no "all ones" shortcut is traced
    args = (sample["input_ids"], sample["attention_mask"], torch.zeros_like(sample["input_ids"]))
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in names}
    axes["logits"] = {0: "batch_size"}
    path.parent.mkdir(parents=True, exist_ok=True)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              return_dict=False)[0]

    # The wrapper must be in eval mode itself: the exporter restores the wrapper's mode onto the whole model after.
    with traceable_masks(), torch.no_grad():
        torch.onnx.export(Wrapper(model).eval(), args, str(path), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    model.eval()
    return path


def export_base_decoder(model: torch.nn.Module, path: Path, opset: int = 17) -> Path:
    """The base decoder with Optimum's cache layout (what our exporter writes, minus the prefix): its own ORT graph."""
    config = model.config
    graph = L.decoder_layout(config.num_hidden_layers, with_past=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    example = sample_inputs(config, graph, kv_shape=(kv_heads, head_dim), generator=torch.Generator().manual_seed(0))

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache([(past[i], past[i + 1]) for i in range(0, len(past), 2)], config=config)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, return_dict=True, **cache_kwargs(cache))
            return (out.logits, *flatten_cache(cache_from_output(out)))

    path.parent.mkdir(parents=True, exist_ok=True)
    with traceable_masks(), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(Wrapper(model).eval(), tuple(example[name] for name in graph.inputs), str(path),
                          input_names=graph.inputs, output_names=graph.outputs, dynamic_axes=graph.dynamic_axes,
                          opset_version=opset, dynamo=False)
    model.eval()
    return path


def fuse(path: Path, out: Path, num_heads: int, hidden_size: int) -> tuple[Path, dict[str, int]]:
    """ORT's transformer optimizer (CPU fusions); returns the new graph and the fused-op counts."""

    model = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=1)
    model.save_model_to_file(str(out), use_external_data_format=False)
    return out, op_counts(model.model.graph)


def op_counts(graph) -> dict[str, int]:
    ops = Counter(node.op_type for node in graph.node)
    keep = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu",
            "FastGelu", "Gelu", "EmbedLayerNormalization", "MatMul", "MatMulInteger", "DynamicQuantizeLinear",
            "Softmax", "Concat")
    return {k: ops[k] for k in keep if ops[k]}


def session_options(threads: int, profile_prefix: str | None = None):

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Sessions are timed round-robin; spinning worker threads of one session would steal the cores of the next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def session(path: Path, threads: int, profile_prefix: str | None = None):

    # every graph, ours and the base model's, with the rewrites the runtime classes skip on CPU skipped
    return ort.InferenceSession(str(path), sess_options=session_options(threads, profile_prefix),
                                providers=[CPU], disabled_optimizers=disabled_optimizers(CPU))


def feed_for(sess, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    ids = inputs["input_ids"]
    values = {"input_ids": ids, "attention_mask": inputs["attention_mask"], "token_type_ids": torch.zeros_like(ids)}
    return {i.name: values[i.name].numpy() for i in sess.get_inputs()}


# ------------------------------------------------------------------------------------------------ measuring
@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of per-round times; several denominators: the fastest of them (by geometric
    mean over the same rounds)."""

    numerator: str
    denominator: str | tuple[str, ...]
    target: float | None = None
    lower_is_better: bool = True


def estimate(rounds: dict[str, list[float]], ratio: Ratio, confidence: float = 0.95) -> dict[str, Any]:
    names = (ratio.denominator,) if isinstance(ratio.denominator, str) else ratio.denominator
    best = min(names, key=lambda n: float(np.mean(np.log(rounds[n]))))
    value = stats.ratio_interval(rounds[ratio.numerator], rounds[best], confidence)
    verdict = None if ratio.target is None else stats.verdict(value, ratio.target, ratio.lower_is_better)
    return {**value.as_dict(), "numerator": ratio.numerator, "denominator": best, "target": ratio.target,
            "lower_is_better": ratio.lower_is_better, "verdict": verdict}


def measure(fns: dict[str, Callable[[], Any]], ratios: dict[str, Ratio], per_round_calls: int = 1,
            min_rounds: int = 10, batch_rounds: int = 10, max_rounds: int = 300,
            max_seconds: float = 150.0) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """``stats.measure_ratio`` for several ratios over the same interleaved rounds: rounds are added until no
    targeted ratio is INCONCLUSIVE, or ``max_rounds`` / ``max_seconds`` is reached."""
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    started, warmup = time.perf_counter(), 2
    sequential = stats.look_confidence(min_rounds, max(min_rounds, max_rounds), batch_rounds)  # targeted ratios
    while True:
        step = batch_rounds if rounds[next(iter(fns))] else min_rounds
        times = common.interleaved_times(fns, step, per_round_calls, warmup=warmup)
        warmup = 0
        for name, values in times.items():
            rounds[name].extend(stats.per_round(values, step))
        results = {key: estimate(rounds, ratio, 0.95 if ratio.target is None else sequential)
                   for key, ratio in ratios.items()}
        pending = [k for k, r in results.items() if r["verdict"] == stats.INCONCLUSIVE]
        if not pending or len(rounds[next(iter(fns))]) >= max_rounds or time.perf_counter() - started > max_seconds:
            return results, rounds


def node_type_profile(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int, work: Path) -> dict:
    """ORT's profiler over ``runs`` runs: milliseconds per run by node type (top 12) and the node count."""
    sess = session(path, threads, profile_prefix=str(work / f"profile-{path.parent.name}-{path.stem}"))
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_type: dict[str, float] = defaultdict(float)
    nodes = set()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_type[event["args"]["op_name"]] += event["dur"] / 1000 / runs
            nodes.add(event["name"])
    top = dict(sorted(by_type.items(), key=lambda kv: -kv[1])[:12])
    return {"ms_per_run_by_node_type": {k: round(v, 3) for k, v in top.items()},
            "kernel_ms_per_run": round(sum(by_type.values()), 3), "nodes_run": len(nodes)}


# ------------------------------------------------------------------------------------------------- encoder
def train_adapter(backbone: common.Backbone, data: common.TextData, n: int, epochs: float, seed: int = 0):
    """A P-Tuning v2 adapter (MLP on, head at its own learning rate) trained briefly: the quality recipe.

    Seeded before the new head and the prefix are drawn, so the same command trains the same adapter (the process's
    own torch seed differs from run to run, and the report's accuracy rows with it).
    """

    torch.manual_seed(seed)
    method = common.Method("ptv2", "ptv2", ptv2_plugin.RECOMMENDED_LEARNING_RATE,
                           {"num_virtual_tokens": n, "prefix_projection": True},
                           head_lr=ptv2_plugin.RECOMMENDED_HEAD_LEARNING_RATE)
    model = common.wrap(method, common.frozen_base(backbone))
    train = common.Encoded(backbone.tokenizer, data.train_texts, data.train_labels)
    info = common.train(model, train, method, common.TrainConfig(epochs=epochs, seed=seed))
    model.eval()
    return model, info


def adapter_model(backbone: common.Backbone, data: common.TextData, args, work: Path):
    """The trained adapter: trained now (and saved to ``work/adapter``), or reloaded from ``--adapter``."""

    if args.adapter:
        folder = Path(args.adapter)
        model = PeftModel.from_pretrained(common.frozen_base(backbone), str(folder)).eval()
        training = json.loads((folder / "training.json").read_text())
        if data.tune_texts and training["train_examples"] != len(data.train_texts):
            raise ValueError(f"{folder} was trained on the first {training['train_examples']} SST-2 train examples; "
                             f"pass --train-size {training['train_examples']} so the held-out sentences start after "
                             "them (or --heldout-size 0).")
        return model, {**training, "reused_from": str(folder)}
    model, training = train_adapter(backbone, data, args.n, args.epochs)
    training.update(train_examples=len(data.train_texts), epochs=args.epochs)
    model.save_pretrained(str(work / "adapter"))
    common.write_json(work / "adapter" / "training.json", training)
    return model, training


def dev_accuracy(sessions: dict[str, Any], model, dev: common.Encoded, batch_size: int = 64) -> dict[str, Any]:
    """Dev set through each ORT graph and PyTorch: accuracy, and for int8 vs float32 the agreement, max logit error
    and the accuracy difference with a paired bootstrap interval over examples."""
    out, labels = _logits(sessions, dev, batch_size, model)
    result = _int8_vs_float32(out, labels)
    result["float32_torch_max_abs_logit_diff"] = float(np.abs(out[DEFAULT] - out["torch"]).max())
    return result


def heldout_accuracy(sessions: dict[str, Any], heldout: common.Encoded, batch_size: int = 64) -> dict[str, Any]:
    """The same int8-vs-float32 comparison on SST-2 train sentences the adapter never saw (the ones after its
    training subset). Why: with 872 dev sentences the interval of the accuracy difference is about +/-0.8 points
    when ~1% of predictions flip, wider than the +/-0.5 target, so dev alone cannot resolve it."""
    return _int8_vs_float32(*_logits(sessions, heldout, batch_size))


def _logits(sessions: dict[str, Any], data: common.Encoded, batch_size: int, model=None):
    logits: dict[str, list[np.ndarray]] = defaultdict(list)
    for batch in data.batches(batch_size):
        logits["labels"].append(batch.pop("labels").numpy())
        for name, sess in sessions.items():
            logits[name].append(sess.run(None, feed_for(sess, batch))[0])
        if model is not None:
            with torch.inference_mode():
                logits["torch"].append(model(**batch).logits.numpy())
    out = {name: np.concatenate(parts) for name, parts in logits.items()}
    return out, out.pop("labels")


def _int8_vs_float32(out: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    correct = {name: (values.argmax(-1) == labels).astype(float) for name, values in out.items()}
    diff = correct[INT8] - correct[DEFAULT]
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), size=(4000, len(diff)))].mean(axis=1) * 100
    low, high = (float(v) for v in np.quantile(means, [0.025, 0.975]))
    inside = -ACCURACY_POINTS <= low and high <= ACCURACY_POINTS
    outside = high < -ACCURACY_POINTS or low > ACCURACY_POINTS
    return {
        "examples": int(len(labels)),
        "accuracy": {name: float(values.mean()) for name, values in correct.items()},
        "int8_minus_float32_points": float(diff.mean() * 100), "interval_points": [low, high],
        "target_points": ACCURACY_POINTS,
        "verdict": stats.MET if inside else stats.MISSED if outside else stats.INCONCLUSIVE,
        "int8_float32_agreement": float((out[INT8].argmax(-1) == out[DEFAULT].argmax(-1)).mean()),
        "int8_float32_max_abs_logit_diff": float(np.abs(out[INT8] - out[DEFAULT]).max()),
    }


def encoder_graphs(model, backbone: common.Backbone, work: Path) -> tuple[dict[str, Path], dict, dict]:
    """Every graph compared (see the module docstring), their fused-op counts and PyTorch models by graph."""

    paths, fusions, models = {}, {}, {}
    for impl in ("sdpa", "eager"):
        base = common.frozen_base(backbone).eval()
        base.set_attn_implementation(impl)
        name = f"base/{impl}"
        models[name] = base
        paths[name] = export_base(base, work / f"base-{impl}" / "model.onnx")
        cfg = base.config
        paths[f"{name}+opt"], fusions[f"{name}+opt"] = fuse(paths[name], paths[name].with_name("model_opt.onnx"),
                                                            cfg.num_attention_heads, cfg.hidden_size)
    paths[DEFAULT] = export(model, work / "ptv2", task="SEQ_CLS", force=True) / "model.onnx"
    paths[PLAIN] = export(model, work / "ptv2-plain", task="SEQ_CLS", force=True, fused_attention=False) \
        / "model.onnx"
    paths[INT8] = export(model, work / "ptv2-int8", task="SEQ_CLS", force=True, quantize="int8") / "model.onnx"
    paths[LEGACY] = export(model, work / "ptv2-torchscript", task="SEQ_CLS", force=True, exporter="torchscript") \
        / "model.onnx"

    for name in (DEFAULT, PLAIN, INT8, LEGACY):
        fusions[name] = op_counts(onnx.load(str(paths[name]), load_external_data=False).graph)
        models[name] = model
    return paths, fusions, models


def encoder_rows(model, backbone, paths: dict[str, Path], shapes, threads: int, max_seconds: float,
                 min_rounds: int, work: Path) -> list[dict]:
    sessions = {name: session(path, threads) for name, path in paths.items()}
    vocab = model.config.vocab_size
    rows = []
    for batch, seq in shapes:
        inputs = common.random_batch(vocab, batch, seq)
        feeds = {name: feed_for(sess, inputs) for name, sess in sessions.items()}
        fns = {f"ort:{name}": (lambda s=sess, f=feeds[name]: s.run(None, f)) for name, sess in sessions.items()}

        def eager(inputs=inputs):
            with torch.inference_mode():
                model(**inputs)

        fns[EAGER] = eager
        ratios = {
            "default_vs_best_base": Ratio(f"ort:{DEFAULT}", tuple(f"ort:{g}" for g in BASE_GRAPHS), VS_BASE_TARGET),
            "fused_vs_plain": Ratio(f"ort:{DEFAULT}", f"ort:{PLAIN}"),
            "dynamo_vs_torchscript": Ratio(f"ort:{DEFAULT}", f"ort:{LEGACY}"),
            "plain_vs_best_base": Ratio(f"ort:{PLAIN}", tuple(f"ort:{g}" for g in BASE_GRAPHS)),
            "int8_vs_default": Ratio(f"ort:{INT8}", f"ort:{DEFAULT}"),
            "eager_vs_int8": Ratio(EAGER, f"ort:{INT8}", INT8_TARGET if (batch, seq) in INT8_SHAPES else None,
                                   lower_is_better=False),
            "eager_vs_default": Ratio(EAGER, f"ort:{DEFAULT}"),
        }
        results, rounds = measure(fns, ratios, per_round_calls=max(1, 8 // batch), min_rounds=min_rounds,
                                  max_seconds=max_seconds)
        medians = {name: float(np.median(values)) for name, values in rounds.items()}
        row = {"batch": batch, "seq": seq, "rounds": len(rounds[EAGER]), "median_seconds": medians,
               "ratios": results}
        missed = [k for k, r in results.items() if r["verdict"] in (stats.MISSED, stats.INCONCLUSIVE)]
        if missed:
            row["profiles"] = {}
            for key in missed:
                numerator, denominator = results[key]["numerator"], results[key]["denominator"]
                for name in (numerator, denominator):
                    graph = name.removeprefix("ort:")
                    if graph in paths and graph not in row["profiles"]:
                        row["profiles"][graph] = node_type_profile(paths[graph], feed_for(sessions[graph], inputs),
                                                                   threads, max(5, 40 // batch), work)
        rows.append(row)
        print(f"b={batch} s={seq} ({row['rounds']} rounds): " + "; ".join(
            f"{k} {r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]" + (f" {r['verdict']}" if r["verdict"] else "")
            for k, r in results.items()), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- decoder
def decoder_rows(make_base: Callable[[], torch.nn.Module], n: int, threads: int, max_seconds: float,
                 min_rounds: int, work: Path, new_tokens: int = NEW_TOKENS) -> dict:
    """Greedy generation (prompt PROMPT, ``new_tokens`` new, no early stop) with our exported graph and with the base
    model's own graph, both through ``ORTModelForCausalLM.generate`` (the same decoding loop)."""


    base = make_base().eval()
    torch.manual_seed(0)
    ours = get_peft_model(make_base().eval(), ptv2_plugin.PTuningV2Config(task_type="CAUSAL_LM",
                                                                           num_virtual_tokens=n)).eval()
    folder = export(ours, work / "decoder-ptv2", force=True)
    base_path = export_base_decoder(base, work / "decoder-base" / "model.onnx")
    base.config.save_pretrained(base_path.parent)
    options = session_options(threads)
    models = {"ort:ptv2": ORTModelForCausalLM.from_pretrained(folder, session_options=options),
              "ort:base": ORTModelForCausalLM.from_pretrained(base_path.parent, session_options=options)}
    check = common.random_batch(base.config.vocab_size, 2, 8, seed=3)
    with torch.no_grad():
        expected = base(**check).logits
    parity = float((models["ort:base"](**check).logits - expected).abs().max())
    rows = []
    for batch in DECODER_BATCHES:
        prompt = common.random_batch(base.config.vocab_size, batch, PROMPT, seed=batch)
        fns = {name: (lambda m=m, p=prompt: m.generate(**p, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                        do_sample=False)) for name, m in models.items()}
        tokens = fns["ort:ptv2"]()
        assert tokens.shape == (batch, PROMPT + new_tokens), tokens.shape
        # tokens/s ours over tokens/s base = time(base) / time(ours)
        ratios = {"tokens_per_s_vs_base": Ratio("ort:base", "ort:ptv2", DECODER_TARGET, lower_is_better=False)}
        results, rounds = measure(fns, ratios, min_rounds=min_rounds, batch_rounds=5, max_seconds=max_seconds)
        tps = {name: batch * new_tokens / float(np.median(values)) for name, values in rounds.items()}
        rows.append({"batch": batch, "rounds": len(rounds["ort:base"]), "tokens_per_s": tps, "ratios": results})
        r = results["tokens_per_s_vs_base"]
        if r["verdict"] != stats.MET:
            rows[-1]["step_profiles"] = decoder_profiles({"ort:ptv2": folder / "model.onnx", "ort:base": base_path},
                                                         batch, threads, work)
        print(f"decoder b={batch}: tokens/s ours {tps['ort:ptv2']:.1f}, base {tps['ort:base']:.1f}; ours/base "
              f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}] {r['verdict']}", flush=True)
    cfg = base.config
    return {"model": f"{cfg.model_type} from config: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                     f"{cfg.num_attention_heads} heads ({getattr(cfg, 'num_key_value_heads', None)} kv), vocab "
                     f"{cfg.vocab_size}, random weights", "prompt": PROMPT, "new_tokens": new_tokens,
            "base_graph_parity_max_abs_diff": parity, "rows": rows}


def decoder_step_feed(sess, batch: int, past: int) -> dict[str, np.ndarray]:
    """One cached decoding step's inputs for a graph in Optimum's decoder layout (zeros for the past)."""
    feed = {"input_ids": np.full((batch, 1), 5, dtype=np.int64),
            "attention_mask": np.ones((batch, past + 1), dtype=np.int64),
            "position_ids": np.full((batch, 1), past, dtype=np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((batch, i.shape[1], past, i.shape[3]), dtype=np.float32)
    return feed


def decoder_profiles(paths: dict[str, Path], batch: int, threads: int, work: Path, past: int = PROMPT + NEW_TOKENS // 2,
                     runs: int = 30) -> dict[str, dict]:
    """Node-type profile of one cached decoding step (the loop's unit of work) for each decoder graph."""
    return {name: node_type_profile(path, decoder_step_feed(session(path, threads), batch, past), threads, runs, work)
            for name, path in paths.items()}


def small_decoder() -> torch.nn.Module:

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**DECODER_CONFIG))


# -------------------------------------------------------------------------------------------------- report
def _fmt(r: dict) -> str:
    """``1.031 [1.020, 1.041]``, with the interval's level where it is not 95% (a targeted, sequential ratio)."""
    confidence = r.get("confidence", 0.95)
    level = "" if abs(confidence - 0.95) < 1e-9 else f" ({100 * confidence:.2f}%)"
    return f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]{level}"


RATIO_LABELS = {
    "default_vs_best_base": "default export / best base graph",
    "plain_vs_best_base": "plain export / best base graph",
    "fused_vs_plain": "A/B: fused (default) / plain",
    "dynamo_vs_torchscript": "A/B: dynamo exporter (default) / torchscript",
    "int8_vs_default": "int8 / default float32",
    "eager_vs_int8": "PyTorch eager / int8 (speed-up)",
    "eager_vs_default": "PyTorch eager / default (speed-up)",
}


def report(result: dict, meta: dict) -> str:
    enc = result["encoder"]
    names = list(enc["shapes"][0]["median_seconds"])
    latency = [[r["batch"], r["seq"], r["rounds"]] + [f"{1000 * r['median_seconds'][k]:.2f}" for k in names]
               for r in enc["shapes"]]
    ratio_rows = []
    for r in enc["shapes"]:
        for key, label in RATIO_LABELS.items():
            x = r["ratios"][key]
            target = "" if x["target"] is None else ("<= " if x["lower_is_better"] else ">= ") + f"{x['target']:g}"
            ratio_rows.append([f"b{r['batch']} x s{r['seq']}", label, _fmt(x), x["rounds"],
                               x["denominator"] if key.endswith("best_base") else "", target, x["verdict"] or ""])
    acc = enc["sst2_dev"]
    dec = result["decoder"]
    lines = [
        "# Inference in ONNX Runtime (CPU)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Backbone {meta['backbone']} (SEQ_CLS), n={meta['n']}, {meta['threads']} intra-op threads (ORT and torch), "
        f"{meta['machine']['cpu_count']} CPUs, load before the run: `{meta['load_before']}`, after: "
        f"`{meta['load_after']}`.  ",
        *common.environment_lines(meta["machine"]),
        "",
        f"Adapter: trained {enc['training']['steps']} steps ({enc['training']['train_examples']} SST-2 train "
        f"examples, {enc['training']['epochs']} epoch, {enc['training']['train_seconds']:.0f} s), prefix MLP on, "
        "so the graphs serve a trained prefix and head"
        + (f" (reused from an earlier run of this script: `{enc['training']['reused_from']}`)."
           if "reused_from" in enc["training"] else "."),
        "",
        "## Ratios (geometric mean of per-round ratios, bootstrap interval: 95%, or per look with a target)",
        "",
        "Time ratios: below 1 the numerator is faster; `speed-up` rows are PyTorch time over ORT time. `best base` is "
        "the fastest of the four base graphs (sdpa/eager export, with/without ORT's optimizer) over the same rounds. "
        "A verdict is MET only when the whole interval is on the target's side, MISSED when all of it is on the "
        "other, else INCONCLUSIVE (the time budget ran out first). Rows with a target are measured sequentially, so "
        "their interval is at the per-look level shown beside it, which keeps wrong verdicts to about 5%.",
        "",
        common.markdown_table(["shape", "ratio", "estimate [CI]", "rounds", "best base", "target", "verdict"],
                              ratio_rows),
        "",
        "## Median latency (ms)",
        "",
        common.markdown_table(["batch", "seq", "rounds"] + names, latency),
        "",
        f"## int8 on SST-2 dev ({acc['examples']} examples)",
        "",
        f"Accuracy: PyTorch {acc['accuracy']['torch']:.4f}, ORT float32 (default export) "
        f"{acc['accuracy'][DEFAULT]:.4f}, ORT int8 {acc['accuracy'][INT8]:.4f}; int8 - float32 = "
        f"{acc['int8_minus_float32_points']:+.2f} points [{acc['interval_points'][0]:+.2f}, "
        f"{acc['interval_points'][1]:+.2f}] (paired bootstrap over examples), target within +/-{ACCURACY_POINTS} "
        f"points: **{acc['verdict']}**. int8/float32 prediction agreement {acc['int8_float32_agreement']:.2%}, max "
        f"|logit diff| {acc['int8_float32_max_abs_logit_diff']:.3g}; float32 ORT vs PyTorch max |logit diff| "
        f"{acc['float32_torch_max_abs_logit_diff']:.2g}.",
        "",
        *_heldout_lines(enc.get("sst2_heldout")),
        *decoder_section(dec),
        "## Graphs",
        "",
        f"Op counts: {enc['op_counts']}  ",
        f"Max |ORT - PyTorch| on logits: {enc['parity_max_abs_diff']}",
        "",
        *_why_missed(result),
    ]
    return "\n".join(lines) + "\n"


def decoder_section(dec: dict) -> list[str]:
    dec_rows = [[row["batch"], f"{row['tokens_per_s']['ort:ptv2']:.1f}", f"{row['tokens_per_s']['ort:base']:.1f}",
                 _fmt(row["ratios"]["tokens_per_s_vs_base"]), row["rounds"], f">= {DECODER_TARGET}",
                 row["ratios"]["tokens_per_s_vs_base"]["verdict"]] for row in dec["rows"]]
    return [
        "## Decoder generation",
        "",
        f"{dec['model']}; greedy, prompt {dec['prompt']} tokens, {dec['new_tokens']} new tokens per row (no early "
        "stop), both graphs through `ORTModelForCausalLM.generate`. Base graph: the base model traced with the same "
        f"cache layout (max |ORT - PyTorch| logits {dec['base_graph_parity_max_abs_diff']:.2g}).",
        "",
        common.markdown_table(["batch", "ours tokens/s", "base tokens/s", "ours / base [CI]", "rounds", "target",
                               "verdict"], dec_rows),
        "",
    ]


def decoder_report(result: dict, meta: dict) -> str:
    """The report of a ``--decoder-only`` run."""
    lines = ["# Decoder generation in ONNX Runtime (CPU)", "", f"Command: `{meta['command']}`  ",
             f"n={meta['n']}, {meta['threads']} intra-op threads, {meta['machine']['cpu_count']} CPUs, load before "
             f"the run: `{meta['load_before']}`, after: `{meta['load_after']}`.  ", *common.environment_lines(
                 meta["machine"]), "", *decoder_section(result["decoder"]), *_why_missed(result)]
    return "\n".join(lines) + "\n"


def _heldout_lines(held: dict | None) -> list[str]:
    if not held:
        return []
    return [
        f"Held out from SST-2 train ({held['examples']} sentences after the adapter's training examples, never trained "
        f"on; dev is too small to resolve a +/-{ACCURACY_POINTS}-point target): ORT float32 "
        f"{held['accuracy'][DEFAULT]:.4f}, int8 {held['accuracy'][INT8]:.4f}; int8 - float32 = "
        f"{held['int8_minus_float32_points']:+.2f} points [{held['interval_points'][0]:+.2f}, "
        f"{held['interval_points'][1]:+.2f}]: **{held['verdict']}**. Agreement {held['int8_float32_agreement']:.2%}, "
        f"max |logit diff| {held['int8_float32_max_abs_logit_diff']:.3g}.",
        "",
    ]


def _why_missed(result: dict) -> list[str]:
    """For every missed or unresolved target: the node-type profile of the graphs compared."""
    lines = []
    for r in result.get("encoder", {}).get("shapes", []):
        for key, x in r["ratios"].items():
            if x["verdict"] not in (stats.MISSED, stats.INCONCLUSIVE):
                continue
            lines.append(f"- b{r['batch']} x s{r['seq']}: {RATIO_LABELS.get(key, key)} {_fmt(x)} vs target "
                         f"{x['target']:g}: {x['verdict']}.")
            if key == "eager_vs_int8" and "torch:ptv2" in r["median_seconds"]:
                best_base = min(r["median_seconds"][f"ort:{g}"] for g in BASE_GRAPHS)
                lines.append(f"  The base model's best float32 ORT graph is "
                             f"{r['median_seconds'][EAGER] / best_base:.2f}x PyTorch eager at this shape.")
            for name in (x["numerator"], x["denominator"]):
                profile = r.get("profiles", {}).get(name.removeprefix("ort:"))
                if profile:
                    lines.append(f"  Profile `{name}`: {profile['nodes_run']} nodes, kernels "
                                 f"{profile['kernel_ms_per_run']} ms/run; by node type (ms/run): "
                                 f"{profile['ms_per_run_by_node_type']}")
    for row in result["decoder"]["rows"]:
        x = row["ratios"]["tokens_per_s_vs_base"]
        if x["verdict"] in (stats.MISSED, stats.INCONCLUSIVE):
            lines.append(f"- decoder b{row['batch']}: tokens/s ours/base {_fmt(x)} vs >= {DECODER_TARGET}: "
                         f"{x['verdict']}.")
            for name, profile in row.get("step_profiles", {}).items():
                lines.append(f"  One cached step, `{name}`: {profile['nodes_run']} nodes, kernels "
                             f"{profile['kernel_ms_per_run']} ms; by node type (ms): "
                             f"{profile['ms_per_run_by_node_type']}")
    return (["## Missed or unresolved targets", ""] + lines) if lines else []


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=150.0, help="Time budget per shape for adding rounds.")
    parser.add_argument("--min-rounds", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=2000, help="SST-2 train examples for the adapter.")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--heldout-size", type=int, default=10000,
                        help="SST-2 train sentences after the adapter's --train-size ones: int8 vs float32 accuracy "
                        "on them as well as on dev (0: dev only).")
    parser.add_argument("--data", default=None, help="SST-2 folder (train.tsv, dev.tsv); default: the shared copy.")
    parser.add_argument("--work-dir", default=None, help="Where the ONNX graphs go (default: a temporary folder).")
    parser.add_argument("--adapter", default=None,
                        help="A folder this script saved (<work-dir>/adapter, with training.json): reuse its adapter "
                        "instead of training one.")
    parser.add_argument("--decoder-only", action="store_true",
                        help="Only the decoder generation rows (report in results/onnx_inference_decoder).")
    args = parser.parse_args(argv)
    out = common.setup(args, "onnx_inference_decoder" if args.decoder_only else "onnx_inference")
    load_before = _load()
    shapes, make_decoder, new_tokens = SHAPES, small_decoder, NEW_TOKENS
    if args.smoke:
        from tests.tiny_models import tiny_model

        backbone, shapes, args.min_rounds, args.max_seconds = common.tiny_backbone(), [(1, 16), (2, 8)], 2, 0.0
        data, new_tokens = common.synthetic_data(), 4
        held = common.synthetic_data(48, 0, seed=1)
        data.tune_texts, data.tune_labels = held.train_texts, held.train_labels

        def make_decoder():
            return tiny_model("llama", "CAUSAL_LM")
    elif not args.decoder_only:
        backbone = common.minilm_backbone()
        data = common.load_sst2(args.data, train_size=args.train_size, tune_size=args.heldout_size)
    command = "python -m benchmarks.onnx_inference " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.decoder_only:
        with tempfile.TemporaryDirectory(prefix="ptv2-onnx-bench-") as tmp:
            work = Path(args.work_dir) if args.work_dir else Path(tmp)
            decoder = decoder_rows(make_decoder, args.n, args.threads, args.max_seconds, args.min_rounds, work,
                                   new_tokens)
        meta = {"command": command, "n": args.n, "threads": args.threads, "max_seconds": args.max_seconds,
                "machine": common.machine("onnxruntime"), "load_before": load_before, "load_after": _load()}
        common.write_json(out / "results.json", {"meta": meta, "decoder": decoder})
        common.write_atomic(out / "report.md", decoder_report({"decoder": decoder}, meta))
        print(f"wrote {out / 'report.md'}")
        return {"decoder": decoder}
    with tempfile.TemporaryDirectory(prefix="ptv2-onnx-bench-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, training = adapter_model(backbone, data, args, work)
        paths, op_counts_, models = encoder_graphs(model, backbone, work)
        check = common.random_batch(model.config.vocab_size, 4, 24, seed=3)
        check["attention_mask"][-1, -5:] = 0
        with torch.no_grad():
            expected = {name: m(**check).logits.numpy() for name, m in models.items()}
        parity = {}
        for name, path in paths.items():
            sess = session(path, args.threads)
            parity[name] = float(np.abs(sess.run(None, feed_for(sess, check))[0] - expected[name.split("+")[0]]).max())
        accuracy_sessions = {name: session(paths[name], args.threads) for name in (DEFAULT, INT8)}
        accuracy = dev_accuracy(accuracy_sessions, model,
                                common.Encoded(backbone.tokenizer, data.dev_texts, data.dev_labels))
        heldout = heldout_accuracy(accuracy_sessions, common.Encoded(backbone.tokenizer, data.tune_texts,
                                                                     data.tune_labels)) if data.tune_texts else None
        print(f"SST-2 dev: {accuracy['accuracy']}, int8 - float32 {accuracy['int8_minus_float32_points']:+.2f} "
              f"points {accuracy['interval_points']} {accuracy['verdict']}", flush=True)
        rows = encoder_rows(model, backbone, paths, shapes, args.threads, args.max_seconds, args.min_rounds, work)
        decoder = decoder_rows(make_decoder, args.n, args.threads, args.max_seconds, args.min_rounds, work,
                               new_tokens)
    result = {"encoder": {"training": training, "sst2_dev": accuracy, "sst2_heldout": heldout, "op_counts": op_counts_,
                          "parity_max_abs_diff": parity, "shapes": rows},
              "decoder": decoder}
    meta = {"command": command, "backbone": backbone.name, "n": args.n, "threads": args.threads,
            "max_seconds": args.max_seconds,
            "machine": common.machine("onnxruntime"), "load_before": load_before, "load_after": _load()}
    common.write_json(out / "results.json", {"meta": meta, **result})
    common.write_atomic(out / "report.md", report(result, meta))

    def draw(ax):
        labels = [f"b{r['batch']}s{r['seq']}" for r in rows]
        keys = list(RATIO_LABELS)
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            values = [r["ratios"][key] for r in rows]
            ax.bar([x + i * width for x in range(len(labels))], [v["ratio"] for v in values], width=width,
                   yerr=[[v["ratio"] - v["low"] for v in values], [v["high"] - v["ratio"] for v in values]],
                   label=RATIO_LABELS[key])
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)
        ax.set_yscale("log")
        ax.set_ylabel("ratio (95% CI)")
        ax.set_title("ONNX Runtime CPU: ratios with intervals")
        ax.legend(fontsize=6)

    common.save_plot(out / "onnx_latency.png", draw)
    print(f"wrote {out / 'report.md'}")
    return result


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()

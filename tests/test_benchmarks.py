"""Smoke tests of the benchmark scripts: each runs end to end on a tiny model and writes its report."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import common


def _read(out):
    assert (out / "report.md").is_file()
    return json.loads((out / "results.json").read_text())


def test_quality_smoke(tmp_path):
    from benchmarks import quality

    quality.main(["--smoke", "--threads", "1", "--jobs", "1", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in _read(tmp_path)["results"]}
    assert set(rows) == {m.name for m in common.standard_methods()}
    for row in rows.values():
        assert 0.0 <= row["accuracy_mean"] <= 1.0
        assert row["runs"][0]["steps"] == 4  # 64 examples, batch 16, one epoch
    params = {name: row["trainable_params_without_head"] for name, row in rows.items()}
    assert params["linear_probe"] == 0
    assert 0 < params["lora_r8"] < params["ptv2_mlp"] < params["full_finetune"]
    assert params["ptv2_mlp"] == params["peft_prefix_mlp"]  # same MLP shape as PEFT's prefix tuning
    assert "Target" in (tmp_path / "report.md").read_text()


def test_quality_jobs_in_parallel_give_the_serial_results(tmp_path):
    from benchmarks import quality

    methods = ["ptv2_no_mlp", "lora_r8", "linear_probe"]
    serial = quality.main(["--smoke", "--jobs", "1", "--threads", "1", "--out", str(tmp_path / "a"), "--methods",
                           *methods])
    parallel = quality.main(["--smoke", "--jobs", "2", "--out", str(tmp_path / "b"), "--methods", *methods])
    assert [r["method"] for r in parallel] == methods  # the standard order, whichever worker finished first
    for one, other in zip(serial, parallel):
        assert one["runs"][0]["final_loss"] == other["runs"][0]["final_loss"]
        assert one["accuracy_mean"] == other["accuracy_mean"]
    meta = _read(tmp_path / "b")["meta"]
    assert (meta["jobs"], meta["threads_per_job"]) == (2, 1)
    with pytest.raises(SystemExit):
        quality.main(["--smoke", "--jobs", "0", "--out", str(tmp_path / "c")])


def test_quality_update_keeps_other_rows(tmp_path):
    from benchmarks import quality

    quality.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--methods", "linear_probe"])
    quality.main(["--smoke", "--threads", "1", "--jobs", "1", "--out", str(tmp_path), "--methods", "ptv2_no_mlp",
                  "--update"])
    assert [r["method"] for r in _read(tmp_path)["results"]] == ["ptv2_no_mlp", "linear_probe"]
    with pytest.raises(SystemExit):
        quality.main(["--smoke", "--out", str(tmp_path), "--methods", "nope"])
    # Rows measured elsewhere (another process or machine) merge without retraining.
    merged = tmp_path / "merged"
    quality.main(["--smoke", "--out", str(merged), "--methods", "--merge-from", str(tmp_path / "results.json")])
    assert [r["method"] for r in _read(merged)["results"]] == ["ptv2_no_mlp", "linear_probe"]
    stored = json.loads((merged / "results.json").read_text())
    stored["meta"]["epochs"] = 99
    (merged / "results.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="budget"):  # a different budget never mixes into one table
        quality.main(["--smoke", "--out", str(merged), "--methods", "--update"])


def test_training_cost_smoke(tmp_path):
    from benchmarks import training_cost

    training_cost.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    result = _read(tmp_path)
    assert set(result["step_seconds"]) == {"ptv2", "peft_prefix", "lora_r8"}
    assert all(v > 0 for v in result["ratios"].values())
    assert "step_ptv2_vs_peft_prefix" in result["ratios"] and "memory_ptv2_vs_lora_r8" in result["ratios"]


def test_inference_smoke(tmp_path):
    from benchmarks import inference

    inference.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    result = _read(tmp_path)
    assert [(r["batch"], r["seq"]) for r in result["encoder"]] == [(1, 16), (2, 8)]
    assert result["encoder"][0]["target"] == 1.05 and isinstance(result["encoder"][0]["met"], bool)
    decoder = result["decoder"][0]
    assert not decoder["errors"], decoder["errors"]
    assert set(decoder["tokens_per_second"]) == {"base", "ptv2", "peft_prefix"}


def test_scaling_smoke(tmp_path):
    from benchmarks import scaling

    scaling.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    rows = _read(tmp_path)["results"]
    assert {(r["n"], r["seq"]) for r in rows} == {(0, 8), (8, 8), (0, 16), (8, 16)}
    by = {(r["n"], r["seq"]): r for r in rows}
    assert by[(8, 16)]["activation_bytes"] > by[(8, 8)]["activation_bytes"]  # memory grows with length
    assert by[(0, 16)]["trainable_params"] < by[(8, 16)]["trainable_params"]


def test_defaults_study_smoke(tmp_path):
    from benchmarks import defaults_study

    log = tmp_path / "runs.jsonl"
    defaults_study.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--epochs", "1", "--log", str(log),
                         "--variant", '{"lr": 1e-3}', "--variant", '{"lr": 1e-2, "prefix_projection": false}'])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["variant"]["lr"] for r in records] == [1e-3, 1e-2]
    for record in records:
        norms = record["key_norms"]
        assert norms[0]["step"] == 0 and norms[-1]["step"] == record["steps"]
        assert norms[-1]["real_key_norm"] > 0 and norms[-1]["prefix_key_norm"] > 0


def test_training_memory_counts_activations():
    backbone = common.tiny_backbone()
    model = common.wrap(common.Method("p", "ptv2", 1e-3, {"num_virtual_tokens": 4}), common.frozen_base(backbone))
    small = common.training_memory(model, common.random_batch(128, 2, 8, labels=True))
    large = common.training_memory(model, common.random_batch(128, 8, 8, labels=True))
    assert large["activation_bytes"] > 2 * small["activation_bytes"] > 0
    assert small["trainable_state_bytes"] == 3 * 4 * common.trainable_parameters(model)


def test_prefix_key_norms_ours_and_peft():
    backbone = common.tiny_backbone()
    for kind in ("ptv2", "peft_prefix"):
        model = common.wrap(common.Method(kind, kind, 1e-3, {"num_virtual_tokens": 4}), common.frozen_base(backbone))
        norms = common.prefix_key_norms(model)
        assert len(norms) == model.config.num_hidden_layers and all(v > 0 for v in norms)
    assert common.prefix_key_norms(backbone.make()) == []


def test_interleaved_times_and_batches():
    calls = []
    times = common.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert calls[2:] == ["a", "b"] * 3  # round-robin after the warm-up
    data = common.Encoded(common.ToyTokenizer(), ["a b c", "a", "a b c d e f"], [0, 1, 0])
    seen = sorted(i for batch in data.batches(2, 0, group_by_length=True) for i in batch["labels"].tolist())
    assert seen == [0, 0, 1]
    batch = data.batch([0, 1])
    assert batch["attention_mask"].sum().item() == 5 + 3 and torch.equal(batch["labels"], torch.tensor([0, 1]))


def test_onnx_inference_smoke(tmp_path):
    pytest.importorskip("onnxruntime")
    from benchmarks import onnx_inference

    onnx_inference.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--work-dir", str(tmp_path / "graphs")])
    result = _read(tmp_path)
    assert max(result["parity_max_abs_diff"].values()) < 1e-4  # every graph computes its PyTorch model's logits
    assert {"base/sdpa", "ptv2/sdpa", "base/eager", "ptv2/eager", "ptv2-mha"} <= set(result["fusions"])
    assert result["fusions"]["ptv2-mha"]["MultiHeadAttention"] == 2  # our fused graph: one node per tiny layer
    assert "MultiHeadAttention" not in result["fusions"]["ptv2/sdpa"]  # the plain graph compared alongside
    row = result["shapes"][0]
    assert row["best_base_graph"].startswith("ort:base/") and row["best_ptv2_graph"].startswith("ort:ptv2")
    assert {"plain_vs_best_base", "mha_vs_best_base", "mha_optimized_vs_best_base"} <= set(row)
    assert not list(tmp_path.glob("*.onnx"))  # graphs never land in the results folder


def test_missed_targets_come_with_their_reasons():
    """Each cost report explains a missed target from its own measurements (profile, memory breakdown, base ORT)."""
    import copy

    from benchmarks import inference, onnx_inference, training_cost

    base = common.tiny_backbone().make().eval()
    models = inference.prefix_models(lambda: copy.deepcopy(base), 4, "SEQ_CLS")
    profile = inference.profile_overhead(models["base"], models["ptv2"], common.random_batch(100, 1, 8), forwards=3)
    assert profile["extra_op_total_seconds"] > 0 and profile["python_seconds"] >= 0
    assert profile["extra_op_calls"]["aten::cat"] >= 2 * 2  # keys and values concatenated in each of 2 layers
    text = "\n".join(inference._why_missed([{"batch": 1, "seq": 8, "overhead_profile": profile}]))
    assert "Why batch 1 x seq 8" in text and "Python" in text

    memory = {"ptv2": {"activation_bytes": 3 << 20, "trainable_state_bytes": 2 << 20, "peak_extra_bytes": 5 << 20},
              "lora_r8": {"activation_bytes": 2 << 20, "trainable_state_bytes": 1 << 20, "peak_extra_bytes": 3 << 20}}
    result = {"ratios": {"memory_ptv2_vs_lora_r8": 5 / 3}, "memory": memory, "batch": 2, "seq": 4,
              "trainable_params": {"ptv2": 10, "lora_r8": 5}, "step_seconds": {}}
    meta = {"command": "x", "backbone": "tiny", "n": 4, "rounds": 1,
            "machine": {"torch_threads": 1, "cpu_count": 1, "torch": "t", "transformers": "t"}}
    assert "+1.0 MiB saved activations" in training_cost.report(result, meta)

    shapes = [{"batch": 1, "seq": 8, "met_vs_eager": False, "eager_vs_ptv2_ort": 1.2,
               "median_seconds": {"ort:base/sdpa": 1.0, "ort:base/eager": 0.8, "torch:base": 1.2}}]
    assert "only 1.50x faster" in "\n".join(onnx_inference._why_missed({"shapes": shapes}))


def test_serving_smoke(tmp_path):
    from benchmarks import serving

    serving.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--work-dir", str(tmp_path)])
    result = _read(tmp_path)
    rows = {r["config"]: r for r in result["results"]}
    assert [r["tasks"] for r in result["results"]] == [1, 1, 1, 4, 16]
    assert rows["constants graph, 1 task"]["vs_constants_graph"] == 1.0
    assert all(r["requests_per_s"] > 0 and r["latency_ms"]["count"] == 24 for r in rows.values())
    assert result["target"] == 0.95 and result["verdict"] and result["ort_verdict"] in ("met", "NOT met")
    assert [r["batch"] for r in result["ort_swap_cost"]] == [1, 8]
    assert list(tmp_path.iterdir()) and not any(p.name.startswith("tmp") for p in tmp_path.iterdir())

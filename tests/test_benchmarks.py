"""Smoke tests of the benchmark scripts: each runs end to end on a tiny model and writes its report."""

from __future__ import annotations

import inspect
import json
import platform

import peft
import peft.peft_model
import pytest
import torch
import transformers
from packaging.version import Version

from benchmarks import common

# PEFT 0.21.2's prefix tuning looks for `past_key_values` in BERT's forward signature; transformers 5.24 renamed it
# `cache`, so from 5.24 on its rows must be reported as not runnable, and below it they must be measured.
PEFT_PREFIX_RUNS_ON_BERT = Version(transformers.__version__) < Version("5.24")
PEFT_REFUSAL = "not runnable: ValueError: Model does not support past key values which are required for prefix tuning."


def _read(out, *packages):
    """results.json, after checking that the report and results name the versions and the lock of full runs."""
    report, result = (out / "report.md").read_text(), json.loads((out / "results.json").read_text())
    machine = result["meta"]["machine"]
    expected = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__}
    expected |= {name: __import__(name).__version__ for name in packages}
    for name, version in expected.items():
        assert machine[name] == version and f"{name} {version}" in report
    assert machine["full_run_lock"]["file"] == "constraints/tf523.txt" and common.BENCHMARK_LOCK_SETUP in report
    return result


class _InspectWithoutPastKeyValues:
    """PEFT's view of forward signatures as on transformers 5.24 (no `past_key_values`), on every version."""

    def __getattr__(self, name):
        return getattr(inspect, name)

    @staticmethod
    def signature(fn):
        sig = inspect.signature(fn)
        return sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "past_key_values"])


@pytest.fixture
def peft_refuses_bert(monkeypatch):
    """Make PEFT's own check raise its real refusal (the 5.24 behaviour), whatever transformers is installed."""
    monkeypatch.setattr(peft.peft_model, "inspect", _InspectWithoutPastKeyValues())


QUALITY_ROWS = ["ptv2_defaults", "ptv2_tuned", "lora_r8_tuned", "peft_prefix_tuned", "full_finetune_tuned"]


def test_quality_protocol_smoke(tmp_path):
    """The whole protocol on a tiny model: choices on the tuning split, every row on dev with every seed, the default
    row marked, parameters while training and shipped, targets in the report."""
    from benchmarks import quality

    quality.main(["--smoke", "--jobs", "1", "--out", str(tmp_path), "--init-study-seeds", "0", "1"])
    result = _read(tmp_path)
    rows = {r["method"]: r for r in result["results"]}
    study = result["meta"]["init_study"]  # every init at the final budget, on the tuning split, both seeds
    assert [r["prefix_init"] for r in study] == list(quality.INITS) and all(r["seeds"] == 2 for r in study)
    logged = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert {r["scored_on"] for r in logged if r["stage"] == "init_study"} == {"tune"}
    assert {r["scored_on"] for r in logged if r["stage"] == "final"} == {"dev"}
    assert list(rows) == QUALITY_ROWS and result["meta"]["complete"] is True
    assert [name for name, r in rows.items() if r["default"]] == ["ptv2_defaults"]
    assert rows["ptv2_defaults"]["options"]["prefix_init"] == result["meta"]["library_default_init"] == "random"
    assert all(r["scored_on"] == "tune" for r in result["search"]) and result["search"]
    families = {r["family"] for r in result["search"]}
    assert families == {"ptv2", "lora_r8", "peft_prefix", "full_finetune"}
    for family in families - {"ptv2"}:  # the same grid for every method: rates x {same head rate, separate head}
        points = {(r["lr"], r["head_lr"]) for r in result["search"] if r["family"] == family}
        assert len(points) == 2 and {head for _, head in points} == {None, quality.HEAD_LR}
    inits = {r["options"]["prefix_init"] for r in result["search"] if r["stage"] == "init"}
    assert inits == set(quality.INITS)
    refused = set() if PEFT_PREFIX_RUNS_ON_BERT else {"peft_prefix_tuned"}
    for name, row in rows.items():
        if name in refused:
            assert row["status"] == PEFT_REFUSAL and row["runs"] == []
        elif row.get("runs"):
            assert row["status"] == "ok" and [r["seed"] for r in row["runs"]] == [0, 1]
            assert all(r["scored_on"] == "dev" and r["steps"] == 4 for r in row["runs"])  # 64 examples, batch 16
            assert 0.0 <= row["accuracy_mean"] <= 1.0
        else:
            assert name == "ptv2_tuned" and row["status"].startswith("same as ptv2_defaults")
    ours, full = rows["ptv2_defaults"], rows["full_finetune_tuned"]
    assert ours["trainable_params_shipped"] < ours["trainable_params_training"]  # the MLP is not shipped
    assert full["trainable_params_shipped"] == full["trainable_params_training"]
    if PEFT_PREFIX_RUNS_ON_BERT:  # both ship n x layers x 2 x hidden prefix numbers (+ the head)
        assert rows["peft_prefix_tuned"]["trainable_params_shipped"] == ours["trainable_params_shipped"]
    report = (tmp_path / "report.md").read_text()
    assert "**Complete.**" in report and "ours-defaults >= best-tuned LoRA r=8" in report
    assert "Search budget" in report and "Final budget" in report and "wall time" in report
    assert "## Initialisation study" in report


def test_quality_resumes_and_reports_partial_runs(tmp_path, capsys):
    """Finished runs are kept in runs.jsonl; a killed run (even mid-line) continues with exactly the missing runs,
    and a run stopped early says PARTIAL and how to finish."""
    from benchmarks import quality

    partial = quality.main(["--smoke", "--jobs", "1", "--out", str(tmp_path), "--stop-after-minutes", "0"])
    assert partial["meta"]["complete"] is False
    assert all(r["status"].startswith("partial") for r in partial["results"])
    report = (tmp_path / "report.md").read_text()
    assert "PARTIAL" in report and "--stop-after-minutes 0" in report
    quality.main(["--smoke", "--jobs", "1", "--out", str(tmp_path)])
    log = tmp_path / "runs.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][: len(lines[-2]) // 2])  # killed while writing
    capsys.readouterr()
    again = quality.main(["--smoke", "--jobs", "1", "--out", str(tmp_path)])
    started = [line for line in capsys.readouterr().out.splitlines() if line.startswith("start ")]
    assert len(started) == 2 and again["meta"]["complete"] is True and again["meta"]["sessions"] == 3
    with pytest.raises(SystemExit, match="another budget"):  # runs of another budget never mix into one table
        quality.main(["--smoke", "--jobs", "1", "--out", str(tmp_path), "--epochs", "2"])


def test_quality_on_a_six_class_file_with_string_labels(tmp_path):
    from benchmarks import quality

    data = tmp_path / "data"
    data.mkdir()
    names = ["anger", "fear", "joy", "love", "sadness", "surprise"]
    for split, size in (("train", 120), ("dev", 18)):
        rows = "".join(f"{names[i % 6]} word{i % 7} thing{i % 5}\t{names[i % 6]}\n" for i in range(size))
        (data / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    result = quality.main(["--smoke", "--jobs", "1", "--out", str(tmp_path / "out"), "--data", str(data),
                           "--seeds", "0"])
    assert result["meta"]["labels"] == names and result["meta"]["complete"] is True
    row = result["results"][0]
    assert len(row["runs"][0]["predicted_class_rates"]) == 6


def test_quality_screen_scores_variants_on_the_tuning_split(tmp_path, monkeypatch):
    """Each variant x seed trains once and is scored on the tuning split, never on dev; every run is logged."""
    from benchmarks import quality, quality_screen

    scored = []
    evaluate = common.evaluate
    monkeypatch.setattr(common, "evaluate", lambda model, data: scored.append(data) or evaluate(model, data))
    variants = ['{"kind": "ptv2", "lr": 1e-3, "base_dropout": 0}', '{"kind": "lora", "lr": 3e-3, "head_lr": null}']
    records = quality_screen.main(["--smoke", "--jobs", "1", "--out", str(tmp_path), "--seeds", "0", "1",
                                   *[arg for v in variants for arg in ("--variant", v)]])
    assert [(r["variant"]["kind"], r["seed"], r["status"]) for r in records] == [
        ("ptv2", 0, "ok"), ("ptv2", 1, "ok"), ("lora", 0, "ok"), ("lora", 1, "ok")]
    assert all(0 <= r["tune_accuracy"] <= 1 for r in records)
    assert records[0]["dropouts_set"] > 0 and "dropouts_set" not in records[2]
    assert records[2]["variant"]["head_lr"] is None and records[0]["variant"]["head_lr"] == quality.HEAD_LR
    assert [json.loads(line)["seed"] for line in (tmp_path / "screen.jsonl").read_text().splitlines()] == [0, 1, 0, 1]
    assert len(scored) == 4 and all(data is quality._encoded("tune") for data in scored)  # never dev


def test_quality_screen_workers_give_the_in_process_results(tmp_path):
    from benchmarks import quality_screen

    args = ["--smoke", "--seeds", "0", "1", "--variant", '{"kind": "ptv2", "lr": 1e-3}']
    alone = quality_screen.main([*args, "--jobs", "1", "--out", str(tmp_path / "a")])
    workers = quality_screen.main([*args, "--jobs", "2", "--out", str(tmp_path / "b")])
    assert [r["final_loss"] for r in alone] == [r["final_loss"] for r in workers]


@pytest.mark.parametrize("variant,problem", [
    ("{kind: ptv2}", "not JSON"), ('{"kind": "adapter", "lr": 1e-3}', "needs a kind"),
    ('{"kind": "ptv2", "lr": 0}', "positive lr"), ('{"kind": "ptv2", "lr": 1e-3, "base_dropout": 1}', "base_dropout"),
    ('{"kind": "ptv2", "lr": 1e-3, "epochs": 9}', "unknown fields"), ('{"kind": "ptv2", "lr": 1e-3, "train": '
                                                                      '{"seed": 3}}', "train.seed"),
    ('{"kind": "ptv2", "lr": 1e-3, "options": [1]}', "JSON objects")])
def test_quality_screen_refuses_a_bad_variant_by_name(variant, problem):
    from benchmarks import quality_screen

    with pytest.raises(SystemExit, match=problem):
        quality_screen.parse_variant(variant, 4)


def test_base_dropout_zero_makes_training_forwards_deterministic():
    from benchmarks import quality_screen
    from tests.tiny_models import tiny_model

    model = tiny_model("bert", "SEQ_CLS").train()
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on
    assert quality_screen.set_base_dropout(model, 0.0) > 0
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_quality_jobs_in_parallel_give_the_serial_results(tmp_path):
    from benchmarks import quality

    serial = quality.main(["--smoke", "--jobs", "1", "--out", str(tmp_path / "a"), "--seeds", "0"])
    parallel = quality.main(["--smoke", "--jobs", "2", "--out", str(tmp_path / "b"), "--seeds", "0"])
    assert [r["method"] for r in parallel["results"]] == QUALITY_ROWS
    for one, other in zip(serial["results"], parallel["results"]):
        assert [r.get("final_loss") for r in one["runs"]] == [r.get("final_loss") for r in other["runs"]]
        assert one.get("accuracy_mean") == other.get("accuracy_mean")
    meta = _read(tmp_path / "b")["meta"]
    assert (meta["jobs"], meta["threads_per_job"]) == (2, 1)
    with pytest.raises(SystemExit):
        quality.main(["--smoke", "--jobs", "0", "--out", str(tmp_path / "c")])


def test_a_peft_refusal_is_a_row_status_and_ours_is_still_measured(tmp_path, peft_refuses_bert):
    """Every benchmark with PEFT prefix rows turns PEFT's refusal into "not runnable" and still measures ours."""
    from benchmarks import inference, quality, training_cost

    rows = {r["method"]: r for r in quality.main(["--smoke", "--jobs", "1", "--out", str(tmp_path / "q"),
                                                  "--seeds", "0"])["results"]}
    assert rows["peft_prefix_tuned"]["status"] == PEFT_REFUSAL and rows["ptv2_defaults"]["accuracy_mean"] >= 0
    assert "(peft_prefix_tuned missing)" in (tmp_path / "q" / "report.md").read_text()

    cost = training_cost.main(["--smoke", "--threads", "1", "--out", str(tmp_path / "t")])
    assert cost["status"] == {"ptv2": "ok", "peft_prefix": PEFT_REFUSAL, "lora_r8": "ok"}
    assert set(cost["step_seconds"]) == {"ptv2", "lora_r8"} and set(cost["ratios"]) == {
        "step_ptv2_vs_lora_r8", "memory_ptv2_vs_lora_r8"}
    report = (tmp_path / "t" / "report.md").read_text()
    assert f"| peft_prefix | {PEFT_REFUSAL} |" in report
    assert "- step time <= 1.0x PEFT prefix tuning: not measured, PEFT prefix tuning not runnable" in report

    models, status = inference.prefix_models(common.tiny_backbone().make, 4, "SEQ_CLS")
    assert set(models) == {"base", "ptv2"} and status["peft_prefix"] == PEFT_REFUSAL


def test_only_peft_s_own_refusal_of_a_peft_row_is_not_runnable(tmp_path, monkeypatch, peft_refuses_bert):
    """Ours never becomes "not runnable" (even on the very error PEFT rows report), nor does any error raised outside
    PEFT or of another type."""
    from benchmarks import quality

    backbone = common.tiny_backbone()
    peft_row = common.Method("peft_prefix", "peft_prefix", 1e-3, {"num_virtual_tokens": 4})

    def refused_by_peft():
        common.wrap(peft_row, common.frozen_base(backbone))(**common.random_batch(128, 1, 4))

    assert common.run_or_not_runnable("peft_prefix", refused_by_peft) == (None, PEFT_REFUSAL)
    with pytest.raises(ValueError, match="past key values"):
        common.run_or_not_runnable("ptv2", refused_by_peft)

    def refused_outside_peft():
        raise ValueError("Model does not support past key values which are required for prefix tuning.")

    with pytest.raises(ValueError, match="past key values"):
        common.run_or_not_runnable("peft_prefix", refused_outside_peft)

    def crashes_in_peft(*args, **kwargs):
        raise RuntimeError("a PEFT bug, not an incompatibility")

    with monkeypatch.context() as patch:
        patch.setattr(peft.peft_model.PeftModelForSequenceClassification, "_prefix_tuning_forward", crashes_in_peft)
        with pytest.raises(RuntimeError, match="PEFT bug"):
            common.build_method(peft_row, backbone.make)

    wrap = common.wrap

    def ours_broken(method, base, task="SEQ_CLS"):
        if method.kind == "ptv2":
            raise ValueError("Model does not support past key values which are required for prefix tuning.")
        return wrap(method, base, task)

    monkeypatch.setattr(common, "wrap", ours_broken)
    with pytest.raises(ValueError, match="past key values"):
        quality.main(["--smoke", "--jobs", "1", "--out", str(tmp_path), "--seeds", "0"])


def test_training_cost_smoke(tmp_path):
    from benchmarks import training_cost

    training_cost.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    result = _read(tmp_path)
    peft_status = "ok" if PEFT_PREFIX_RUNS_ON_BERT else PEFT_REFUSAL
    assert result["status"] == {"ptv2": "ok", "peft_prefix": peft_status, "lora_r8": "ok"}
    measured = {name for name, status in result["status"].items() if status == "ok"}
    assert set(result["step_seconds"]) == set(result["memory"]) == measured
    assert all(0 < v["low"] <= v["ratio"] <= v["high"] for v in result["ratios"].values())
    step = result["ratios"]["step_ptv2_vs_lora_r8"]
    assert step["rounds"] == 3 and step["verdict"] in ("MET", "MISSED", "INCONCLUSIVE")
    assert "memory_ptv2_vs_lora_r8" in result["ratios"]
    assert ("step_ptv2_vs_peft_prefix" in result["ratios"]) == PEFT_PREFIX_RUNS_ON_BERT


def test_training_cost_verdicts_read_the_interval_not_the_median():
    """A step-time ratio whose point estimate meets its target but whose interval straddles it is INCONCLUSIVE."""
    from benchmarks import training_cost

    def result(ours: list[float]) -> dict:
        memory = {"peak_extra_bytes": 1}
        return {"step_rounds": {"ptv2": ours, "peft_prefix": [1.0] * len(ours)},
                "memory": {"ptv2": memory, "peft_prefix": memory}}

    noisy = training_cost.ratios(result([0.90, 1.08, 0.93, 1.05, 0.97, 1.02]))["step_ptv2_vs_peft_prefix"]
    assert noisy["ratio"] < 1.0 < noisy["high"] and noisy["verdict"] == "INCONCLUSIVE"
    steady = training_cost.ratios(result([0.95, 0.96, 0.94, 0.95, 0.96, 0.95]))["step_ptv2_vs_peft_prefix"]
    assert steady["high"] < 1.0 and steady["verdict"] == "MET"
    exact = training_cost.ratios(result([1.0, 1.0]))["memory_ptv2_vs_peft_prefix"]
    assert exact["ratio"] == exact["low"] == exact["high"] == 1.0 and exact["verdict"] == "MET"


def test_inference_smoke(tmp_path):
    from benchmarks import inference

    inference.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    result = _read(tmp_path)
    assert [(r["batch"], r["seq"]) for r in result["encoder"]] == [(1, 16), (2, 8)]
    assert result["encoder"][0]["target"] == 1.05 and isinstance(result["encoder"][0]["met"], bool)
    peft_status = "ok" if PEFT_PREFIX_RUNS_ON_BERT else PEFT_REFUSAL
    assert result["status"]["encoder"] == {"base": "ok", "ptv2": "ok", "peft_prefix": peft_status}
    encoder = {"base", "ptv2"} | ({"peft_prefix"} if PEFT_PREFIX_RUNS_ON_BERT else set())
    assert all(set(r["latency_seconds"]) == encoder for r in result["encoder"])
    assert ("peft_prefix_vs_base" in result["encoder"][0]) == PEFT_PREFIX_RUNS_ON_BERT
    # PEFT's prefix tuning still runs on Llama on every version: the decoder rows are all measured.
    assert set(result["status"]["decoder"].values()) == {"ok"}
    assert set(result["decoder"][0]["tokens_per_second"]) == {"base", "ptv2", "peft_prefix"}
    assert (f"- `peft_prefix`: {PEFT_REFUSAL}" in (tmp_path / "report.md").read_text()) != PEFT_PREFIX_RUNS_ON_BERT
    for row in result["encoder"]:  # every ratio with its interval; a verdict from the whole interval
        low, high = row["ptv2_vs_base_interval"]
        assert low <= row["ptv2_vs_base"] <= high
    first = result["encoder"][0]
    assert first["met"] == (first["verdict"] == "MET") and first["verdict"] in {"MET", "MISSED", "INCONCLUSIVE"}


def test_inference_measures_adapters_as_served():
    """Both adapters are saved and reloaded for inference (PEFT's prefix tuning then skips its MLP)."""
    from benchmarks import inference

    models, status = inference.prefix_models(common.tiny_backbone().make, 4, "SEQ_CLS")
    adapters = [name for name in ("ptv2", "peft_prefix") if status[name] == "ok"]
    assert "ptv2" in adapters
    for name in adapters:
        assert isinstance(models[name], peft.PeftModel) and models[name].peft_config["default"].inference_mode
        assert not any(p.requires_grad for p in models[name].parameters())


def test_gap_breakdown_measures_a_floor_that_computes_what_ours_computes(monkeypatch):
    """The floor model gives ours' logits with no adapter code; a floor that left the prefix out would be caught."""
    import copy

    from benchmarks import inference

    base = common.tiny_backbone().make().eval()
    models, _ = inference.prefix_models(lambda: copy.deepcopy(base), 4, "SEQ_CLS")
    inputs = common.random_batch(100, 2, 8)
    breakdown = inference.gap_breakdown(lambda: copy.deepcopy(base), models["base"], models["ptv2"], inputs, 3, 1)
    if Version(transformers.__version__) < Version("5"):  # BERT computes attention inline there
        assert "computes attention inline" in breakdown["unavailable"]
        assert "No attention floor" in inference._breakdown_text(breakdown, 1.05)
        return
    assert breakdown["rounds"] == 3
    for name in ("floor", "ptv2_without_peft_wrapper", "ptv2"):
        low, high = breakdown[f"{name}_vs_base_interval"]
        assert low <= breakdown[f"{name}_vs_base"] <= high
    floor = inference.attention_floor_model(lambda: copy.deepcopy(base), models["ptv2"])
    with torch.inference_mode():
        assert torch.allclose(floor(**inputs).logits, models["ptv2"](**inputs).logits, atol=1e-5)
        assert not torch.allclose(models["base"](**inputs).logits, models["ptv2"](**inputs).logits, atol=1e-5)
    monkeypatch.setattr(inference, "_FLOOR_PREFIXES", {})
    real = inference.attention_floor_model
    def prefix_left_out(make, served):
        model = real(make, served)
        for module, (key, value, attend) in inference._FLOOR_PREFIXES.items():
            inference._FLOOR_PREFIXES[module] = (key[:, :, :0], value[:, :, :0], attend)
        return model
    monkeypatch.setattr(inference, "attention_floor_model", prefix_left_out)
    with pytest.raises(AssertionError, match="computes something else"):
        inference.gap_breakdown(lambda: copy.deepcopy(base), models["base"], models["ptv2"], inputs, 3, 1)


def test_gap_breakdown_text_says_what_the_floor_leaves_reachable():
    from benchmarks import inference

    def breakdown(floor, inner, served, floor_interval):
        return {"rounds": 10, "floor_vs_base": floor, "floor_vs_base_interval": floor_interval,
                "ptv2_without_peft_wrapper_vs_base": inner, "ptv2_without_peft_wrapper_vs_base_interval": [inner] * 2,
                "ptv2_vs_base": served, "ptv2_vs_base_interval": [served] * 2}
    text = inference._breakdown_text(breakdown(1.02, 1.06, 1.08, [1.01, 1.03]), 1.05)
    assert "costs +2.0 points, our hooks and layers +4.0, PEFT's `PeftModel` wrapper (the same for any PEFT " \
           "adapter) +2.0" in text
    assert "what is left above it is our hooks and layers" in text
    conclusions = {"no way of serving": breakdown(1.06, 1.07, 1.08, [1.055, 1.065]),
                   "reaches past the target": breakdown(1.04, 1.06, 1.08, [1.02, 1.06]),
                   "even with no adapter code": breakdown(1.03, 1.05, 1.08, [1.02, 1.04])}
    for conclusion, numbers in conclusions.items():
        text = inference._breakdown_text(numbers, 1.05)
        assert [phrase for phrase in conclusions if phrase in text] == [conclusion]


def test_scaling_smoke(tmp_path):
    from benchmarks import scaling

    scaling.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])  # ours only: no PEFT rows
    rows = _read(tmp_path)["results"]
    assert {(r["n"], r["seq"]) for r in rows} == {(0, 8), (8, 8), (0, 16), (8, 16)}
    by = {(r["n"], r["seq"]): r for r in rows}
    assert by[(8, 16)]["activation_bytes"] > by[(8, 8)]["activation_bytes"]  # memory grows with length
    assert by[(0, 16)]["trainable_params"] < by[(8, 16)]["trainable_params"]


def test_defaults_study_smoke(tmp_path):
    from benchmarks import defaults_study

    log = tmp_path / "runs.jsonl"
    defaults_study.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--epochs", "1", "--log", str(log),
                         "--variant", '{"lr": 1e-3}', "--variant", '{"lr": 1e-2, "prefix_projection": false}',
                         "--variant", '{"kind": "peft_prefix", "lr": 1e-2}'])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["variant"]["lr"] for r in records] == [1e-3, 1e-2, 1e-2]
    assert all(r["machine"]["transformers"] == transformers.__version__ for r in records)
    *ours, peft_record = records
    if not PEFT_PREFIX_RUNS_ON_BERT:
        assert peft_record["status"] == PEFT_REFUSAL and "key_norms" not in peft_record
    else:
        ours.append(peft_record)
    for record in ours:
        assert record["status"] == "ok"
        norms = record["key_norms"]
        assert norms[0]["step"] == 0 and norms[-1]["step"] == record["steps"]
        assert norms[-1]["real_key_norm"] > 0 and norms[-1]["prefix_key_norm"] > 0
    defaults_study.main(["--out", str(tmp_path), "--render", str(log)])
    report = (tmp_path / "report.md").read_text()
    assert f"transformers {transformers.__version__}" in report and common.BENCHMARK_LOCK_SETUP in report
    assert (PEFT_REFUSAL in report) != PEFT_PREFIX_RUNS_ON_BERT


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
    times = common.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 40, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 40, "b": 40}
    rounds = [tuple(calls[i:i + 2]) for i in range(2, len(calls), 2)]  # after the warm-up
    assert set(rounds) == {("a", "b"), ("b", "a")}  # each once per round, in a shuffled order
    data = common.Encoded(common.ToyTokenizer(), ["a b c", "a", "a b c d e f"], [0, 1, 0])
    seen = sorted(i for batch in data.batches(2, 0, group_by_length=True) for i in batch["labels"].tolist())
    assert seen == [0, 0, 1]
    batch = data.batch([0, 1])
    assert batch["attention_mask"].sum().item() == 5 + 3 and torch.equal(batch["labels"], torch.tensor([0, 1]))


def test_onnx_inference_smoke(tmp_path):
    pytest.importorskip("onnxruntime")
    from benchmarks import onnx_inference, stats

    onnx_inference.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--work-dir", str(tmp_path / "graphs")])
    result = _read(tmp_path, "onnxruntime")
    encoder = result["encoder"]
    parity = encoder["parity_max_abs_diff"]
    assert max(v for k, v in parity.items() if k != "ptv2-int8") < 1e-4  # every float graph computes its model
    assert 0 < parity["ptv2-int8"] < 0.5  # int8: close, not equal
    ops = encoder["op_counts"]
    assert ops["ptv2"]["MultiHeadAttention"] == 2  # the default export: one fused node per tiny layer
    assert "MultiHeadAttention" not in ops["ptv2-plain"] and ops["ptv2-int8"]["MatMulInteger"] > 0
    row = encoder["shapes"][0]
    ratios = row["ratios"]
    assert ratios["default_vs_best_base"]["numerator"] == "ort:ptv2"  # the default export, not the best of ours
    assert ratios["default_vs_best_base"]["denominator"] in {f"ort:{g}" for g in onnx_inference.BASE_GRAPHS}
    assert ratios["fused_vs_plain"]["denominator"] == "ort:ptv2-plain"
    for value in ratios.values():
        assert value["low"] <= value["ratio"] <= value["high"] and value["rounds"] >= 2
    assert ratios["default_vs_best_base"]["verdict"] in (stats.MET, stats.MISSED, stats.INCONCLUSIVE)
    accuracy = encoder["sst2_dev"]
    assert set(accuracy["accuracy"]) == {"ptv2", "ptv2-int8", "torch"} and accuracy["verdict"]
    heldout = encoder["sst2_heldout"]  # the same comparison on sentences outside the adapter's training set
    assert heldout["examples"] == 48 and set(heldout["accuracy"]) == {"ptv2", "ptv2-int8"} and heldout["verdict"]
    assert "Held out from SST-2 train (48 sentences" in (tmp_path / "report.md").read_text()
    decoder = result["decoder"]["rows"]
    assert [r["batch"] for r in decoder] == [1, 8] and all(r["tokens_per_s"]["ort:ptv2"] > 0 for r in decoder)
    assert not list(tmp_path.glob("*.onnx"))  # graphs never land in the results folder


def test_onnx_inference_trains_the_same_adapter_whatever_the_process_seed():
    from benchmarks import onnx_inference

    tiny = common.tiny_backbone()

    def make() -> torch.nn.Module:  # unlike tiny_model, MiniLM's from_pretrained does not seed: keep the state
        state = torch.get_rng_state()
        model = tiny.make()
        torch.set_rng_state(state)
        return model

    backbone = common.Backbone(tiny.name, make, tiny.tokenizer)

    def trained(process_seed: int, seed: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(process_seed)  # a fresh process's torch seed differs from run to run
        model, _ = onnx_inference.train_adapter(backbone, common.synthetic_data(), 4, 0.5, seed=seed)
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    first, again, other = trained(1), trained(2), trained(1, seed=1)
    assert first and all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)  # the seed is what decides


def test_onnx_inference_decoder_only(tmp_path):
    """``--decoder-only`` measures the decoder rows alone and writes their own report (no encoder, no training)."""
    pytest.importorskip("onnxruntime")
    from benchmarks import onnx_inference

    onnx_inference.main(["--smoke", "--decoder-only", "--threads", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert "encoder" not in result
    assert [r["batch"] for r in result["decoder"]["rows"]] == [1, 8]
    report = (tmp_path / "report.md").read_text()
    assert "## Decoder generation" in report and "--decoder-only" in report


def test_onnx_inference_measures_several_ratios_until_resolved():
    """``measure`` keeps adding rounds while a targeted ratio is unresolved, and picks the fastest denominator."""
    from benchmarks import onnx_inference

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    ratios = {"a_vs_best": onnx_inference.Ratio("a", ("b", "c")), "a_vs_b": onnx_inference.Ratio("a", "b", 1.0)}
    results, rounds = onnx_inference.measure(fns, ratios, min_rounds=3, batch_rounds=2, max_rounds=7)
    assert len(rounds["a"]) in (3, 5, 7) and results["a_vs_best"]["denominator"] in ("b", "c")
    assert results["a_vs_b"]["target"] == 1.0 and results["a_vs_best"]["verdict"] is None
    rounds = {"x": [2.0, 2.0, 2.0], "fast": [1.0, 1.0, 1.0], "slow": [4.0, 4.0, 4.0]}
    value = onnx_inference.estimate(rounds, onnx_inference.Ratio("x", ("slow", "fast"), 1.05))
    assert value["denominator"] == "fast" and value["ratio"] == pytest.approx(2.0) and value["verdict"] == "MISSED"


def test_missed_targets_come_with_their_reasons():
    """Each cost report explains a missed target from its own measurements (profile, memory breakdown, base ORT)."""
    import copy

    from benchmarks import inference, onnx_inference, training_cost

    base = common.tiny_backbone().make().eval()
    models, _ = inference.prefix_models(lambda: copy.deepcopy(base), 4, "SEQ_CLS")
    profile = inference.profile_overhead(models["base"], models["ptv2"], common.random_batch(100, 1, 8), forwards=3)
    assert profile["extra_op_total_seconds"] > 0 and profile["python_seconds"] >= 0
    assert profile["extra_op_calls"]["aten::cat"] >= 2 * 2  # keys and values concatenated in each of 2 layers
    def why(measured: dict) -> str:
        return "\n".join(inference._why_missed([{"batch": 1, "seq": 8, "overhead_profile": measured}]))

    assert "Why batch 1 x seq 8" in why(profile)
    # Which explanation follows depends on the measured gap (noisy over 3 forwards), so both are checked on fixed ones.
    for wall, reason in ((2e-3, "Python"), (1e-3, "run-to-run noise")):
        assert reason in why({**profile, "extra_wall_seconds": wall, "extra_op_total_seconds": 1e-3})

    memory = {"ptv2": {"activation_bytes": 3 << 20, "trainable_state_bytes": 2 << 20, "peak_extra_bytes": 5 << 20},
              "lora_r8": {"activation_bytes": 2 << 20, "trainable_state_bytes": 1 << 20, "peak_extra_bytes": 3 << 20}}
    steps = {"median": 1.0, "std": 0.0}
    result = {"ratios": {"memory_ptv2_vs_lora_r8": {"ratio": 5 / 3, "low": 5 / 3, "high": 5 / 3, "verdict": "MISSED"}},
              "memory": memory, "batch": 2, "seq": 4,
              "status": {"ptv2": "ok", "lora_r8": "ok"}, "trainable_params": {"ptv2": 10, "lora_r8": 5},
              "step_seconds": {"ptv2": steps, "lora_r8": steps}}
    meta = {"command": "x", "backbone": "tiny", "n": 4, "rounds": 1, "machine": common.machine()}
    assert "+1.0 MiB saved activations" in training_cost.report(result, meta)

    missed = {"ratio": 1.2, "low": 1.1, "high": 1.3, "rounds": 10, "target": 2.0, "verdict": "MISSED",
              "numerator": "torch:ptv2", "denominator": "ort:ptv2-int8", "lower_is_better": False}
    medians = {"ort:base/sdpa": 1.0, "ort:base/sdpa+opt": 1.0, "ort:base/eager": 0.8, "ort:base/eager+opt": 0.9,
               "torch:ptv2": 1.2}
    profile = {"nodes_run": 9, "kernel_ms_per_run": 1.5, "ms_per_run_by_node_type": {"MatMulInteger": 1.0}}
    shapes = [{"batch": 1, "seq": 8, "median_seconds": medians, "ratios": {"eager_vs_int8": missed},
               "profiles": {"ptv2-int8": profile}}]
    why = "\n".join(onnx_inference._why_missed({"encoder": {"shapes": shapes}, "decoder": {"rows": []}}))
    assert "1.50x PyTorch eager" in why and "MatMulInteger" in why and "MISSED" in why


def test_serving_smoke(tmp_path):
    from benchmarks import serving

    serving.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--work-dir", str(tmp_path)])
    result = _read(tmp_path, "onnxruntime")
    rows = {r["config"]: r for r in result["results"]}
    assert [r["tasks"] for r in result["results"]] == [1, 1, 1, 4, 16]
    assert rows["constants graph, 1 task"]["vs_constants_graph"] == 1.0
    assert all(r["requests_per_s"] > 0 and r["latency_ms"]["count"] == 24 for r in rows.values())
    assert result["target"] == 0.95 and result["verdict"] and result["ort_verdict"] in ("met", "NOT met")
    assert [r["batch"] for r in result["ort_swap_cost"]] == [1, 8]
    assert list(tmp_path.iterdir()) and not any(p.name.startswith("tmp") for p in tmp_path.iterdir())


def test_the_reports_name_the_lock_that_pins_transformers_5_23():
    lock = (common.ROOT / common.BENCHMARK_LOCK).read_text().splitlines()
    assert f"transformers=={common.BENCHMARK_LOCK_TRANSFORMERS}" in lock and "peft==0.21.2" in lock
    assert common.BENCHMARK_LOCK_SETUP in (common.ROOT / "benchmarks" / "README.md").read_text()


def test_prefix_attention_smoke(tmp_path):
    """Every way of feeding the prefix computes the same attention as the ``cat`` the library uses, and the report
    has one ratio per variant."""
    from benchmarks import prefix_attention

    fns = prefix_attention.variants(2, 8, torch.Generator().manual_seed(0))
    assert prefix_attention.check_equal(fns) < 1e-5
    with torch.inference_mode():
        assert not torch.allclose(fns["cat"](), fns["base"](), atol=1e-2)  # the prefix is in effect
    result = prefix_attention.main(["--threads", "1", "--shapes", "1x8", "--rounds", "2", "--out", str(tmp_path)])
    assert set(result["rows"][0]["vs_base"]) == {"cat", "workspace", "seq_major_cat", "split_softmax", "no_copy_floor"}
    assert set(result["rows"][0]["vs_cat"]) == {"workspace", "seq_major_cat", "split_softmax", "no_copy_floor"}
    assert "| 1 x 8 |" in (tmp_path / "report.md").read_text()


def test_prefix_attention_share_of_a_forward_is_a_fraction():
    from benchmarks import prefix_attention
    from tests.tiny_models import tiny_model

    model = tiny_model("bert", "SEQ_CLS").eval()
    share = prefix_attention.attention_share(model, 2, 8, forwards=3)
    assert 0.0 < share < 1.0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed

"""Quality: SST-2 dev accuracy vs trainable parameters for P-Tuning v2 and the alternatives, same budget and seeds.

    python -m benchmarks.quality [--data DIR] [--seeds 0 1 2] [--methods ptv2_mlp lora_r8 ...] [--jobs 2]

Budget (issue 6): 8,000-example train subset (fixed seed), 3 epochs, batch 32, max length 64, AdamW with linear decay,
grad-norm clip 1.0, length-grouped batches; the classifier head trains in every method. Writes results.json,
report.md and accuracy_vs_params.png under benchmarks/results/quality/.

Methods train in ``--jobs`` worker processes (default: one per CPU core), each with ``--threads`` intra-op threads
(default 1 when several jobs run): on 2 cores two single-threaded trainings take about as long as one with two threads,
and the full set finishes in about half the time.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from benchmarks import common


def run(methods: list[common.Method], seeds: list[int], data: common.TextData, backbone: common.Backbone,
        train_cfg: common.TrainConfig, log=print, on_method=None) -> list[dict]:
    train = common.Encoded(backbone.tokenizer, data.train_texts, data.train_labels)
    dev = common.Encoded(backbone.tokenizer, data.dev_texts, data.dev_labels)
    rows = []
    for method in methods:
        rows.append(run_method(method, seeds, train, dev, backbone, train_cfg, log))
        if on_method is not None:
            on_method(rows)  # a finished method is on disk even if a later one fails
    return rows


def run_method(method: common.Method, seeds: list[int], train: common.Encoded, dev: common.Encoded,
               backbone: common.Backbone, train_cfg: common.TrainConfig, log=print) -> dict:
    """One method's row: trained and evaluated once per seed, or "not runnable" (PEFT rows the installed versions
    refuse) without metrics."""
    row = {"method": method.name, "kind": method.kind, "lr": method.lr, "head_lr": method.head_lr,
           "options": method.options}
    runs = []
    for seed in seeds:
        common.torch.manual_seed(seed)
        model, status = common.build_method(method, backbone.make)
        if model is None:
            log(f"{method.name}: {status}")
            return {**row, "status": status}
        cfg = common.TrainConfig(**{**train_cfg.__dict__, "seed": seed})
        start = time.perf_counter()
        timing = common.train(model, train, method, cfg)
        metrics = common.evaluate(model, dev)
        runs.append({"seed": seed, **metrics, **timing, "wall_seconds": time.perf_counter() - start})
        log(f"{method.name} seed={seed} acc={metrics['accuracy']:.4f} "
            f"positive_rate={metrics['predicted_positive_rate']:.2f} train_s={timing['train_seconds']:.0f}")
    accs = [r["accuracy"] for r in runs]
    return {
        **row,
        "status": common.MEASURED,
        "trainable_params": common.trainable_parameters(model),
        "trainable_params_without_head": common.trainable_parameters(model, exclude_head=True),
        "accuracy_mean": statistics.fmean(accs),
        "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in runs),
        "runs": runs,
    }


def _worker_run(method: common.Method, seeds: list[int], load: tuple, train_cfg: common.TrainConfig,
                threads: int) -> list[dict]:
    """One method in a worker process: it loads its own data and backbone (they do not pickle)."""
    common.torch.set_num_threads(threads)
    data, backbone = _load(*load)
    return run([method], seeds, data, backbone, train_cfg)


def _load(smoke: bool, data_path: str | None, train_size: int) -> tuple[common.TextData, common.Backbone]:
    if smoke:
        return common.synthetic_data(64, 32), common.tiny_backbone()
    return common.load_sst2(data_path, train_size), common.minilm_backbone()


def run_parallel(methods: list[common.Method], seeds: list[int], load: tuple, train_cfg: common.TrainConfig,
                 jobs: int, threads: int, on_method=None) -> list[dict]:
    """``run`` with methods spread over ``jobs`` processes; rows come back in the methods' order."""
    if jobs <= 1 or len(methods) <= 1:
        data, backbone = _load(*load)
        return run(methods, seeds, data, backbone, train_cfg, on_method=on_method)
    done: dict[str, dict] = {}
    order = [m.name for m in methods]
    # Longest first (full fine-tuning and the MLP prefixes), so no worker is left with a long job at the end.
    queue = sorted(methods, key=lambda m: m.kind not in ("full", "ptv2", "peft_prefix"))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_worker_run, m, seeds, load, train_cfg, threads): m for m in queue}
        for future in as_completed(futures):
            for row in future.result():
                done[row["method"]] = row
                print(f"{row['method']}: {_outcome(row)} ({len(done)}/{len(methods)} done)")
            if on_method is not None:
                on_method([done[name] for name in order if name in done])
    return [done[name] for name in order]


def merge(previous: dict, rows: list[dict], meta: dict) -> list[dict]:
    """``rows`` plus the earlier rows of other methods, in the standard order, if measured under the same budget."""
    keys = ("backbone", "train_size", "dev_size", "epochs", "batch_size", "seeds")
    old_meta = previous.get("meta", {})
    if any(old_meta.get(k) != meta.get(k) for k in keys):
        earlier = [(k, old_meta.get(k)) for k in keys]
        raise SystemExit(f"--update: the earlier results.json used another budget {earlier}; rerun without --update.")
    fresh = {r["method"]: r for r in rows}
    merged = {r["method"]: r for r in previous.get("results", [])} | fresh
    order = [m.name for m in common.standard_methods()]
    return sorted(merged.values(), key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))


def _rates(row: dict) -> str:
    return f"{row['lr']:g}" + (f" ({row['head_lr']:g})" if row.get("head_lr") else "")


def _outcome(row: dict) -> str:
    return f"{100 * row['accuracy_mean']:.2f}" if common.is_measured(row) else row["status"]


HEADERS = ["method", "lr (head lr)", "dev accuracy (mean)", "std", "trainable params", "without head", "train s (mean)"]


def _table_row(r: dict) -> list:
    if not common.is_measured(r):
        return common.status_row([r["method"], _rates(r)], r["status"], len(HEADERS))
    return [r["method"], _rates(r), f"{100 * r['accuracy_mean']:.2f}", f"{100 * r['accuracy_std']:.2f}",
            r["trainable_params"], r["trainable_params_without_head"], f"{r['train_seconds_mean']:.0f}"]


def report(rows: list[dict], meta: dict) -> str:
    by_name = {r["method"]: r for r in rows if common.is_measured(r)}
    lines = [
        "# Quality: SST-2 dev accuracy vs trainable parameters",
        "",
        f"Command: `{meta['command']}`  ",
        f"Backbone: {meta['backbone']} (frozen except the method's parameters and the classifier head); "
        f"train subset {meta['train_size']} (seed {common.DATA_SEED}), dev {meta['dev_size']}; "
        f"{meta['epochs']} epochs, batch {meta['batch_size']}, max length {common.MAX_LENGTH}; "
        f"seeds {meta['seeds']}.  ",
        f"Machine: {meta['machine']['platform']}, {meta['machine']['cpu_count']} CPUs.  ",
        *common.environment_lines(meta["machine"]),
        "",
        common.markdown_table(HEADERS, [_table_row(r) for r in rows]),
        "",
    ]
    full = by_name.get("full_finetune")
    peft_rows = [r for r in rows if r["kind"] in common.PEFT_BASELINE_KINDS]
    peft_prefix = [r for r in peft_rows if common.is_measured(r)]
    best_peft = max(peft_prefix, key=lambda r: r["accuracy_mean"]) if peft_prefix else None
    # The recommended recipe (prefix 1e-3, head 1e-2: ptv2_plugin.create_optimizer) and the one-rate variant.
    for name in ("ptv2_mlp_head_lr1e-2", "ptv2_mlp"):
        ours = by_name.get(name)
        if ours and full:
            gap = 100 * (full["accuracy_mean"] - ours["accuracy_mean"])
            verdict = "MET" if gap <= 1.0 else f"MISSED by {gap - 1.0:.2f}"
            lines.append(f"- Target `P-Tuning v2 >= full fine-tuning - 1 point` ({name}): gap {gap:.2f} points -> "
                         f"{verdict}.")
        if ours and best_peft:
            margin = 100 * (ours["accuracy_mean"] - best_peft["accuracy_mean"])
            lines.append(f"- Target `above PEFT prefix tuning` ({name} vs best PEFT prefix row "
                         f"{best_peft['method']}): {margin:+.2f} points -> {'MET' if margin > 0 else 'MISSED'}.")
        elif ours and peft_rows:
            lines.append(f"- Target `above PEFT prefix tuning` ({name}): {common.not_measured(meta['machine'])}.")
    lora = by_name.get("lora_r8")
    if full and lora:
        lora_gap = 100 * (full["accuracy_mean"] - lora["accuracy_mean"])
        lines.append(f"- For scale: LoRA r=8, the other frozen-backbone method, is {lora_gap:.2f} points under full "
                     "fine-tuning at this budget (3 epochs).")
    if len(meta["seeds"]) == 1:
        lines.append(f"- One seed: one dev sentence is {100 / meta['dev_size']:.2f} points, and the seed-to-seed "
                     "spread is not measured by this run (`--seeds 0 1 2` reports mean and spread).")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path) -> None:
    def draw(ax):
        for r in filter(common.is_measured, rows):
            params = max(r["trainable_params_without_head"], 1)
            ax.errorbar(params, 100 * r["accuracy_mean"], yerr=100 * r["accuracy_std"], fmt="o", capsize=3)
            ax.annotate(r["method"], (params, 100 * r["accuracy_mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (without the shared classifier head; linear probe plotted at 1)")
        ax.set_ylabel("SST-2 dev accuracy (%)")
        ax.set_title("Accuracy vs trainable parameters")
        ax.grid(True, alpha=0.3)

    common.save_plot(path, draw)


def main(argv=None) -> list[dict]:
    import sys

    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="SST-2 folder with train.tsv and dev.tsv.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="*", default=None, help="Subset of method names (default: all).")
    parser.add_argument("--train-size", type=int, default=common.TRAIN_SIZE)
    parser.add_argument("--epochs", type=float, default=common.EPOCHS)
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="Worker processes, one method each at a time (default: one per CPU core).")
    parser.add_argument("--merge-from", nargs="*", default=[], metavar="RESULTS_JSON",
                        help="Also keep the rows of these results.json files (same budget), e.g. from other machines; "
                        "with --methods and no method names left to run, only merges.")
    parser.add_argument("--update", action="store_true",
                        help="Keep the other methods' rows of an earlier results.json (same budget) and replace only "
                        "the rows of the methods run now: lets methods run in separate processes.")
    parser.set_defaults(threads=None)  # default: 1 per job when several run, else 2
    args = parser.parse_args(argv)
    methods = common.standard_methods(args.num_virtual_tokens)
    if args.methods is not None:
        unknown = set(args.methods) - {m.name for m in methods}
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; choose from {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in args.methods]
    train_cfg = common.TrainConfig(epochs=1, batch_size=16) if args.smoke else common.TrainConfig(epochs=args.epochs)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    jobs = min(args.jobs, max(1, len(methods)))
    threads = args.threads = args.threads or (1 if jobs > 1 else 2)
    out = common.setup(args, "quality")
    load = (args.smoke, args.data, args.train_size)
    data, backbone = _load(*load)
    meta = {
        "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "backbone": backbone.name,
        "train_size": len(data.train_texts),
        "dev_size": len(data.dev_texts),
        "epochs": train_cfg.epochs,
        "batch_size": train_cfg.batch_size,
        "seeds": args.seeds,
        "train_config": train_cfg,
        "machine": common.machine(),
        "jobs": jobs,
        "threads_per_job": threads,
    }
    earlier = []
    if args.update and (out / "results.json").is_file():
        earlier.append(json.loads((out / "results.json").read_text()))
    earlier += [json.loads(Path(path).read_text()) for path in args.merge_from]

    def save(fresh: list[dict]) -> list[dict]:
        rows = fresh
        for previous in earlier:
            rows = merge(previous, rows, meta)
        common.write_json(out / "results.json", {"meta": meta, "results": rows})
        common.write_atomic(out / "report.md", report(rows, meta))
        plot(rows, out / "accuracy_vs_params.png")
        return rows

    start = time.perf_counter()
    rows = run_parallel(methods, args.seeds, load, train_cfg, jobs, threads, on_method=save)
    meta["wall_seconds"] = time.perf_counter() - start
    rows = save(rows)
    print(f"wrote {out / 'report.md'}")
    return rows


if __name__ == "__main__":
    main()

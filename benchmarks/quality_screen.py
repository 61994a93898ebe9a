"""Screen training-recipe ideas on the quality protocol's tuning split (never on dev).

    python -m benchmarks.quality_screen --variant '{"kind": "ptv2", "lr": 1e-3}' --seeds 0 1 2 --budget final
    python -m benchmarks.quality_screen --smoke --variant '{"kind": "lora", "lr": 3e-3, "base_dropout": 0}'

The protocol (benchmarks/quality.py) searches only learning rates and ours' initialisation; other ideas that might
close a missed target (a recipe change, an option) are tried here first, on the same splits, model and training loop,
scored on the tuning split. Only an idea that beats the defaults there by more than the seed spread is worth a change
of defaults and a new protocol run on dev.

A variant is JSON: ``kind`` (ptv2 | lora | peft_prefix | full), ``lr``, optional ``head_lr`` (default 1e-2, the
protocol's separate head rate; null trains the head at ``lr``), ``options`` for the method's config (ours gets the
protocol's prefix settings unless it overrides them), ``base_dropout`` (a probability every dropout of the model,
the frozen layers' and the head's, is set to, e.g. 0 to train without dropout) and ``train`` (fields of
``common.TrainConfig``, e.g. ``{"warmup_ratio": 0.1}``). Budgets are the protocol's: ``search`` (first 2,000
examples of the training subset, 2 epochs) and ``final`` (8,000 x 3 epochs). Each finished run appends one JSON line
to ``screen.jsonl`` in ``--out``.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack

import torch

from benchmarks import common, quality

BUDGETS = {"search": {"train_size": 2000, "epochs": 2.0}, "final": {"train_size": common.TRAIN_SIZE,
                                                                    "epochs": common.EPOCHS}}
SMOKE_BUDGET = {"train_size": 32, "epochs": 1.0}
TRAIN_FIELDS = set(common.TrainConfig.__dataclass_fields__) - {"epochs", "seed"}  # what a variant's "train" may set


def parse_variant(text: str, n: int) -> dict:
    """A variant from its JSON, with the protocol's defaults filled in; a bad one is refused with its problem."""
    try:
        variant = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--variant is not JSON ({error}): {text!r}") from None
    if not isinstance(variant, dict) or variant.get("kind") not in ("ptv2", "lora", "peft_prefix", "full"):
        raise SystemExit(f"--variant needs a kind among ptv2, lora, peft_prefix, full: {text!r}")
    if not isinstance(variant.get("lr"), (int, float)) or not variant["lr"] > 0:
        raise SystemExit(f"--variant needs a positive lr: {text!r}")
    dropout = variant.get("base_dropout")
    if dropout is not None and not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise SystemExit(f"--variant's base_dropout must be in [0, 1): {text!r}")
    if not isinstance(variant.get("options", {}), dict) or not isinstance(variant.get("train", {}), dict):
        raise SystemExit(f"--variant's options and train must be JSON objects: {text!r}")
    unknown = set(variant) - {"kind", "lr", "head_lr", "options", "base_dropout", "train", "name"}
    unknown |= {f"train.{k}" for k in set(variant.get("train", {})) - TRAIN_FIELDS}
    if unknown:
        raise SystemExit(f"--variant has unknown fields {sorted(unknown)}: {text!r}")
    defaults = quality.families(n)
    family = next(f for f in defaults if f.kind == variant["kind"])
    variant["options"] = {**family.options, **variant.get("options", {})}
    variant.setdefault("head_lr", quality.HEAD_LR)
    variant.setdefault("name", family.name)
    return variant


def set_base_dropout(model: torch.nn.Module, p: float) -> int:
    """Every dropout of ``model`` (the frozen model's and the head's) to ``p``: each ``nn.Dropout``, and each float
    attribute with "dropout" in its name, which some attention modules pass to their kernel instead (BERT's
    ``dropout_prob`` on transformers 4.57, Llama's ``attention_dropout``); returns how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
            count += 1
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, p)
                count += 1
    return count


def run(variant: dict, budget: dict, seed: int) -> dict:
    """Train one variant in this worker (set up by ``quality._init_worker``) and score it on the tuning split."""
    method = common.Method(variant["name"], variant["kind"], variant["lr"], dict(variant["options"]),
                           variant["head_lr"])
    torch.manual_seed(seed)
    model, status = common.build_method(method, quality._WORKER["backbone"].make)
    record = {"variant": variant, "seed": seed, "budget": budget, "status": status}
    if model is None:
        return record
    if variant.get("base_dropout") is not None:
        record["dropouts_set"] = set_base_dropout(model, variant["base_dropout"])
    cfg = common.TrainConfig(**{"batch_size": budget["batch_size"], **variant.get("train", {}),
                                "epochs": budget["epochs"], "seed": seed})
    start = time.perf_counter()
    timing = common.train(model, quality._encoded("train", budget["train_size"]), method, cfg)
    scored = common.evaluate(model, quality._encoded("tune"))
    return {**record, "tune_accuracy": scored["accuracy"], "predicted_class_rates": scored["predicted_class_rates"],
            "final_loss": timing["final_loss"], "train_seconds": time.perf_counter() - start}


def main(argv=None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="A variant as JSON (repeatable).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="search")
    parser.add_argument("--data", default=None, help="SST-2 folder with train.tsv and dev.tsv.")
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2, help="Worker processes (one thread each).")
    parser.set_defaults(threads=1)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    variants = [parse_variant(text, 4 if args.smoke else args.num_virtual_tokens) for text in args.variant]
    out = common.setup(args, "quality_screen")
    budget = {**(SMOKE_BUDGET if args.smoke else BUDGETS[args.budget]), "batch_size": 16 if args.smoke else 32}
    # the protocol's splits: the training subset and the disjoint tuning split after it (quality._load)
    load = (args.smoke, args.data, 64 if args.smoke else common.TRAIN_SIZE, 32 if args.smoke else 872)
    jobs = [(variant, seed) for variant in variants for seed in args.seeds]
    with ExitStack() as stack:
        if args.jobs == 1:  # in this process, as benchmarks.quality does
            quality._init_worker(load, args.threads)
            results = (run(variant, budget, seed) for variant, seed in jobs)
        else:  # spawned workers (as benchmarks.quality): a forked child can hang in an OpenMP pool its parent used
            pool = stack.enter_context(ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=quality._init_worker,
                initargs=(load, args.threads)))
            results = (future.result() for future in [pool.submit(run, v, budget, seed) for v, seed in jobs])
        records = []
        for record in results:
            records.append(record)
            with open(out / "screen.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
            accuracy = record.get("tune_accuracy")
            shown = "-" if accuracy is None else f"{100 * accuracy:.2f}"
            print(f"{json.dumps(record['variant'])} seed {record['seed']}: tuning accuracy {shown} "
                  f"({record['status']})", flush=True)
    return records


if __name__ == "__main__":
    main()

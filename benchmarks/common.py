"""Shared pieces of the benchmarks: data, the methods compared, one training loop, timing and report writing.

Every benchmark trains and times the methods through these helpers, so "same budget" means literally the same code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ptv2_plugin  # noqa: E402,F401  (registers the method with PEFT)
from examples import common as example_common  # noqa: E402
from examples.common import (  # noqa: E402
    find_sst2,
    label_config,
    label_ids,
    label_list,
    minilm_path,
    read_text_classification,
)

RESULTS_DIR = ROOT / "benchmarks" / "results"

# Full benchmark runs use this lock: transformers 5.23.0 is the last release where PEFT's own prefix tuning (a baseline
# row) still runs on BERT-family models; 5.24 renamed the forward argument it looks for. Every report says so.
BENCHMARK_LOCK = "constraints/tf523.txt"
BENCHMARK_LOCK_TRANSFORMERS = "5.23.0"
BENCHMARK_LOCK_SETUP = ("python3 -m venv .venv-bench && .venv-bench/bin/pip install --no-deps torch==2.13.0 "
                        f"-r {BENCHMARK_LOCK} && .venv-bench/bin/pip install --no-deps -e .")

# The standard budget of issue 6: same for every method.
TRAIN_SIZE = 8000
EPOCHS = 3
BATCH_SIZE = 32
MAX_LENGTH = 64
DATA_SEED = 0


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class TextData:
    """Class ids of every split; ``label_names[i]`` is the label class i was read as (run_glue's label list)."""

    train_texts: list[str]
    train_labels: list[int]
    dev_texts: list[str]
    dev_labels: list[int]
    tune_texts: list[str] = field(default_factory=list)  # held out from train for every choice; never dev
    tune_labels: list[int] = field(default_factory=list)
    label_names: list[str] = field(default_factory=lambda: ["0", "1"])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_sst2(path: str | os.PathLike | None, train_size: int = TRAIN_SIZE, seed: int = DATA_SEED,
              dev_size: int | None = None, tune_size: int = 0) -> TextData:
    """SST-2 (or any folder with train.tsv/dev.tsv of any number of classes, string or int labels): a train subset
    (fixed seed, so every method sees the same examples), a tuning split of ``tune_size`` further train examples
    (disjoint from the subset), and the dev set."""
    folder = find_sst2(path)
    if folder is None:
        raise FileNotFoundError("SST-2 not found: pass --data DIR (with train.tsv and dev.tsv) or set $PTV2_SST2_DIR.")
    texts, raw = read_text_classification(folder / "train.tsv")
    classes = label_list(raw)
    labels = label_ids(raw, classes, "train.tsv")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    train = order[: min(train_size, len(order))]
    tune = order[len(train) : len(train) + tune_size]
    if len(tune) < tune_size:
        raise ValueError(f"{folder / 'train.tsv'} has {len(texts)} examples: too few for a train subset of "
                         f"{train_size} and a tuning split of {tune_size}.")
    dev_texts, dev_raw = read_text_classification(folder / "dev.tsv", limit=dev_size)
    return TextData([texts[i] for i in train], [labels[i] for i in train], dev_texts,
                    label_ids(dev_raw, classes, "dev.tsv"), [texts[i] for i in tune], [labels[i] for i in tune],
                    [str(c) for c in classes])


def synthetic_data(train_size: int = 64, dev_size: int = 32, seed: int = 0) -> TextData:
    """A learnable toy task (label = whether a 'good' word appears), for smoke runs without SST-2."""
    rng = random.Random(seed)
    words = ["good", "bad", "movie", "plot", "actor", "scene", "fine", "dull"]

    def make(count: int) -> tuple[list[str], list[int]]:
        texts, labels = [], []
        for _ in range(count):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
            texts.append(sentence)
            labels.append(int("good" in sentence))
        return texts, labels

    train, dev = make(train_size), make(dev_size)
    return TextData(*train, *dev)


class Encoded(example_common.Encoded):
    """The examples' tokenized rows (``examples.common.Encoded``, one tokenization for both), batched here without
    a Trainer: batches are padded to their own longest row (capped at max_length)."""

    def __init__(self, tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int = MAX_LENGTH) -> None:
        super().__init__(tokenizer, list(texts), list(labels), max_length)
        self.ids = [torch.tensor(row) for row in self.encodings["input_ids"]]
        self.label_ids = torch.tensor(list(labels))
        self.pad_id = tokenizer.pad_token_id or 0

    def batch(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in index]
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_id)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            mask[r, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": self.label_ids[list(index)]}

    def batches(self, batch_size: int, shuffle_seed: int | None = None, group_by_length: bool = False):
        """In order, or shuffled; ``group_by_length`` as the HF Trainer's (less padding, same examples per epoch)."""
        order = list(range(len(self)))
        rng = random.Random(shuffle_seed)
        if shuffle_seed is not None:
            rng.shuffle(order)
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        if group_by_length:
            mega = batch_size * 50
            chunks = []
            for start in range(0, len(order), mega):
                group = sorted(order[start : start + mega], key=lambda i: -len(self.ids[i]))
                chunks += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
            rng.shuffle(chunks)
        for chunk in chunks:
            yield self.batch(chunk)


# -------------------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """One row of the comparison: how to wrap the frozen base and the learning rate it trains with."""

    name: str
    kind: str  # ptv2 | peft_prefix | lora | full | linear_probe
    lr: float
    options: dict[str, Any] = field(default_factory=dict)
    head_lr: float | None = None  # None: the head trains with lr


@dataclass
class Backbone:
    """A frozen base model factory (a fresh copy per method) and its tokenizer."""

    name: str
    make: Callable[[], nn.Module]
    tokenizer: Any


def minilm_backbone(path: str | os.PathLike | None = None, label_names: Sequence[str] = ("0", "1")) -> Backbone:
    """The real all-MiniLM-L6-v2 with a classification head over ``label_names`` (pooler pretrained, head new)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" notice is expected here
    folder = str(path or minilm_path())
    labels = label_config(list(label_names))
    return Backbone(
        "all-MiniLM-L6-v2",
        lambda: AutoModelForSequenceClassification.from_pretrained(folder, **labels),
        AutoTokenizer.from_pretrained(folder),
    )


class ToyTokenizer:
    """Word-level tokenizer for smoke runs (no files, no downloads)."""

    pad_token_id = 0

    def __init__(self, vocab_size: int = 128) -> None:
        self.vocab_size = vocab_size

    def __call__(self, texts: Sequence[str], truncation: bool = True, max_length: int = MAX_LENGTH, **_: Any):
        def ids(text: str) -> list[int]:
            words = [3 + (sum(map(ord, w)) % (self.vocab_size - 3)) for w in text.split()]
            return ([1] + words + [2])[:max_length]

        return {"input_ids": [ids(t) for t in texts]}


def tiny_backbone(arch: str = "bert", num_labels: int = 2) -> Backbone:
    """A tiny randomly initialised classifier (tests/tiny_models.py) for CI smoke runs."""
    from tests.tiny_models import VOCAB, tiny_model

    def make() -> nn.Module:
        model = tiny_model(arch, "SEQ_CLS").train()
        if num_labels != 2:  # a fresh head of the right width (tiny_model builds 2-way heads)
            from transformers import AutoModelForSequenceClassification

            torch.manual_seed(0)
            model.config.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(model.config).train()
        return model

    return Backbone(f"tiny-{arch}", make, ToyTokenizer(VOCAB))


def wrap(method: Method, base: nn.Module, task: str = "SEQ_CLS") -> nn.Module:
    """The model ``method`` trains: a PEFT model or the base itself with the right parameters trainable."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    opts = dict(method.options)
    if method.kind == "ptv2":
        return get_peft_model(base, ptv2_plugin.PTuningV2Config(task_type=task, **opts))
    if method.kind == "peft_prefix":
        cfg = base.config
        opts.setdefault("encoder_hidden_size", cfg.hidden_size)
        return get_peft_model(base, PrefixTuningConfig(task_type=task, **opts))
    if method.kind == "lora":
        opts.setdefault("target_modules", ["query", "value"])
        opts.setdefault("lora_alpha", 2 * opts.get("r", 8))
        return get_peft_model(base, LoraConfig(task_type=task, **opts))
    if method.kind == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    if method.kind == "linear_probe":
        for name, p in base.named_parameters():
            p.requires_grad_(name.startswith(("classifier", "score")))
        return base
    raise ValueError(f"Unknown method kind {method.kind!r}.")


# ------------------------------------------------------------------------------------------------ runnable rows
# PEFT's own methods, the baselines we compare against. Only their rows may be "not runnable": PEFT 0.21.2's prefix
# tuning refuses BERT-family models on transformers 5.24 (it looks for ``past_key_values`` in forward signatures; 5.24
# calls it ``cache``). A failure of any other row, ours above all, must crash the benchmark, never hide as a status.
PEFT_BASELINE_KINDS = frozenset({"peft_prefix"})
MEASURED = "ok"
NOT_RUNNABLE = "not runnable: "
_PEFT_DIR = Path(peft.__file__).resolve().parent
T = TypeVar("T")


def run_or_not_runnable(kind: str, fn: Callable[[], T]) -> tuple[T | None, str]:
    """``(fn(), "ok")``, or ``(None, "not runnable: ...")`` for a PEFT baseline PEFT refuses on the installed versions.

    Only a ValueError or TypeError raised with PEFT's code on the stack becomes a status, and only for PEFT-baseline
    kinds: everything else propagates, so a regression (ours or the harness's) cannot pass as a skipped row.
    """
    if kind not in PEFT_BASELINE_KINDS:
        return fn(), MEASURED
    try:
        return fn(), MEASURED
    except (ValueError, TypeError) as error:
        if not _raised_in_peft(error):
            raise
        return None, f"{NOT_RUNNABLE}{type(error).__name__}: {error}"


def _raised_in_peft(error: BaseException) -> bool:
    """Whether PEFT's own code is on the error's traceback (its checks, its forward), not only the caller's."""
    frames = traceback.extract_tb(error.__traceback__)
    return any(Path(frame.filename).resolve().is_relative_to(_PEFT_DIR) for frame in frames)


def build_method(method: Method, make_base: Callable[[], nn.Module],
                 task: str = "SEQ_CLS") -> tuple[nn.Module | None, str]:
    """``wrap(method, make_base())`` and its status; PEFT baselines also run one tiny forward, because PEFT refuses
    an unsupported model only when it is called, and a benchmark should learn that before it times or trains."""
    base = make_base()

    def build() -> nn.Module:
        model = wrap(method, base, task)
        if method.kind in PEFT_BASELINE_KINDS:
            _probe_forward(model)
        return model

    return run_or_not_runnable(method.kind, build)


def _probe_forward(model: nn.Module) -> None:
    """One forward of 4 tokens that leaves the RNG and every module's train/eval mode as they were: a probed row
    then trains and times exactly as it did before the probe existed."""
    modes = {module: module.training for module in model.modules()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model.eval()
        try:
            model(**random_batch(model.config.vocab_size, 1, 4))
        finally:
            for module, training in modes.items():
                module.training = training


def is_measured(row: dict[str, Any]) -> bool:
    """A row with metrics (rows written before statuses existed were all measured)."""
    return row.get("status", MEASURED) == MEASURED


def not_measured(machine_info: dict[str, Any]) -> str:
    """Why a comparison with PEFT prefix tuning is missing from a report, with the versions that refused it."""
    return (f"not measured, PEFT prefix tuning not runnable on transformers {machine_info['transformers']} "
            f"(peft {machine_info['peft']}); full runs use `{BENCHMARK_LOCK}` "
            f"(transformers {BENCHMARK_LOCK_TRANSFORMERS})")


def status_row(cells: Sequence[Any], status: str, width: int) -> list[Any]:
    """A table row for a method that did not run: its identifying ``cells``, the status, dashes for the metrics."""
    return [*cells, status] + ["-"] * (width - len(cells) - 1)


def trainable_parameters(model: nn.Module, exclude_head: bool = False) -> int:
    """Trainable parameters; with exclude_head, without the task head (same for every method)."""
    total = 0
    for name, p in model.named_parameters():
        if p.requires_grad and not (exclude_head and ("classifier" in name or ".score" in name)):
            total += p.numel()
    return total


def is_head(name: str) -> bool:
    return "classifier" in name or name.endswith("score.weight") or ".score." in name


# -------------------------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    epochs: float = EPOCHS
    batch_size: int = BATCH_SIZE
    warmup_ratio: float = 0.0
    schedule: str = "linear"  # linear | constant
    weight_decay: float = 0.0
    seed: int = 0
    max_grad_norm: float | None = 1.0
    group_by_length: bool = True


def train(model: nn.Module, data: Encoded, method: Method, cfg: TrainConfig,
          on_step: Callable[[int, nn.Module], None] | None = None) -> dict[str, Any]:
    """AdamW + linear decay (with optional warmup), as the HF Trainer defaults; returns timings and losses."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    torch.manual_seed(cfg.seed)
    head = [p for n, p in model.named_parameters() if p.requires_grad and is_head(n)]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not is_head(n)]
    groups = [{"params": body, "lr": method.lr}]
    if head:
        groups.append({"params": head, "lr": method.head_lr or method.lr})
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = max(1, int(round(steps_per_epoch * cfg.epochs)))
    warmup = int(cfg.warmup_ratio * total)
    if cfg.schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    else:
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    params = body + head
    model.train()
    losses, step, start = [], 0, time.perf_counter()
    epoch = 0
    while step < total:
        for batch in data.batches(cfg.batch_size, cfg.seed * 1000 + epoch, cfg.group_by_length):
            loss = model(**batch).loss
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(step, model)
            if step >= total:
                break
        epoch += 1
    return {"steps": step, "train_seconds": time.perf_counter() - start, "final_loss": statistics.fmean(losses[-20:])}


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int = 64) -> dict[str, float]:
    model.eval()
    correct, predicted_one = 0, 0
    counts = None
    for batch in data.batches(batch_size, group_by_length=True):
        labels = batch.pop("labels")
        logits = model(**batch).logits
        pred = logits.argmax(-1)
        correct += (pred == labels).sum().item()
        predicted_one += (pred == 1).sum().item()
        found = torch.bincount(pred, minlength=logits.shape[-1])
        counts = found if counts is None else counts + found
    model.train()
    return {"accuracy": correct / len(data), "predicted_positive_rate": predicted_one / len(data),
            "predicted_class_rates": [round(c / len(data), 4) for c in counts.tolist()]}


# ------------------------------------------------------------------------------------------ attention diagnostics
class KeyNormProbe:
    """Mean L2 norm per head of the real keys (from the key projections) vs the prefix keys, per layer.

    The collapse of prefix tuning shows here first: prefix keys far larger than real keys capture attention.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.real: list[float] = []
        self._handles = []
        self.key_layers = [m for n, m in model.named_modules()
                           if n.endswith(("attention.self.key", "attention.self.base_layer.key"))
                           and isinstance(m, nn.Linear)]
        self.num_heads = model.config.num_attention_heads if hasattr(model, "config") else 1

    def _hook(self, index: int):
        def hook(module, args, output):
            keys = output.detach().reshape(*output.shape[:-1], self.num_heads, -1)
            self.real[index].append(keys.norm(dim=-1).mean().item())
        return hook

    @torch.no_grad()
    def measure(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.real = [[] for _ in self.key_layers]
        handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.key_layers)]
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        real = [statistics.fmean(v) for v in self.real if v]
        out = {"real_key_norm": statistics.fmean(real) if real else float("nan")}
        prefix = prefix_key_norms(self.model)
        if prefix:
            out["prefix_key_norm"] = statistics.fmean(prefix)
            out["prefix_key_norm_max_layer"] = max(prefix)
        return out


@torch.no_grad()
def prefix_key_norms(model: nn.Module) -> list[float]:
    """Per layer, the mean per-head norm of the prefix keys (ours or PEFT prefix tuning's)."""
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "prefix_encoder"):
        return [k.norm(dim=-1).mean().item() for k, _ in base.prefix_encoder().all_key_values()]
    if hasattr(model, "get_prompt") and getattr(model, "peft_config", None):
        cfg = model.active_peft_config
        if not getattr(cfg, "is_prompt_learning", False):
            return []
        enc = model.prompt_encoder[model.active_adapter]
        tokens = model.prompt_tokens[model.active_adapter].unsqueeze(0)
        kv = enc(tokens)  # (1, n, layers*2*hidden)
        kv = kv.view(cfg.num_virtual_tokens, cfg.num_layers * 2, cfg.num_attention_heads, -1)
        keys = kv[:, 0::2]  # (n, layers, heads, head_dim)
        return keys.norm(dim=-1).mean(dim=(0, 2)).tolist()
    return []


# -------------------------------------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


_ROUND_ORDER = random.Random(0)  # one seeded stream per process: the same run shuffles its rounds the same way


def interleaved_times(fns: dict[str, Callable[[], Any]], rounds: int, per_round: int = 1,
                      warmup: int = 2) -> dict[str, list[float]]:
    """Time several callables round-robin so drift in machine load hits all of them alike.

    Each round runs the candidates in a new random order: a fixed order biased the ratios by each candidate's place
    in the round (MiniLM at 1 x 16: ours / base about 1.5 points higher with the base always first than shuffled;
    benchmarks/results/inference/NOTES.md). A candidate's samples are still stored in round order (``stats.per_round``).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for _ in range(rounds):
        _ROUND_ORDER.shuffle(order)
        for name in order:
            fn = fns[name]
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                out[name].append(time.perf_counter() - start)
    return out


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median (the robust centre on a shared machine), mean and spread."""
    vals = list(values)
    return {
        "median": statistics.median(vals),
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "n": len(vals),
    }


# -------------------------------------------------------------------------------------------------------- reports
VERSIONED = ("python", "torch", "transformers", "peft", "onnxruntime")


def machine(*packages: str) -> dict[str, Any]:
    """The environment block of every results.json: machine, versions (plus those of ``packages``) and the lock."""
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        **{name: importlib.import_module(name).__version__ for name in packages},
        "cuda": torch.cuda.is_available(),
        "full_run_lock": {"file": BENCHMARK_LOCK, "transformers": BENCHMARK_LOCK_TRANSFORMERS,
                          "setup": BENCHMARK_LOCK_SETUP},
    }


def versions(machine_info: dict[str, Any]) -> str:
    """'python X, torch Y, ...': the versions a report was measured with."""
    return ", ".join(f"{name} {machine_info[name]}" for name in VERSIONED if machine_info.get(name))


def lock_line() -> str:
    """Where full runs come from: every report says it, so a smoke or off-lock run is never mistaken for one."""
    return (f"Full runs use the lock `{BENCHMARK_LOCK}` (transformers {BENCHMARK_LOCK_TRANSFORMERS}, where PEFT's "
            f"prefix tuning still runs on BERT-family models), installed with `{BENCHMARK_LOCK_SETUP}`.")


def environment_lines(machine_info: dict[str, Any]) -> list[str]:
    """The report header's versions and lock; a run on another transformers says it is not a lock run."""
    lines = [f"Versions: {versions(machine_info)}.  ", lock_line()]
    if machine_info.get("transformers") != BENCHMARK_LOCK_TRANSFORMERS:
        lines[-1] += "  "  # Markdown line break
        lines.append(f"This run used transformers {machine_info.get('transformers')}, not the lock's: PEFT rows that "
                     "cannot run on it are reported as not runnable.")
    return lines


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help="Output folder (default: benchmarks/results/<name>).")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target machine has 2).")
    parser.add_argument("--smoke", action="store_true", help="Tiny model and sizes: checks the script runs (CI).")
    return parser


def setup(args: argparse.Namespace, name: str) -> Path:
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out) if args.out else RESULTS_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a report is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, payload: Any) -> None:
    def default(obj: Any) -> Any:
        if hasattr(obj, "__dataclass_fields__"):
            return asdict(obj)
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"Not JSON serializable: {type(obj).__name__}")

    write_atomic(path, json.dumps(payload, indent=2, default=default) + "\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")  # an error message in a cell must not split the row

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_plot(path: Path, draw: Callable[[Any], None]) -> Path | None:
    """Draw with matplotlib (the ``bench`` extra) into a PNG; without matplotlib, say so and skip the plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install 'ptv2-plugin[bench]'): skipping {path.name}")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    try:
        draw(ax)
        fig.tight_layout()
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ cost measurement helpers
def random_batch(vocab_size: int, batch: int, length: int, seed: int = 0, labels: bool = False) -> dict[str, Any]:
    """Fixed-shape inputs (all tokens real), so every method times exactly the same work."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, length), generator=generator)
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        out["labels"] = torch.randint(0, 2, (batch,), generator=generator)
    return out


def cost_methods(n: int = 16) -> list[Method]:
    """The rows of the cost benchmarks: ours and PEFT prefix at the same n with projection on, and LoRA r=8."""
    return [
        Method("ptv2", "ptv2", 1e-3, {"num_virtual_tokens": n, "prefix_projection": True}),
        Method("peft_prefix", "peft_prefix", 1e-3, {"num_virtual_tokens": n, "prefix_projection": True}),
        Method("lora_r8", "lora", 1e-3, {"r": 8}),
    ]


def frozen_base(backbone: Backbone) -> nn.Module:
    model = backbone.make()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def training_step_fn(model: nn.Module, batch: dict[str, Any], lr: float = 1e-3) -> Callable[[], float]:
    """One optimizer step (forward, backward, AdamW) on ``batch``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def training_memory(model: nn.Module, batch: dict[str, Any]) -> dict[str, int]:
    """Peak training memory beyond the frozen weights, counted exactly rather than sampled.

    CPU has no allocator high-water mark like ``torch.cuda.max_memory_allocated``, so we count what a step must hold
    at its peak: activations autograd saves for backward (distinct storages), plus gradients and AdamW's two moments
    for every trainable parameter (weights are shared by all methods). On CUDA the allocator's peak is added.
    """
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[(id(t), t.device)] = t.numel() * t.element_size()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    activations = sum(size for (ptr, _), size in seen.items() if ptr not in params)
    loss.backward()
    model.zero_grad(set_to_none=True)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"activation_bytes": activations, "trainable_state_bytes": 3 * trainable,
            "peak_extra_bytes": activations + 3 * trainable}


def mib(value: float) -> float:
    return value / 2**20

"""What the prefix costs inside one attention call in PyTorch, and whether another way of feeding it would cost less.

Why this exists: issue 16 asks for eval forwards at the cost of "the attention work alone", without the ``cat`` of the
prefix onto every layer's keys and values. This measures one self-attention block with all-MiniLM-L6-v2's geometry
(12 heads of 32, prefix n=16; fresh q/k/v projections every call, as in the model) on CPU, as paired ratios against
the same block without a prefix (interleaved rounds, 95% bootstrap intervals, ``benchmarks/stats.py``):

* ``cat``: what ``ptv2_plugin.attention.prefixed_attention`` does: ``cat([prefix; k])``, ``cat([prefix; v])``, SDPA;
* ``workspace``: per-call ``copy_`` of k and v into preallocated buffers that already hold the prefix;
* ``seq_major_cat``: the cat done in the projections' (batch, seq, heads, dim) memory layout;
* ``split_softmax``: no copy at all: SDPA over the real keys and over the prefix separately (CPU flash attention,
  which returns each part's log-sum-exp), merged exactly with the two log-sum-exps;
* ``no_copy_floor``: SDPA over keys and values that already hold the prefix, made once: the attention work of n
  more keys with no copy of any kind, a lower bound no way of feeding the prefix can beat.

It also measures how much of all-MiniLM-L6-v2's whole eval forward its self-attention blocks take at each shape
(forward hooks around them; ``--no-model`` skips it), which turns a block's ratio into the forward's:
``1 + share x (block ratio - 1)``.

    python -m benchmarks.prefix_attention [--threads 2] [--shapes 1x16 32x64 1x128] [--no-model] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import common, stats

HEADS, HEAD_DIM, PREFIX = 12, 32, 16  # all-MiniLM-L6-v2, and the prefix length of the other benchmarks


def variants(batch: int, seq: int, generator: torch.Generator) -> dict:
    width = HEADS * HEAD_DIM
    hidden = torch.randn(batch, seq, width, generator=generator)
    weights = [torch.randn(width, width, generator=generator) / width**0.5 for _ in range(3)]
    prefix_key, prefix_value = (torch.randn(1, HEADS, PREFIX, HEAD_DIM, generator=generator) for _ in range(2))
    expanded_key, expanded_value = prefix_key.expand(batch, -1, -1, -1), prefix_value.expand(batch, -1, -1, -1)
    buffers = [torch.empty(batch, HEADS, PREFIX + seq, HEAD_DIM) for _ in range(2)]
    buffers[0][:, :, :PREFIX], buffers[1][:, :, :PREFIX] = expanded_key, expanded_value

    def project():
        return [F.linear(hidden, w).view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2) for w in weights]

    fixed_key, fixed_value = (torch.cat([p, s], 2) for p, s in zip((expanded_key, expanded_value), project()[1:]))

    def base():
        return F.scaled_dot_product_attention(*project())

    def cat():
        q, k, v = project()
        return F.scaled_dot_product_attention(q, torch.cat([expanded_key, k], 2), torch.cat([expanded_value, v], 2))

    def workspace():
        q, k, v = project()
        buffers[0][:, :, PREFIX:].copy_(k)
        buffers[1][:, :, PREFIX:].copy_(v)
        return F.scaled_dot_product_attention(q, *buffers)

    def seq_major_cat():
        q, k, v = project()
        keys = torch.cat([expanded_key.transpose(1, 2), k.transpose(1, 2)], 1).transpose(1, 2)
        values = torch.cat([expanded_value.transpose(1, 2), v.transpose(1, 2)], 1).transpose(1, 2)
        return F.scaled_dot_product_attention(q, keys, values)

    def split_softmax():
        q, k, v = project()
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        real, real_lse = flash(q, k, v)[:2]
        pre, pre_lse = flash(q, expanded_key, expanded_value)[:2]
        return pre + torch.sigmoid(real_lse - pre_lse).unsqueeze(-1) * (real - pre)

    def no_copy_floor():
        q = project()[0]
        return F.scaled_dot_product_attention(q, fixed_key, fixed_value)

    return {f.__name__: f for f in (base, cat, workspace, seq_major_cat, split_softmax, no_copy_floor)}


def attention_share(model: torch.nn.Module, batch: int, seq: int, forwards: int = 20) -> float:
    """Fraction of an eval forward of ``model`` (a BERT-family classifier) spent inside its self-attention modules."""
    spent: list[float] = []
    started: dict[int, float] = {}
    handles = []
    for layer in model.base_model.encoder.layer:
        module = layer.attention.self
        handles.append(module.register_forward_pre_hook(lambda m, a: started.__setitem__(id(m), time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o: spent.append(time.perf_counter() - started[id(m)])))
    inputs = common.random_batch(model.config.vocab_size, batch, seq)
    try:
        with torch.inference_mode():
            for _ in range(3):
                model(**inputs)
            spent.clear()
            start = time.perf_counter()
            for _ in range(forwards):
                model(**inputs)
            total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return sum(spent) / total


def check_equal(fns: dict) -> float:
    """Every way of feeding the prefix computes the same attention (max abs difference from ``cat``)."""
    with torch.inference_mode():
        reference = fns["cat"]()
        return max(float((fns[name]() - reference).abs().max()) for name in fns if name not in ("base", "cat"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["1x16", "32x64", "1x128"], help="batch x seq")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-model", action="store_true", help="Skip the attention share of MiniLM's forward.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = None if args.no_model else common.minilm_backbone().make().eval()
    rows = []
    for shape in args.shapes:
        batch, seq = (int(part) for part in shape.split("x"))
        fns = variants(batch, seq, torch.Generator().manual_seed(0))
        difference = check_equal(fns)
        if difference > 1e-4:
            raise SystemExit(f"{shape}: the variants disagree by {difference:.2e}; the comparison would be meaningless")
        calls = {name: _inference(fn) for name, fn in fns.items()}
        _, rounds = stats.measure_ratio(calls, "cat", "base", min_rounds=args.rounds,
                                        per_round_calls=max(1, 64 // batch), max_seconds=600)
        row = {"batch": batch, "seq": seq, "max_abs_difference": difference,
               "median_us": {name: 1e6 * sorted(v)[len(v) // 2] for name, v in rounds.items()}, "vs_base": {},
               "vs_cat": {}}
        for name in fns:
            if name != "base":
                row["vs_base"][name] = stats.ratio_interval(rounds[name], rounds["base"]).as_dict()
            if name not in ("base", "cat"):
                row["vs_cat"][name] = stats.ratio_interval(rounds[name], rounds["cat"]).as_dict()
        if model is not None:
            share = attention_share(model, batch, seq)
            row["attention_share_of_forward"] = share
            row["forward_ratio"] = {name: 1 + share * (est["ratio"] - 1) for name, est in row["vs_base"].items()}
        rows.append(row)
        print(f"{shape}: vs base: " + ", ".join(f"{name} {stats.RatioEstimate(**est)}"
                                                for name, est in row["vs_base"].items())
              + "; vs cat: " + ", ".join(f"{name} {stats.RatioEstimate(**est)}" for name, est in row["vs_cat"].items()),
              flush=True)
    result = {"threads": args.threads, "torch": torch.__version__, "machine": platform.platform(),
              "geometry": {"heads": HEADS, "head_dim": HEAD_DIM, "prefix": PREFIX}, "rows": rows}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
        (args.out / "report.md").write_text(report(result, sys.argv[1:] if argv is None else argv))
    return result


def _inference(fn):
    def call():
        with torch.inference_mode():
            fn()

    return call


def report(result: dict, argv: list[str] | None) -> str:
    names = list(result["rows"][0]["vs_base"])
    lines = ["# One attention block: ways of feeding the prefix, against no prefix", "",
             f"Command: `python -m benchmarks.prefix_attention {' '.join(argv or [])}`  ",
             f"{result['threads']} threads, torch {result['torch']}, {result['machine']}. Geometry: "
             f"{HEADS} heads x {HEAD_DIM}, prefix {PREFIX} (all-MiniLM-L6-v2). Ratio = time / time without a prefix "
             "(q/k/v projections + SDPA), geometric mean of paired per-round medians, 95% bootstrap interval.", "",
             "| batch x seq | base us | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for row in result["rows"]:
        cells = [f"{est['ratio']:.3f} [{est['low']:.3f}, {est['high']:.3f}]" for est in row["vs_base"].values()]
        lines.append(f"| {row['batch']} x {row['seq']} | {row['median_us']['base']:.0f} | " + " | ".join(cells) + " |")
    others = list(result["rows"][0]["vs_cat"])
    lines += ["", "Against the library's `cat` (time / time of `cat`, same rounds):", "",
              "| batch x seq | " + " | ".join(others) + " |", "|---" * (len(others) + 1) + "|"]
    for row in result["rows"]:
        cells = [f"{est['ratio']:.3f} [{est['low']:.3f}, {est['high']:.3f}]" for est in row["vs_cat"].values()]
        lines.append(f"| {row['batch']} x {row['seq']} | " + " | ".join(cells) + " |")
    if "attention_share_of_forward" in result["rows"][0]:
        lines += ["", "What that makes of the whole eval forward of all-MiniLM-L6-v2 (its self-attention blocks' "
                  "share of the forward, measured with forward hooks; forward ratio = 1 + share x (block ratio - 1)):",
                  "",
                  "| batch x seq | attention share | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for row in result["rows"]:
            cells = [f"{row['forward_ratio'][name]:.3f}" for name in names]
            lines.append(f"| {row['batch']} x {row['seq']} | {row['attention_share_of_forward']:.2f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Scaling: how training step time, training memory and eval latency of P-Tuning v2 grow with n and sequence length.

    python -m benchmarks.scaling [--n 0 8 32 128] [--seq 16 64 128] [--rounds 5]

n=0 is the base model with the same backward pass a prefix needs (gradients flow through every layer to the
inputs, only the head is updated), so the n>0 rows show what the prefix itself adds. All shapes are timed
round-robin per sequence length.
"""

from __future__ import annotations

import sys

import torch

from benchmarks import common


def model_for(backbone: common.Backbone, n: int) -> torch.nn.Module:
    if n == 0:
        model = common.frozen_base(backbone)
        for name, p in model.named_parameters():
            p.requires_grad_(common.is_head(name))
        model.get_input_embeddings().register_forward_hook(
            lambda m, a, out: out.requires_grad_(True) if torch.is_grad_enabled() else out)
        return model
    method = common.Method(f"ptv2_n{n}", "ptv2", 1e-3, {"num_virtual_tokens": n, "prefix_projection": True})
    return common.wrap(method, common.frozen_base(backbone))


def measure(backbone: common.Backbone, ns: list[int], seqs: list[int], batch: int, rounds: int) -> list[dict]:
    models = {n: model_for(backbone, n) for n in ns}
    vocab = models[ns[0]].config.vocab_size
    rows = []
    for seq in seqs:
        inputs = common.random_batch(vocab, batch, seq, labels=True)
        single = common.random_batch(vocab, 1, seq)
        memory = {n: common.training_memory(m, inputs) for n, m in models.items()}
        steps = common.interleaved_times({n: common.training_step_fn(m, inputs) for n, m in models.items()}, rounds)

        def forward(model, feed):
            def fn():
                with torch.inference_mode():
                    model(**{k: v for k, v in feed.items() if k != "labels"})
            return fn

        for m in models.values():
            m.eval()  # once: switching modes drops the prefix encoder's inference cache
        eval32 = common.interleaved_times({n: forward(m, inputs) for n, m in models.items()}, rounds)
        eval1 = common.interleaved_times({n: forward(m, single) for n, m in models.items()}, rounds, per_round=4)
        for n in ns:
            rows.append({
                "n": n, "seq": seq, "batch": batch,
                "train_step_seconds": common.summary(steps[n])["median"],
                "eval_batch_seconds": common.summary(eval32[n])["median"],
                "eval_single_seconds": common.summary(eval1[n])["median"],
                "activation_bytes": memory[n]["activation_bytes"],
                "peak_extra_bytes": memory[n]["peak_extra_bytes"],
                "trainable_params": common.trainable_parameters(models[n]),
            })
            r = rows[-1]
            print(f"seq={seq} n={n}: step {1000 * r['train_step_seconds']:.1f} ms, eval b{batch} "
                  f"{1000 * r['eval_batch_seconds']:.1f} ms, eval b1 {1000 * r['eval_single_seconds']:.2f} ms, "
                  f"activations {common.mib(r['activation_bytes']):.1f} MiB", flush=True)
    return rows


def report(rows: list[dict], meta: dict) -> str:
    base = {r["seq"]: r for r in rows if r["n"] == 0}

    def rel(r, key):
        b = base.get(r["seq"])
        return f"{r[key] / b[key]:.3f}" if b and b[key] else "-"

    table = [[r["n"], r["seq"], f"{1000 * r['train_step_seconds']:.1f}", rel(r, "train_step_seconds"),
              f"{common.mib(r['peak_extra_bytes']):.1f}", rel(r, "peak_extra_bytes"),
              f"{1000 * r['eval_batch_seconds']:.1f}", rel(r, "eval_batch_seconds"),
              f"{1000 * r['eval_single_seconds']:.2f}", rel(r, "eval_single_seconds")] for r in rows]
    return "\n".join([
        "# Scaling with prefix length n and sequence length",
        "",
        f"Command: `{meta['command']}`  ",
        f"Backbone {meta['backbone']}, training batch {meta['batch']}, projection on, {meta['rounds']} rounds, "
        f"{meta['machine']['torch_threads']} threads on {meta['machine']['cpu_count']} CPUs. Ratios are to n=0 (the "
        "base model with the same full backward pass).  ",
        *common.environment_lines(meta["machine"]),
        "",
        common.markdown_table(
            ["n", "seq", "train step ms", "x n=0", "train extra MiB", "x n=0", f"eval b{meta['batch']} ms", "x n=0",
             "eval b1 ms", "x n=0"], table),
        "",
    ]) + "\n"


def main(argv=None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[0, 8, 32, 128])
    parser.add_argument("--seq", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--batch", type=int, default=common.BATCH_SIZE)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if any(n < 0 for n in args.n) or any(s <= 0 for s in args.seq):
        parser.error("--n must be >= 0 and --seq > 0")
    out = common.setup(args, "scaling")
    if args.smoke:
        backbone, args.seq, args.batch, args.rounds, args.n = common.tiny_backbone(), [8, 16], 4, 2, [0, 8]
    else:
        backbone = common.minilm_backbone()
    rows = measure(backbone, args.n, args.seq, args.batch, args.rounds)
    meta = {"command": "python -m benchmarks.scaling " + " ".join(sys.argv[1:] if argv is None else argv),
            "backbone": backbone.name, "batch": args.batch, "rounds": args.rounds, "machine": common.machine()}
    common.write_json(out / "results.json", {"meta": meta, "results": rows})
    common.write_atomic(out / "report.md", report(rows, meta))
    for key, label, name in [("train_step_seconds", "training step ms", "scaling_train_step.png"),
                             ("eval_batch_seconds", f"eval forward ms (batch {args.batch})", "scaling_eval.png"),
                             ("peak_extra_bytes", "training memory beyond weights (MiB)", "scaling_memory.png")]:
        def draw(ax, key=key, label=label):
            for n in args.n:
                pts = [r for r in rows if r["n"] == n]
                scale = common.mib(1) if key.endswith("bytes") else 1000
                ax.plot([r["seq"] for r in pts], [r[key] * scale for r in pts], marker="o", label=f"n={n}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel(label)
            ax.legend()
            ax.grid(True, alpha=0.3)

        common.save_plot(out / name, draw)
    print(f"wrote {out / 'report.md'}")
    return rows


if __name__ == "__main__":
    main()

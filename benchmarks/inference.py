"""Inference in PyTorch: eval forward latency (encoder) and generate() throughput (decoder), ours vs PEFT vs base.

    python -m benchmarks.inference [--n 16] [--rounds 20]

Encoder: the real all-MiniLM-L6-v2 classifier, eval mode, ``torch.inference_mode``. Decoder: no pretrained decoder is
available offline, so a small Llama built from a config (random weights; speed does not depend on them) generates
greedily with the KV cache. Methods are timed round-robin in one process; ratios are medians over medians.
"""

from __future__ import annotations

import sys

import torch

from benchmarks import common

ENCODER_SHAPES = [(1, 16), (1, 64), (32, 64), (1, 128), (32, 128)]
TARGETS = {(32, 64): 1.02, (1, 16): 1.05}  # issue 6: ours / base eval forward
DECODER_CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)


METHODS = ("base", "ptv2", "peft_prefix")  # the compared models; each name is also its common.Method kind


def prefix_models(make, n: int, task: str) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """base, ours and PEFT prefix tuning (projection on, same n), all frozen and in eval mode, and each one's status
    (the models dict leaves out a PEFT row the installed versions cannot run)."""
    methods = [common.Method("ptv2", "ptv2", 0.0, {"num_virtual_tokens": n}),
               common.Method("peft_prefix", "peft_prefix", 0.0, {"num_virtual_tokens": n, "prefix_projection": True})]
    models, status = {"base": make()}, {"base": common.MEASURED}
    for method in methods:
        model, status[method.name] = common.build_method(method, make, task)
        if model is not None:
            models[method.name] = model
    for model in models.values():
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return models, status


def _ratio(med: dict, one: str, other: str) -> dict:
    """``{"<one>_vs_<other>": ratio of medians}``, or nothing when either was not measured."""
    if one in med and other in med:
        return {f"{one}_vs_{other}": med[one]["median"] / med[other]["median"]}
    return {}


def encoder_latency(backbone: common.Backbone, n: int, shapes, rounds: int) -> tuple[list[dict], dict[str, str]]:
    models, status = prefix_models(backbone.make, n, "SEQ_CLS")
    vocab = models["base"].config.vocab_size
    rows = []
    for batch, seq in shapes:
        inputs = common.random_batch(vocab, batch, seq)

        def call(model, inputs=inputs):
            def fn():
                with torch.inference_mode():
                    model(**inputs)
            return fn

        per_round = max(1, 8 // batch)
        times = common.interleaved_times({k: call(m) for k, m in models.items()}, rounds, per_round)
        med = {k: common.summary(v) for k, v in times.items()}
        row = {"batch": batch, "seq": seq, "latency_seconds": med, **_ratio(med, "ptv2", "base"),
               **_ratio(med, "peft_prefix", "base"), **_ratio(med, "ptv2", "peft_prefix")}
        if (batch, seq) in TARGETS:
            row["target"] = TARGETS[(batch, seq)]
            row["met"] = row["ptv2_vs_base"] <= TARGETS[(batch, seq)]
        if not row.get("met", True):
            row["overhead_profile"] = profile_overhead(models["base"], models["ptv2"], inputs)
        rows.append(row)
        print(f"encoder b={batch} s={seq}: " + ", ".join(f"{k} {1000 * v['median']:.2f} ms" for k, v in med.items())
              + f" | ptv2/base {row['ptv2_vs_base']:.3f}", flush=True)
    return rows, status


def profile_overhead(base: torch.nn.Module, ours: torch.nn.Module, inputs: dict, forwards: int = 30) -> dict:
    """Where ours spends its extra time per forward: torch.profiler's self time by op, ours minus base, and the
    rest of the wall-time difference (Python: wrappers, prefix lookup, attention function)."""
    from time import perf_counter

    from torch.profiler import ProfilerActivity, profile

    per_op, calls, wall = {}, {}, {}
    for name, model in (("base", base), ("ptv2", ours)):
        with torch.inference_mode():
            for _ in range(3):
                model(**inputs)
            start = perf_counter()
            for _ in range(forwards):
                model(**inputs)
            wall[name] = (perf_counter() - start) / forwards
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(forwards):
                    model(**inputs)
        per_op[name] = {e.key: e.self_cpu_time_total / 1e6 / forwards for e in prof.key_averages()}
        calls[name] = {e.key: e.count / forwards for e in prof.key_averages()}
    extra = {k: per_op["ptv2"].get(k, 0.0) - per_op["base"].get(k, 0.0) for k in per_op["ptv2"]}
    ops = {k: v for k, v in sorted(extra.items(), key=lambda kv: -kv[1]) if v > 0}
    op_total = sum(ops.values())
    return {"extra_wall_seconds": wall["ptv2"] - wall["base"], "extra_op_seconds": dict(list(ops.items())[:4]),
            "extra_op_total_seconds": op_total,
            "extra_op_calls": {k: n - calls["base"].get(k, 0) for k, n in calls["ptv2"].items()
                               if n > calls["base"].get(k, 0)},
            "python_seconds": max(0.0, wall["ptv2"] - wall["base"] - op_total)}


def decoder_throughput(make, n: int, batches, prompt: int, new_tokens: int,
                       rounds: int) -> tuple[list[dict], dict[str, str]]:
    models, status = prefix_models(make, n, "CAUSAL_LM")
    vocab = models["base"].config.vocab_size
    rows = []
    for batch in batches:
        inputs = common.random_batch(vocab, batch, prompt)

        def call(model, inputs=inputs):
            def fn():
                with torch.inference_mode():
                    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   use_cache=True, pad_token_id=0)
            return fn

        for name in list(models):  # one generate() each: PEFT's prefix tuning may refuse to generate here
            _, status[name] = common.run_or_not_runnable(name, call(models[name]))
            if status[name] != common.MEASURED:
                del models[name]
        times = common.interleaved_times({name: call(model) for name, model in models.items()}, rounds, warmup=1)
        tps = {k: batch * new_tokens / common.summary(v)["median"] for k, v in times.items()}
        row = {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "tokens_per_second": tps}
        if "ptv2" in tps and "base" in tps:
            row["ptv2_vs_base_throughput"] = tps["ptv2"] / tps["base"]
        if "ptv2" in tps and "peft_prefix" in tps:
            row["ptv2_vs_peft_prefix_throughput"] = tps["ptv2"] / tps["peft_prefix"]
        rows.append(row)
        print(f"decoder b={batch}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in tps.items()), flush=True)
    return rows, status


def _why_missed(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        profile = r.get("overhead_profile")
        if not profile:
            continue
        wall, ops = 1000 * profile["extra_wall_seconds"], 1000 * profile["extra_op_total_seconds"]
        largest = ", ".join(f"{name} {1000 * sec:.2f} ms" for name, sec in profile["extra_op_seconds"].items())
        text = (f"Why batch {r['batch']} x seq {r['seq']} misses its target (torch.profiler and a separate wall-time "
                f"run, ours minus base per forward): {wall:.2f} ms more wall time; tensor ops account for {ops:.2f} ms "
                f"(largest: {largest}; SDPA works on n more keys, `cat` prepends the prefix to keys and values)")
        if wall > ops:
            text += f", the remaining {wall - ops:.2f} ms is Python in the per-layer wrappers."
        else:
            text += (". The separate wall-time run shows no gap beyond the op time, so this row's miss is mostly "
                     "run-to-run noise; the op time is what the prefix costs at this shape.")
        lines += [text, ""]
    return lines


def _cell(values: dict, key: str, fmt: str) -> str:
    return format(values[key], fmt) if key in values else "not runnable"


def _status_lines(status: dict[str, str]) -> list[str]:
    """The full reason of each row shown as "not runnable" in the table above."""
    lines = [f"- `{name}`: {text}" for name, text in status.items() if text != common.MEASURED]
    return lines + [""] if lines else []


def report(result: dict, meta: dict) -> str:
    enc_rows = []
    for r in result["encoder"]:
        lat = {name: 1000 * s["median"] for name, s in r["latency_seconds"].items()}
        verdict = ""
        if "target" in r:
            verdict = f"<= {r['target']}x: {'MET' if r['met'] else 'MISSED'}"
        enc_rows.append([r["batch"], r["seq"], *(_cell(lat, name, ".2f") for name in METHODS),
                         _cell(r, "ptv2_vs_base", ".3f"), _cell(r, "peft_prefix_vs_base", ".3f"), verdict])
    dec_rows = [[r["batch"], r["prompt"], r["new_tokens"],
                 *(_cell(r["tokens_per_second"], name, ".0f") for name in METHODS),
                 _cell(r, "ptv2_vs_base_throughput", ".3f")]
                for r in result["decoder"]]
    status = result["status"]
    lines = [
        "# Inference in PyTorch",
        "",
        f"Command: `{meta['command']}`  ",
        f"n={meta['n']} virtual tokens (projection on, ours and PEFT), {meta['rounds']} interleaved rounds, "
        f"{meta['machine']['torch_threads']} threads on {meta['machine']['cpu_count']} CPUs.  ",
        *common.environment_lines(meta["machine"]),
        "",
        f"## Encoder eval forward latency ({meta['backbone']}, median ms)",
        "",
        common.markdown_table(["batch", "seq", "base", "ptv2", "peft prefix", "ptv2/base", "peft/base", "target"],
                              enc_rows),
        "",
        *_status_lines(status["encoder"]),
        *_why_missed(result["encoder"]),
        "## Decoder generate() throughput (KV cache, greedy)",
        "",
        f"Decoder: {meta['decoder']} -- built from a config with random weights, because no pretrained decoder is "
        "available offline; throughput does not depend on the weights' values.",
        "",
        common.markdown_table(["batch", "prompt", "new tokens", "base tok/s", "ptv2 tok/s", "peft prefix tok/s",
                               "ptv2/base"], dec_rows),
        "",
        *_status_lines(status["decoder"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    out = common.setup(args, "inference")
    if args.smoke:
        from tests.tiny_models import tiny_model

        backbone, shapes, args.rounds = common.tiny_backbone(), [(1, 16), (2, 8)], 2
        make_decoder, decoder_name, batches, args.new_tokens = (lambda: tiny_model("llama", "CAUSAL_LM")), \
            "tiny llama (tests/tiny_models.py)", [1], 4
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        backbone, shapes = common.minilm_backbone(), ENCODER_SHAPES

        def make_decoder():
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(LlamaConfig(**DECODER_CONFIG))

        decoder_name = "Llama " + ", ".join(f"{k}={v}" for k, v in DECODER_CONFIG.items() if "token" not in k)
        batches = [1, 8]
    encoder, encoder_status = encoder_latency(backbone, args.n, shapes, args.rounds)
    decoder, decoder_status = decoder_throughput(make_decoder, args.n, batches, 16, args.new_tokens,
                                                 max(3, args.rounds // 4))
    result = {"status": {"encoder": encoder_status, "decoder": decoder_status}, "encoder": encoder,
              "decoder": decoder}
    meta = {"command": "python -m benchmarks.inference " + " ".join(sys.argv[1:] if argv is None else argv),
            "backbone": backbone.name, "decoder": decoder_name, "n": args.n, "rounds": args.rounds,
            "machine": common.machine()}
    common.write_json(out / "results.json", {"meta": meta, **result})
    common.write_atomic(out / "report.md", report(result, meta))

    def draw(ax):
        labels = [f"b{r['batch']}s{r['seq']}" for r in result["encoder"]]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], [r["ptv2_vs_base"] for r in result["encoder"]], width=0.4, label="ptv2 / base")
        if encoder_status["peft_prefix"] == common.MEASURED:
            ax.bar([i + 0.2 for i in x], [r["peft_prefix_vs_base"] for r in result["encoder"]], width=0.4,
                   label="peft prefix / base")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("eval forward latency / base model")
        ax.set_title("PyTorch eval forward overhead")
        ax.legend()

    common.save_plot(out / "encoder_latency.png", draw)
    print(f"wrote {out / 'report.md'}")
    return result


if __name__ == "__main__":
    main()

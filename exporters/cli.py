"""``ptv2-export``: export a base model plus a P-Tuning v2 adapter to ONNX, like ``optimum-cli export onnx``; or write
the adapter alone as an ONNX Runtime adapter file for a graph exported with ``--prefix-as adapter_inputs``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .onnx import ExportValidationError, export, export_prefix_adapter
from .onnx.layout import METADATA_FILE_NAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptv2-export",
        description="Export a model with a P-Tuning v2 adapter to ONNX: the prefix is frozen into the graph as "
        "constant keys/values, so serving needs neither PEFT nor the prefix MLP.",
    )
    parser.add_argument("--model", required=True, help="Base model folder (or hub id when online).")
    parser.add_argument("--adapter", required=True, help="Folder of the saved P-Tuning v2 adapter.")
    parser.add_argument("--output", default=None,
                        help="Output folder of the graph: written beside it, then swapped in whole (never "
                        "half-written). Optional with --adapter-file (then only the adapter file is written).")
    parser.add_argument("--prefix-as", default="constants", choices=["constants", "adapter_inputs"],
                        help="constants (default): the prefix is baked into the graph. adapter_inputs: prefix and task "
                        "head stay overridable inputs, so one deployed graph serves every adapter file of the same "
                        "base (see --adapter-file).")
    parser.add_argument("--prefix-capacity", type=int, default=None,
                        help="With --prefix-as adapter_inputs: room for prefixes of up to this many tokens, so "
                        "adapters of different lengths share the graph; pass the same value with --adapter-file.")
    parser.add_argument("--adapter-file", default=None,
                        help="Write the adapter as an ONNX Runtime adapter file (e.g. sst2.onnx_adapter, plus a .json "
                        "sidecar naming its base model and geometry) for a graph exported with --prefix-as "
                        "adapter_inputs. With --output as well, both are written.")
    parser.add_argument("--task", default=None,
                        help="SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION, CAUSAL_LM or SEQ_2_SEQ_LM (or "
                        "Optimum's names, e.g. text-classification, text2text-generation). Default: the adapter's "
                        "task_type. SEQ_2_SEQ_LM (T5, BART) writes Optimum's encoder_model.onnx, decoder_model.onnx "
                        "and decoder_with_past_model.onnx.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (default 17 with torchscript, 18 with the dynamo exporter).")
    parser.add_argument("--exporter", default=None, choices=["dynamo", "torchscript"],
                        help="dynamo (default): torch.export-based, opset 20 unless --opset says otherwise (>= 18). "
                        "torchscript: torch's deprecated legacy tracer, the fallback (also used for --opset < 18); "
                        "same graph names and parity.")
    parser.add_argument("--device", default="cpu", help="Device to trace on: cpu or cuda (float16 wants cuda).")
    parser.add_argument("--no-past", dest="with_past", action="store_false", default=None,
                        help="Decoders: export without KV-cache inputs/outputs (encoder-decoders: no "
                        "decoder_with_past_model.onnx).")
    parser.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                        help="Compare PyTorch and ONNX Runtime after export and fail above --atol (default: on).")
    parser.add_argument("--atol", type=float, default=None,
                        help="Parity tolerance, absolute part: |ort - torch| <= atol + rtol * max|torch| "
                        "(default: per dtype and provider, exporters/onnx/tolerances.py).")
    parser.add_argument("--rtol", type=float, default=None, help="Parity tolerance, relative part (default: likewise).")
    parser.add_argument("--fused-attention", action=argparse.BooleanOptionalAction, default="auto",
                        help="Encoders: run each prefixed attention layer as ONNX Runtime's fused "
                        "com.microsoft.MultiHeadAttention (faster; needs onnxruntime). Default: wherever it applies "
                        "(float32 encoders on transformers >= 5); --fused-attention fails if it cannot apply, "
                        "--no-fused-attention writes standard ONNX ops only.")
    parser.add_argument("--quantize", default=None, choices=["int8"],
                        help="int8: dynamically quantize the graph (ONNX Runtime's quantizer: int8 weight MatMuls, "
                        "prefix float32) for faster CPU serving; validation then compares predictions (argmax "
                        "agreement, max logit error) instead of --atol/--rtol. float32 exports only.")
    parser.add_argument("--min-agreement", type=float, default=None,
                        help="With --quantize: the least argmax agreement with PyTorch that validation accepts "
                        "(default 0.95).")
    parser.add_argument("--force", action="store_true",
                        help="Replace the output folder if it holds an earlier export: a ptv2_export.json and only the "
                        "files that export wrote. Any other non-empty folder is refused and left untouched. The new "
                        "export is swapped in whole; the old one is kept until then.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output is None and args.adapter_file is None:
        parser.error("pass --output (a graph folder), --adapter-file (an adapter file), or both")
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[ptv2-export {time.monotonic() - started:6.1f}s] {message}", flush=True)

    output = None
    try:
        if args.output is not None:
            output = export(
                args.adapter, args.output, base_model=args.model, task=args.task, opset=args.opset, dtype=args.dtype,
                with_past=args.with_past, device=args.device, validate=args.validate, atol=args.atol, rtol=args.rtol,
                force=args.force, fused_attention=args.fused_attention, prefix_as=args.prefix_as,
                prefix_capacity=args.prefix_capacity, progress=progress, exporter=args.exporter,
                quantize=args.quantize, min_agreement=args.min_agreement,
            )
        if args.adapter_file is not None:
            written = export_prefix_adapter(args.adapter, args.adapter_file, base_model=args.model, task=args.task,
                                            dtype=args.dtype, prefix_capacity=args.prefix_capacity,
                                            force=args.force)
            progress(f"Wrote prefix adapter file {written} (+ {written.name}.json)")
    except ExportValidationError as error:
        print(f"ptv2-export: validation failed: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, TypeError, NotImplementedError) as error:  # OSError: file exists, mount point...
        print(f"ptv2-export: error: {error}", file=sys.stderr)
        return 1
    if output is not None:
        _print_report(output)
    return 0


def _print_report(output: Path) -> None:
    metadata = json.loads((output / METADATA_FILE_NAME).read_text())
    parity = metadata.get("parity")
    print(f"Exported {metadata['model_type']} / {metadata['task']} (adapters {', '.join(metadata['adapters'])}, "
          f"{metadata['num_virtual_tokens']} virtual tokens, {metadata['dtype']}) to {output}")
    if parity and parity.get("kind") == "agreement":
        quality = (f"argmax agreement {parity['agreement']:.2%} over {parity['rows']} rows, max |logit diff| "
                   f"{parity['max_abs_logit_diff']:.3g}" if parity["rows"] else
                   f"min hidden-state cosine {parity['min_cosine']:.4f}")
        verdict = "OK" if parity["ok"] else "FAILED"
        print(f"Agreement report (int8 graph): {quality} on {parity['provider']} -> {verdict}")
    elif parity:
        verdict = "OK" if parity["ok"] else "FAILED"
        print(f"Parity report: max abs diff {parity['max_abs_diff']:.3g} over {parity['cases']} comparisons "
              f"on {parity['provider']} (atol {parity['atol']:g}, rtol {parity['rtol']:g}) -> {verdict}")
    else:
        print("Parity report: validation skipped (--no-validate).")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Export a saved P-Tuning v2 adapter to ONNX and serve it with ONNX Runtime (no PEFT, no PyTorch model at serve time).

    python -m examples.main_job --output-dir runs/main_job          # or any other way to get an adapter folder
    python -m examples.export_and_serve --adapter runs/main_job/adapter --text "a gorgeous , witty film"

The export freezes the prefix into the graph as constants and checks ONNX Runtime against PyTorch before the folder
appears. The folder (model.onnx, config.json, tokenizer files, ptv2_export.json) is all a server needs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish .",
    "it 's not a bad film , just a forgettable one .",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a saved adapter folder (PeftModel.save_pretrained)")
    parser.add_argument("--base-model", help="base model folder (default: the adapter config's base model)")
    parser.add_argument("--output-dir", help="export folder (default: <adapter>-onnx)")
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--text", action="append", help="sentence to classify (repeatable)")
    parser.add_argument("--benchmark-batches", type=int, default=20, help="timed batches of 32 (0: skip)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from exporters.onnx import ORTModelForSequenceClassification, export

    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        parser.error(f"{adapter} is not an adapter folder (no adapter_config.json).")
    output_dir = Path(args.output_dir) if args.output_dir else adapter.with_name(adapter.name + "-onnx")
    device = "cuda" if args.provider == "CUDAExecutionProvider" else "cpu"
    folder = export(str(adapter), output_dir, base_model=args.base_model, task="SEQ_CLS", dtype=args.dtype,
                    device=device, force=True, progress=print)

    # Serving: only the export folder is needed from here on.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForSequenceClassification.from_pretrained(folder, provider=args.provider)
    labels = model.config.id2label
    texts = args.text or DEFAULT_TEXTS
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    probabilities = torch.as_tensor(model(**inputs).logits).float().softmax(-1)
    for text, row in zip(texts, probabilities):
        label = int(row.argmax())
        print(f"{labels.get(label, label)!s:>8} ({row[label]:.2f})  {text}")

    results = {"export_dir": str(folder), "probabilities": probabilities.tolist()}
    if args.benchmark_batches > 0:
        batch = tokenizer((texts * 32)[:32], padding=True, return_tensors="np")
        model(**batch)
        times = []
        for _ in range(args.benchmark_batches):
            started = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        results["batch32_ms"] = median * 1000
        print(f"ONNX Runtime ({args.provider}): batch of 32 in {median * 1000:.1f} ms median "
              f"({32 / median:.0f} sentences/s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

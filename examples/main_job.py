"""The main job: fine-tune a P-Tuning v2 adapter on all-MiniLM-L6-v2 for sentiment, export it, serve it with ORT.

    python -m examples.main_job --train-file train.tsv --validation-file dev.tsv   # your files (TSV/CSV/JSON lines)
    python -m examples.main_job --dataset stanfordnlp/sst2                          # a hub dataset (needs `datasets`)
    python -m examples.main_job                                                     # a generated set, fully offline
    torchrun --nproc_per_node 4 -m examples.main_job --train-file ... --validation-file ...   # several GPUs (DDP)

Steps: Trainer (eval each epoch, best adapter kept) -> adapter saved -> ONNX export with parity check
(``ExportOnnxCallback``) -> ONNX Runtime over the whole validation set: accuracy, agreement with PyTorch, latency.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from examples.common import (
    Encoded,
    accuracy,
    generated_sentiment,
    label_config,
    label_ids,
    label_list,
    load_hub_text_classification,
    minilm_path,
    read_text_classification,
    warmup_kwargs,
)
from ptv2_plugin.config import RECOMMENDED_LEARNING_RATE, PTuningV2Config
from ptv2_plugin.config_checks import PREFIX_INITS
from ptv2_plugin.training import RECOMMENDED_HEAD_LEARNING_RATE
from ptv2_plugin.transformers_compat import checkpointing_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (files, a hub dataset, or nothing for the generated set)")
    data.add_argument("--train-file", help="TSV, CSV or JSON lines with 'label' and 'sentence'/'text' columns")
    data.add_argument("--validation-file", help="same format as --train-file")
    data.add_argument("--dataset", help="hub dataset name (online; needs the 'datasets' library)")
    data.add_argument("--dataset-config", help="hub dataset configuration, e.g. sst2 for --dataset glue")
    data.add_argument("--max-train-samples", type=int, help="random subset of the training set (fixed by --seed)")
    data.add_argument("--max-eval-samples", type=int, help="first N validation examples")
    model = parser.add_argument_group("model and adapter")
    model.add_argument("--model", default=None, help="base model folder (default: the packaged all-MiniLM-L6-v2)")
    model.add_argument("--num-virtual-tokens", type=int, default=16, help="prefix length n")
    model.add_argument("--prefix-init-std", type=float, default=0.02)
    model.add_argument("--prefix-init", choices=PREFIX_INITS, default=PTuningV2Config.prefix_init,
                       help="how the prefix starts (default: the library's default, see PTuningV2Config)")
    model.add_argument("--prefix-init-text", help="with --prefix-init real_tokens: text whose keys/values start it")
    model.add_argument("--max-length", type=int, default=64)
    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="runs/main_job")
    train.add_argument("--epochs", type=float, default=3.0)
    train.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (smoke runs)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument(
        "--learning-rate", type=float, default=RECOMMENDED_LEARNING_RATE, help="AdamW lr for the prefix"
    )
    train.add_argument(
        "--head-learning-rate", type=float, default=RECOMMENDED_HEAD_LEARNING_RATE, help="AdamW lr for the task head"
    )
    train.add_argument("--warmup-ratio", type=float, default=0.06)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or a GPU that supports it)")
    train.add_argument("--fp16", action="store_true", help="fp16 autocast (CUDA)")
    serve = parser.add_argument_group("export and serving")
    serve.add_argument("--no-export", action="store_true", help="stop after training and saving the adapter")
    serve.add_argument("--provider", default="CPUExecutionProvider", help="ONNX Runtime execution provider")
    serve.add_argument("--latency-samples", type=int, default=200, help="batch-1 requests timed per runtime")
    serve.add_argument("--no-int8", action="store_true", help="skip the int8 graph (the third row)")
    args = parser.parse_args(argv)
    if bool(args.train_file) != bool(args.validation_file):
        parser.error("--train-file and --validation-file go together.")
    if args.dataset and args.train_file:
        parser.error("Give either --dataset or --train-file/--validation-file, not both.")
    return args


# ------------------------------------------------------------------------------------------------------ data
def load_data(args) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]], str, list]:
    """Train and validation (texts, class ids), where they came from, and the classes: any number, string or int
    labels, mapped as HF's run_glue does (sorted unique training labels -> ids 0..K-1)."""
    if args.train_file:
        train = read_text_classification(args.train_file)
        validation = read_text_classification(args.validation_file, limit=args.max_eval_samples)
        source = f"files {args.train_file} / {args.validation_file}"
    elif args.dataset:
        train = load_hub_text_classification(args.dataset, args.dataset_config, "train")
        validation = load_hub_text_classification(
            args.dataset, args.dataset_config, "validation", limit=args.max_eval_samples
        )
        source = f"hub dataset {args.dataset}" + (f" ({args.dataset_config})" if args.dataset_config else "")
    else:
        train = generated_sentiment(2000, seed=1)
        validation = generated_sentiment(args.max_eval_samples or 400, seed=2)
        source = "a small sentiment set generated by the project (examples.common.generated_sentiment; no data given)"
    classes_source = train[1]
    if args.max_train_samples is not None and args.max_train_samples < len(train[0]):
        order = list(range(len(train[0])))
        random.Random(args.seed).shuffle(order)
        keep = sorted(order[: args.max_train_samples])
        train = ([train[0][i] for i in keep], [train[1][i] for i in keep])
    classes = label_list(classes_source)  # from the whole training set, before any subset
    if len(classes) < 2:
        raise ValueError(f"The training set has {len(classes)} distinct label(s) {classes}; classification needs 2+.")
    train = (train[0], label_ids(train[1], classes, "the training set"))
    validation = (validation[0], label_ids(validation[1], classes, "the validation set"))
    return train, validation, source, classes


# ---------------------------------------------------------------------------------------------------- the job
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from peft import get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from exporters.onnx import ExportOnnxCallback
    from ptv2_plugin import create_optimizer

    set_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    (train_texts, train_labels), (val_texts, val_labels), source, classes = load_data(args)
    model_path = Path(args.model) if args.model else minilm_path()
    labels = label_config(classes)
    num_labels = labels["num_labels"]

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    training_args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(64, args.batch_size),
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        **warmup_kwargs(args.warmup_ratio),
        lr_scheduler_type="linear",
        eval_strategy="steps" if args.max_steps > 0 else "epoch",
        save_strategy="steps" if args.max_steps > 0 else "epoch",
        eval_steps=args.max_steps if args.max_steps > 0 else None,
        save_steps=args.max_steps if args.max_steps > 0 else None,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        save_total_limit=2,
        logging_steps=50,
        report_to=[],
        seed=args.seed,
        bf16=args.bf16,
        fp16=args.fp16,
        **checkpointing_arguments(args.gradient_checkpointing),
        dataloader_num_workers=0,
        # torchrun on machines without CUDA: DDP over gloo (with GPUs the Trainer picks NCCL itself).
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
    )
    main_process = training_args.process_index == 0
    say = print if main_process else (lambda *a, **k: None)
    say(f"Data: {source}: {len(train_texts)} train / {len(val_texts)} validation examples, {num_labels} labels "
        f"{[str(c) for c in classes][:20]}")
    say(f"Base model: {model_path}")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForSequenceClassification.from_pretrained(model_path, **labels)  # label2id/id2label saved
    config = PTuningV2Config(
        task_type="SEQ_CLS", num_virtual_tokens=args.num_virtual_tokens, prefix_init_std=args.prefix_init_std,
        prefix_init=args.prefix_init, prefix_init_text=args.prefix_init_text, tokenizer_name_or_path=str(model_path),
    )
    model = get_peft_model(base, config)
    if main_process:
        model.print_trainable_parameters()

    bars: dict[str, tqdm] = {}

    def export_progress(message: str) -> None:
        if "export" not in bars:
            bars["export"] = tqdm(desc="ONNX export", unit="stage", disable=not main_process)
        bars["export"].set_postfix_str(message[:70])
        bars["export"].update()

    # overwrite=True replaces an earlier run's export there (and nothing else: other files are refused)
    export_callback = ExportOnnxCallback(output_dir / "onnx", overwrite=True, progress=export_progress)
    optimizer = create_optimizer(model, args.learning_rate, args.head_learning_rate, args.weight_decay)
    trainer = Trainer(
        model=model,
        args=training_args,
        optimizers=(optimizer, None),  # two learning rates: prefix and head (ptv2_plugin.training)
        train_dataset=Encoded(tokenizer, train_texts, train_labels, args.max_length),
        eval_dataset=Encoded(tokenizer, val_texts, val_labels, args.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=accuracy,
        callbacks=[] if args.no_export else [export_callback],
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    if "export" in bars:
        bars["export"].close()
    trainer.save_model(str(output_dir / "adapter"))  # the best adapter (load_best_model_at_end); main process only
    prediction = trainer.predict(trainer.eval_dataset)  # every rank: distributed evaluation gathers across ranks
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The last collective is done: tear the process group down while the interpreter is alive. Left to exit,
        # gloo's threads can abort a finished rank ("terminate called without an active exception",
        # pytorch/pytorch#190489), and torchrun then stops the main process mid-export.
        torch.distributed.destroy_process_group()
    if not main_process:
        return {}
    torch_logits = torch.as_tensor(prediction.predictions)
    results = {
        "data": source,
        "labels": [str(c) for c in classes],
        "train_examples": len(train_texts),
        "validation_examples": len(val_texts),
        "epochs": args.epochs,
        "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "pytorch_accuracy": accuracy((prediction.predictions, prediction.label_ids))["accuracy"],
        "adapter_dir": str(output_dir / "adapter"),
    }
    if not args.no_export:
        results.update(serve_with_onnx_runtime(args, export_callback.export_dir, tokenizer, model, val_texts,
                                               val_labels, torch_logits))
        if not args.no_int8:
            results.update(serve_int8(args, output_dir / "onnx-int8", tokenizer, model, val_texts, val_labels,
                                      torch_logits))
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    print_runtime_rows(results)
    return results


def serve_with_onnx_runtime(args, export_dir: Path, tokenizer, model, texts, labels, torch_logits) -> dict:
    """Validation set through ONNX Runtime: accuracy, agreement with PyTorch, batch-1 latency of both runtimes."""
    from exporters.onnx import ORTModelForSequenceClassification

    ort_model = ORTModelForSequenceClassification.from_pretrained(export_dir, provider=args.provider)
    ort_logits = _ort_logits(ort_model, tokenizer, texts, args, "ONNX Runtime on validation")
    gold = torch.tensor(labels)
    ort_pred, torch_pred = ort_logits.argmax(-1), torch_logits.argmax(-1)

    model = model.eval().cpu()
    samples = texts[: args.latency_samples]
    latency_ort = _latency(lambda x: ort_model(**x), tokenizer, samples, args.max_length, "ONNX Runtime")
    with torch.no_grad():
        latency_torch = _latency(lambda x: model(**x), tokenizer, samples, args.max_length, "PyTorch")
    return {
        "onnx_dir": str(export_dir),
        "onnx_accuracy": float((ort_pred == gold).double().mean()),
        "onnx_pytorch_agreement": float((ort_pred == torch_pred).double().mean()),
        "onnx_pytorch_max_abs_logit_diff": float((ort_logits - torch_logits.float()).abs().max()),
        "latency_ms_batch1_onnx": latency_ort,
        "latency_ms_batch1_pytorch": latency_torch,
        "torch_threads": torch.get_num_threads(),
    }


def serve_int8(args, folder: Path, tokenizer, model, texts, labels, torch_logits) -> dict:
    """The third row: the same adapter exported once more as a dynamically quantized int8 graph (validated by
    prediction agreement), over the same validation set and latency requests."""
    from exporters.onnx import ExportValidationError, ORTModelForSequenceClassification, export

    try:
        folder = export(model, folder, quantize="int8", force=True, tokenizer=tokenizer)
    except ExportValidationError as error:  # reported as the row's result: the float32 graph above still serves
        return {"int8_refused": str(error)}
    ort_model = ORTModelForSequenceClassification.from_pretrained(folder, provider=args.provider)
    logits = _ort_logits(ort_model, tokenizer, texts, args, "ONNX Runtime int8 on validation")
    samples = texts[: args.latency_samples]
    return {
        "int8_onnx_dir": str(folder),
        "int8_accuracy": float((logits.argmax(-1) == torch.tensor(labels)).double().mean()),
        "int8_pytorch_agreement": float((logits.argmax(-1) == torch_logits.argmax(-1)).double().mean()),
        "int8_pytorch_max_abs_logit_diff": float((logits - torch_logits.float()).abs().max()),
        "int8_export_check": json.loads((folder / "ptv2_export.json").read_text())["parity"],
        "latency_ms_batch1_int8": _latency(lambda x: ort_model(**x), tokenizer, samples, args.max_length,
                                           "ONNX Runtime int8"),
    }


def _ort_logits(ort_model, tokenizer, texts: list[str], args, desc: str) -> torch.Tensor:
    batch, logits = max(64, args.batch_size), []
    for start in tqdm(range(0, len(texts), batch), desc=desc, unit="batch"):
        inputs = tokenizer(texts[start : start + batch], truncation=True, max_length=args.max_length,
                           padding=True, return_tensors="pt")
        logits.append(torch.as_tensor(ort_model(**inputs).logits).float().cpu())
    return torch.cat(logits)


def print_runtime_rows(results: dict) -> None:
    """PyTorch, ONNX Runtime float32 and int8 side by side: validation accuracy, agreement with PyTorch, latency."""
    if "onnx_accuracy" not in results:
        return
    rows = [("PyTorch", results["pytorch_accuracy"], None, results["latency_ms_batch1_pytorch"]),
            ("ONNX Runtime float32", results["onnx_accuracy"], results["onnx_pytorch_agreement"],
             results["latency_ms_batch1_onnx"])]
    if "int8_accuracy" in results:
        rows.append(("ONNX Runtime int8", results["int8_accuracy"], results["int8_pytorch_agreement"],
                     results["latency_ms_batch1_int8"]))
    print(f"\n{'runtime':<22}{'accuracy':>10}{'agreement':>11}{'latency b1 median / p90 (ms)':>31}")
    for name, correct, agreement, latency in rows:
        agree = "-" if agreement is None else f"{agreement:.2%}"
        print(f"{name:<22}{correct:>10.4f}{agree:>11}{latency['median']:>22.2f} / {latency['p90']:.2f}")
    if "int8_refused" in results:
        print(f"ONNX Runtime int8: not served: {results['int8_refused']}")


def _latency(run, tokenizer, texts: list[str], max_length: int, name: str) -> dict[str, float]:
    times = []
    encoded = [tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt") for t in texts]
    run(encoded[0])  # warm-up
    for inputs in tqdm(encoded, desc=f"{name} latency (batch 1)", unit="req"):
        started = time.perf_counter()
        run(inputs)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"median": round(statistics.median(times), 3), "p90": round(times[int(0.9 * (len(times) - 1))], 3)}


def print_summary(results: dict) -> None:
    print("\n=== P-Tuning v2 main job ===")
    print(f"data:                     {results['data']}")
    print(f"train / validation:       {results['train_examples']} / {results['validation_examples']} examples, "
          f"{results['steps']} steps in {results['train_seconds']} s")
    print(f"adapter:                  {results['adapter_dir']}")
    print(f"PyTorch accuracy:         {results['pytorch_accuracy']:.4f}")
    if "onnx_accuracy" in results:
        print(f"ONNX:                     {results['onnx_dir']}")
        print(f"ONNX Runtime accuracy:    {results['onnx_accuracy']:.4f}")
        print(f"ONNX vs PyTorch:          {results['onnx_pytorch_agreement']:.2%} same predictions, max |logit "
              f"diff| {results['onnx_pytorch_max_abs_logit_diff']:.2e}")
        ort, pt = results["latency_ms_batch1_onnx"], results["latency_ms_batch1_pytorch"]
        print(f"latency, batch 1 (ms):    ONNX Runtime median {ort['median']:.2f} / p90 {ort['p90']:.2f};  "
              f"PyTorch median {pt['median']:.2f} / p90 {pt['p90']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])

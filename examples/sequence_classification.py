"""Sentence classification with the HF Trainer: a P-Tuning v2 adapter on all-MiniLM-L6-v2, SST-2 files by default.

    python -m examples.sequence_classification --data-dir ../shared/data/sst2 --max-train-samples 2000
    python -m examples.sequence_classification --train-file my_train.csv --validation-file my_dev.csv

The frozen model is shared; only the prefix (and the new classification head) train. The best epoch's adapter is
kept (``load_best_model_at_end``) and saved as a few-MB PEFT adapter folder.
"""

from __future__ import annotations

import argparse
import sys

from examples.common import (
    Encoded,
    accuracy,
    find_sst2,
    label_config,
    label_ids,
    label_list,
    minilm_path,
    read_text_classification,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder with train.tsv and dev.tsv (default: $PTV2_SST2_DIR or ../shared)")
    parser.add_argument("--train-file")
    parser.add_argument("--validation-file")
    parser.add_argument("--output-dir", default="runs/sequence_classification")
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--max-eval-samples", type=int)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="prefix learning rate")
    parser.add_argument("--head-learning-rate", type=float, default=1e-2, help="task head learning rate")
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args(argv)

    if args.train_file and args.validation_file:
        train_file, validation_file = args.train_file, args.validation_file
    else:
        folder = find_sst2(args.data_dir)
        if folder is None:
            parser.error("No SST-2 found: pass --data-dir, set $PTV2_SST2_DIR, or give --train-file/--validation-file.")
        train_file, validation_file = folder / "train.tsv", folder / "dev.tsv"

    from peft import get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from ptv2_plugin import PTuningV2Config, create_optimizer

    train_texts, train_raw = read_text_classification(train_file, limit=args.max_train_samples)
    val_texts, val_raw = read_text_classification(validation_file, limit=args.max_eval_samples)
    classes = label_list(train_raw)  # any number of classes, string or int labels (as run_glue)
    train_labels, val_labels = label_ids(train_raw, classes, "train"), label_ids(val_raw, classes, "validation")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), **label_config(classes))
    model = get_peft_model(base, PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=args.num_virtual_tokens))
    model.print_trainable_parameters()

    steps = args.max_steps > 0
    trainer = Trainer(
        model=model,
        optimizers=(create_optimizer(model, args.learning_rate, args.head_learning_rate), None),
        args=TrainingArguments(
            output_dir=f"{args.output_dir}/checkpoints",
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            learning_rate=args.learning_rate,
            eval_strategy="steps" if steps else "epoch",
            save_strategy="steps" if steps else "epoch",
            eval_steps=args.max_steps if steps else None,
            save_steps=args.max_steps if steps else None,
            load_best_model_at_end=True,
            metric_for_best_model="accuracy",
            save_total_limit=2,
            logging_steps=25,
            report_to=[],
        ),
        train_dataset=Encoded(tokenizer, train_texts, train_labels, args.max_length),
        eval_dataset=Encoded(tokenizer, val_texts, val_labels, args.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(f"{args.output_dir}/adapter")
    print(f"validation accuracy {metrics['eval_accuracy']:.4f}; adapter saved to {args.output_dir}/adapter")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])

"""Two P-Tuning v2 adapters on one frozen MiniLM, served together: each row of a batch picks its own task.

    python -m examples.multi_task_serving

Trains a "sentiment" adapter and a "topic" adapter (food vs sport) with the Trainer on generated data, then answers
a mixed batch in one forward pass (``adapter_names=[...]``, one per row), and finally exports both into one ONNX
graph whose ``adapter_ids`` input selects each row's prefix and head. The base weights exist once in memory and once
in the graph; each task adds only its prefix and head.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from examples.common import Encoded, accuracy, generated_sentiment, minilm_path

_FOOD = ["the pasta", "this soup", "the bread", "her curry", "the cake", "the salad", "this pizza", "the noodles"]
_SPORT = ["the match", "this game", "the final", "the race", "their defence", "the striker", "the team", "the coach"]
_TOPIC_FRAMES = ["{x} was {a} last night .", "everyone talked about {x} .", "i can't stop thinking about {x} .",
                 "{x} looked {a} to me .", "honestly , {x} surprised us ."]
_ADJ = ["great", "odd", "awful", "fine", "unusual", "bright"]
TASKS = {"sentiment": ["negative", "positive"], "topic": ["sport", "food"]}


def generated_topic(size: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(size):
        label = rng.randint(0, 1)
        subject = rng.choice(_FOOD if label else _SPORT)
        texts.append(rng.choice(_TOPIC_FRAMES).format(x=subject, a=rng.choice(_ADJ)))
        labels.append(label)
    return texts, labels


DATA = {"sentiment": generated_sentiment, "topic": generated_topic}


def train_adapter(model, name: str, tokenizer, args) -> None:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model.set_adapter(name)  # only this adapter's prefix and head are trainable now
    texts, labels = DATA[name](args.train_size, seed=1)
    Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=f"{args.output_dir}/checkpoints-{name}",
            max_steps=args.max_steps,
            per_device_train_batch_size=16,
            learning_rate=args.learning_rate,
            save_strategy="no",
            logging_steps=20,
            report_to=[],
        ),
        train_dataset=Encoded(tokenizer, texts, labels, 48),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    ).train()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/multi_task_serving")
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    parser.add_argument("--no-onnx", action="store_true", help="skip the two-adapter ONNX export")
    args = parser.parse_args(argv)

    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ptv2_plugin import PTuningV2Config

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    config = PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=args.num_virtual_tokens)
    model = get_peft_model(base, config, adapter_name="sentiment")
    model.add_adapter("topic", PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=args.num_virtual_tokens))
    for name in TASKS:
        train_adapter(model, name, tokenizer, args)
    model.save_pretrained(f"{args.output_dir}/adapters")  # adapters/sentiment and adapters/topic
    model.eval()

    # One mixed batch: rows of both tasks, each row naming its adapter.
    rows, names, gold = [], [], []
    for name in TASKS:
        texts, labels = DATA[name](args.eval_size, seed=2)
        rows += texts
        names += [name] * len(texts)
        gold += labels
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    rows, names, gold = [rows[i] for i in order], [names[i] for i in order], torch.tensor([gold[i] for i in order])
    inputs = tokenizer(rows, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch_logits = model(**inputs, adapter_names=names).logits
    predictions = torch_logits.argmax(-1)
    for name in TASKS:  # a mixed batch answers each row exactly as that adapter alone would
        model.set_adapter(name)
        mask = torch.tensor([n == name for n in names])
        with torch.no_grad():
            alone = model(**{k: v[mask] for k, v in inputs.items()}).logits
        torch.testing.assert_close(torch_logits[mask], alone, atol=1e-5, rtol=1e-4)
    results = {}
    for name in TASKS:
        mask = torch.tensor([n == name for n in names])
        results[f"{name}_accuracy"] = float((predictions[mask] == gold[mask]).float().mean())
    for text, name, label in list(zip(rows, names, predictions.tolist()))[:4]:
        print(f"  [{name:9}] {text!r} -> {TASKS[name][label]}")
    print("mixed batch of", len(rows), "rows:", ", ".join(f"{k} {v:.3f}" for k, v in results.items()))

    if not args.no_onnx:
        from exporters.onnx import ORTModelForSequenceClassification, export

        folder = export(model, Path(args.output_dir) / "onnx", adapters=list(TASKS), force=True, progress=print)
        ort_model = ORTModelForSequenceClassification.from_pretrained(folder)
        ort_logits = torch.as_tensor(ort_model(**inputs, adapter_names=names).logits)
        results["onnx_pytorch_agreement"] = float((ort_logits.argmax(-1) == predictions).float().mean())
        results["onnx_max_abs_diff"] = float((ort_logits - torch_logits).abs().max())
        print(f"ONNX (one graph, both adapters): {results['onnx_pytorch_agreement']:.2%} same predictions as "
              f"PyTorch, max |logit diff| {results['onnx_max_abs_diff']:.2e}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

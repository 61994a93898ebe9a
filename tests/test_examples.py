"""Smoke tests of examples/: each runs end to end on the real MiniLM (or a tiny decoder) with a step limit."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_trainer import _fresh_accelerator_state  # noqa: F401  (autouse fixture)


def write_tsv(path, rows: list[tuple[str, int]]) -> str:
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return str(path)


def sentiment_files(tmp_path, size: int = 24) -> tuple[str, str]:
    from examples.common import generated_sentiment

    texts, labels = generated_sentiment(size, seed=3)
    rows = list(zip(texts, labels))
    return write_tsv(tmp_path / "train.tsv", rows), write_tsv(tmp_path / "dev.tsv", rows[:16])


def test_sequence_classification(tmp_path):
    from examples import sequence_classification

    train, dev = sentiment_files(tmp_path)
    metrics = sequence_classification.main(
        ["--train-file", train, "--validation-file", dev, "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
         "--batch-size", "8", "--max-length", "32"]
    )
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_token_classification(tmp_path):
    from examples import token_classification

    words, tags = token_classification.generated_ner(1, seed=0)[0]
    assert len(words) == len(tags) and set(tags) <= set(range(len(token_classification.LABELS)))
    metrics = token_classification.main(
        ["--output-dir", str(tmp_path), "--max-steps", "2", "--train-size", "32", "--eval-size", "16"]
    )
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_causal_lm_prefix_generates_before_and_after(tmp_path, model_type):
    from examples import causal_lm_prefix

    result = causal_lm_prefix.main(
        ["--model-type", model_type, "--output-dir", str(tmp_path), "--pretrain-steps", "3", "--max-steps", "2",
         "--prompts", "2"]
    )
    assert len(result["before"]["sample"]) == len(result["after"]["sample"]) == 8
    assert result["base_unchanged"]  # disabling the adapter gives the base model's generation back
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_multi_task_serving(tmp_path):
    from examples import multi_task_serving

    results = multi_task_serving.main(
        ["--output-dir", str(tmp_path), "--max-steps", "2", "--train-size", "32", "--eval-size", "8"]
    )
    assert {"sentiment_accuracy", "topic_accuracy"} <= set(results)
    assert results["onnx_pytorch_agreement"] == 1.0  # one graph, per-row prefix and head
    assert results["onnx_max_abs_diff"] < 1e-4
    for name in ("sentiment", "topic"):
        assert (tmp_path / "adapters" / name / "adapter_config.json").is_file()


def test_export_and_serve(tmp_path, capsys):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from examples import export_and_serve
    from examples.common import minilm_path
    from ptv2_plugin import PTuningV2Config

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    get_peft_model(base, PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=4)).save_pretrained(tmp_path / "a")
    results = export_and_serve.main(["--adapter", str(tmp_path / "a"), "--benchmark-batches", "1", "--text", "fine"])
    assert results["export_dir"] == str(tmp_path / "a-onnx")
    assert torch.tensor(results["probabilities"]).sum(-1).sub(1).abs().max() < 1e-5
    assert "fine" in capsys.readouterr().out

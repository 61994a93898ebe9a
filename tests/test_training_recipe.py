"""The recommended optimizer: prefix and task head in separate learning-rate groups, usable by the Trainer."""

from __future__ import annotations

import pytest
from peft import get_peft_model

from ptv2_plugin import (
    RECOMMENDED_HEAD_LEARNING_RATE,
    RECOMMENDED_LEARNING_RATE,
    RECOMMENDED_LEARNING_RATE_NO_PROJECTION,
    PTuningV2Config,
    create_optimizer,
    optimizer_param_groups,
)
from tests.tiny_models import sample_inputs, tiny_model


def test_prefix_and_head_get_their_own_learning_rates():
    model = get_peft_model(tiny_model("bert"), PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3))
    prefix_group, head_group = optimizer_param_groups(model)
    prefix_ids = {id(p) for p in model.base_model.prefix_encoder().parameters()}
    assert {id(p) for p in prefix_group["params"]} == prefix_ids
    head_names = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in head_group["params"]}}
    assert head_names and all("classifier.modules_to_save" in n for n in head_names)
    assert prefix_group["lr"] == RECOMMENDED_LEARNING_RATE == 1e-3
    assert head_group["lr"] == RECOMMENDED_HEAD_LEARNING_RATE == 1e-2


def test_decoder_without_head_has_one_group_and_trains():
    model = get_peft_model(tiny_model("llama"), PTuningV2Config(task_type="CAUSAL_LM", num_virtual_tokens=3))
    optimizer = create_optimizer(model, learning_rate=5e-2)
    assert len(optimizer.param_groups) == 1
    inputs = sample_inputs("llama")
    before = model(**inputs, labels=inputs["input_ids"]).loss.item()
    for _ in range(5):
        optimizer.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    assert model(**inputs, labels=inputs["input_ids"]).loss.item() < before


def test_trainer_schedules_both_groups(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_model("bert"), PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3))
    rows = [{**{k: v[0] for k, v in sample_inputs("bert", batch=1, seed=s).items()}, "labels": s % 2} for s in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], lr_scheduler_type="constant"
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(create_optimizer(model), None))
    trainer.train()
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [1e-3, 1e-2]


def test_free_prefix_gets_the_higher_recommended_rate():
    config = PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3, prefix_projection=False)
    model = get_peft_model(tiny_model("bert"), config)
    prefix_group, head_group = optimizer_param_groups(model)
    assert prefix_group["lr"] == RECOMMENDED_LEARNING_RATE_NO_PROJECTION == 3e-2
    assert optimizer_param_groups(model, learning_rate=5e-3)[0]["lr"] == 5e-3


def test_no_trainable_prefix_is_reported():
    model = get_peft_model(tiny_model("bert"), PTuningV2Config(task_type="SEQ_CLS", inference_mode=True))
    with pytest.raises(ValueError, match="No trainable P-Tuning v2 prefix"):
        optimizer_param_groups(model)

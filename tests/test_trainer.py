"""The HF Trainer with P-Tuning v2 adapters: gradient checkpointing, resume, best-model reload, checkpoint rotation.

Tiny models and a handful of steps; every test compares against a reference run or the saved files, so a Trainer
feature that silently stops training (or reloading) the prefix fails here.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from ptv2_plugin import PTuningV2Config
from ptv2_plugin.transformers_compat import checkpointing_arguments, checkpointing_enabled
from tests.tiny_models import VOCAB, tiny_model

LENGTH = 8


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """A bf16 Trainer leaves ACCELERATE_MIXED_PRECISION in os.environ (4.57), turning later Trainers bf16 too."""
    from accelerate.state import AcceleratorState

    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
    AcceleratorState._reset_state(reset_partial_state=True)


class ToyDataset(torch.utils.data.Dataset):
    """Random token rows; the label is whether the first token is in the upper half of the vocabulary."""

    def __init__(self, size: int = 32, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, VOCAB, (size, LENGTH), generator=generator)
        self.labels = (self.input_ids[:, 0] >= VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[index]}


def peft_model(arch: str = "bert", prefix_seed: int = 0):
    base = tiny_model(arch, "SEQ_CLS")
    torch.manual_seed(prefix_seed)
    return get_peft_model(base, PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=4))


def training_args(output_dir, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-2,
        max_steps=3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def prefix_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in trainable_state(model).items() if "ptv2_prefix_encoder" in k}


def assert_states_equal(actual: dict, expected: dict, atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=name)


def saved_adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_trains_prefix_like_plain_training(tmp_path, arch, use_reentrant):
    """Checkpointed training must move the prefix exactly as plain training does (reentrant needs input grads)."""
    reference = peft_model(arch)
    initial = prefix_state(reference)
    Trainer(model=reference, args=training_args(tmp_path / "plain"), train_dataset=ToyDataset()).train()

    model = peft_model(arch)
    args = training_args(tmp_path / "gc", **checkpointing_arguments(use_reentrant=use_reentrant))
    Trainer(model=model, args=args, train_dataset=ToyDataset()).train()

    assert checkpointing_enabled(model.get_base_model())
    trained = prefix_state(model)
    assert all(not torch.equal(trained[k], initial[k]) for k in initial), "checkpointing froze (part of) the prefix"
    assert_states_equal(trained, prefix_state(reference), atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_bf16_autocast_trains_prefix(tmp_path, arch):
    """bf16 mixed precision (CPU autocast here): attention runs in bf16, the prefix and head stay fp32 and learn."""
    model = peft_model(arch)
    initial = prefix_state(model)
    seen: set[torch.dtype] = set()
    layer = next(m for m in model.modules() if type(m).__name__ == "PTuningV2Layer")
    layer.register_forward_hook(lambda module, args, output: seen.add(output[0].dtype))
    Trainer(model=model, args=training_args(tmp_path, bf16=True), train_dataset=ToyDataset()).train()

    assert torch.bfloat16 in seen
    trained = prefix_state(model)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in trained.values())
    assert all(not torch.equal(trained[k], initial[k]) for k in initial)


def test_torch_compile_trains_prefix_like_eager(tmp_path):
    """Trainer's torch_compile (aot_eager backend: dynamo + AOT autograd, no C++ toolchain needed in CI)."""
    reference = peft_model("bert")
    Trainer(model=reference, args=training_args(tmp_path / "eager"), train_dataset=ToyDataset()).train()
    model = peft_model("bert")
    args = training_args(tmp_path / "compiled", torch_compile=True, torch_compile_backend="aot_eager")
    Trainer(model=model, args=args, train_dataset=ToyDataset()).train()
    assert_states_equal(prefix_state(model), prefix_state(reference), atol=1e-5)


# ------------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_resume_from_checkpoint_continues_with_identical_state(tmp_path, arch):
    args = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear")
    full = peft_model(arch)
    Trainer(model=full, args=training_args(tmp_path / "full", **args), train_dataset=ToyDataset()).train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()

    # A different prefix init: only a real reload of the checkpoint can reproduce the uninterrupted run.
    resumed = peft_model(arch, prefix_seed=123)
    trainer = Trainer(model=resumed, args=training_args(tmp_path / "resumed", **args), train_dataset=ToyDataset())
    trainer.train(resume_from_checkpoint=str(checkpoint))

    assert trainer.state.global_step == 6
    assert_states_equal(trainable_state(resumed), trainable_state(full), atol=1e-6)
    saved = saved_adapter(tmp_path / "resumed" / "checkpoint-6")
    reference = saved_adapter(tmp_path / "full" / "checkpoint-6")
    assert_states_equal(saved, reference, atol=1e-6)


# ------------------------------------------------------------------------------- load_best_model_at_end, rotation
class _ScriptedScores:
    """compute_metrics with a fixed score per evaluation (best at the 2nd), plus the real accuracy."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)
        self.calls = 0

    def __call__(self, eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        accuracy = float((logits.argmax(-1) == labels).mean())
        score = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        return {"accuracy": accuracy, "score": score}


class _RecordStates(TrainerCallback):
    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.saved_form: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = trainable_state(model)
        self.saved_form[state.global_step] = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_load_best_model_at_end_restores_best_adapter(tmp_path, arch):
    model = peft_model(arch)
    recorder = _RecordStates()
    metrics = _ScriptedScores([0.1, 0.9, 0.3, 0.2])
    strategy = "steps"
    args = training_args(
        tmp_path,
        max_steps=4,
        eval_strategy=strategy,
        eval_steps=1,
        save_strategy=strategy,
        save_steps=1,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ToyDataset(),
        eval_dataset=ToyDataset(16, seed=1),
        compute_metrics=metrics,
        callbacks=[recorder],
    )
    trainer.train()

    assert metrics.calls == 4
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    # save_total_limit=2 with load_best_model_at_end keeps the best and the latest checkpoint, nothing else.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert_states_equal(trainable_state(model), recorder.states[2])
    for step in (2, 4):  # the checkpoint files hold exactly the adapter as it was at that step
        assert_states_equal(saved_adapter(tmp_path / f"checkpoint-{step}"), recorder.saved_form[step])
    embedding = "base_model.ptv2_prefix_encoder.default.embedding.weight"
    assert not torch.equal(recorder.states[2][embedding], recorder.states[4][embedding])
    # The reloaded adapter is still trainable and evaluates to the metrics logged for step 2.
    assert all(p.requires_grad for p in model.base_model.ptv2_prefix_encoder.parameters())
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if e.get("step") == 2 and "eval_loss" in e][0]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(logged["eval_loss"], abs=1e-5)



# ------------------------------------------------------------------------------------------ ExportOnnxCallback
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_export_onnx_callback_exports_the_best_adapter(tmp_path, arch):
    from exporters.onnx import ExportOnnxCallback, ORTModelForSequenceClassification
    from tests.tiny_models import sample_inputs

    model = peft_model(arch)
    recorder, export = _RecordStates(), ExportOnnxCallback()
    args = training_args(
        tmp_path,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="score",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ToyDataset(),
        eval_dataset=ToyDataset(16, seed=1),
        compute_metrics=_ScriptedScores([0.9, 0.1]),
        callbacks=[recorder, export],
    )
    trainer.train()

    assert export.export_dir == tmp_path / "onnx"
    assert_states_equal(trainable_state(model), recorder.states[1])  # the best adapter, not the last
    assert export.report["argmax_agreement"] == 1.0 and export.report["max_abs_diff"] < 1e-4
    ort_model = ORTModelForSequenceClassification.from_pretrained(export.export_dir)
    inputs = sample_inputs(arch)
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    torch.testing.assert_close(torch.as_tensor(ort_model(**inputs).logits), expected, atol=1e-4, rtol=0)


def files_under(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_callback_refuses_the_trainers_output_dir_before_any_checkpoint_is_lost(tmp_path):
    from exporters.onnx import ExportOnnxCallback

    run = tmp_path / "run"
    model = peft_model()
    args = training_args(run, max_steps=2, save_strategy="steps", save_steps=1)
    Trainer(model=model, args=args, train_dataset=ToyDataset()).train()
    before = files_under(run)
    assert any(name.startswith("checkpoint-2/") for name in before)
    with pytest.raises(ValueError, match=r"export folder .*run is the Trainer's output_dir .*delete the checkpoints"):
        Trainer(model=model, args=args, train_dataset=ToyDataset(), callbacks=[ExportOnnxCallback(run, overwrite=True)])
    # Added after the Trainer was built, a folder containing output_dir is caught when training begins.
    trainer = Trainer(model=model, args=training_args(run, max_steps=3, save_strategy="steps", save_steps=1),
                      train_dataset=ToyDataset())
    trainer.add_callback(ExportOnnxCallback(tmp_path, overwrite=True))
    with pytest.raises(ValueError, match="or contains it"):
        trainer.train(resume_from_checkpoint=True)
    assert files_under(run) == before


def test_export_callback_refuses_a_busy_folder_when_the_trainer_is_built(tmp_path):
    from exporters.onnx import ExportOnnxCallback

    target = tmp_path / "onnx"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    args = training_args(tmp_path / "run")
    with pytest.raises(FileExistsError, match=r"not empty; pass ExportOnnxCallback\(\.\.\., overwrite=True\)"):
        Trainer(model=peft_model(), args=args, callbacks=[ExportOnnxCallback(target)])
    with pytest.raises(FileExistsError, match="it holds notes.txt, which no export wrote"):
        Trainer(model=peft_model(), args=args, callbacks=[ExportOnnxCallback(target, overwrite=True)])
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_failed_export_is_logged_and_reported_and_the_run_goes_on(tmp_path, caplog):
    from exporters.onnx import ExportOnnxCallback, ExportValidationError

    model = peft_model()
    callback = ExportOnnxCallback(tmp_path / "onnx", atol=-1.0)  # an impossible tolerance: the export's check fails
    trainer = Trainer(model=model, args=training_args(tmp_path / "run"), train_dataset=ToyDataset(),
                      callbacks=[callback])
    with caplog.at_level(logging.ERROR, logger="exporters.onnx.callbacks"):
        trainer.train()
    assert f"export to {tmp_path / 'onnx'} failed" in caplog.text and "onnx-export-report.json" in caplog.text
    report = json.loads((tmp_path / "onnx-export-report.json").read_text())
    assert report["ok"] is False and report["error"].startswith("ExportValidationError")
    assert callback.report_path == tmp_path / "onnx-export-report.json" and not (tmp_path / "onnx").exists()
    trainer.save_model(str(tmp_path / "adapter"))  # the user's code after train() still runs
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    strict = ExportOnnxCallback(tmp_path / "strict", atol=-1.0, strict=True)
    trainer = Trainer(model=model, args=training_args(tmp_path / "run2"), train_dataset=ToyDataset(),
                      callbacks=[strict])
    with pytest.raises(ExportValidationError, match="discarded"):
        trainer.train()


def test_real_batch_mismatch_is_reported_inside_the_export(tmp_path, caplog, monkeypatch):
    import exporters.onnx as onnx_exporter
    import exporters.onnx.callbacks as callbacks_module
    from exporters.onnx import ExportOnnxCallback

    real_load = onnx_exporter.load

    def shifted_load(folder):  # an ONNX Runtime model whose logits are off by 0.5
        ort_model = real_load(folder)

        def run(**inputs):
            output = ort_model(**inputs)
            output.logits = output.logits + 0.5
            return output

        return run

    monkeypatch.setattr(callbacks_module, "load", shifted_load)
    callback = ExportOnnxCallback(tmp_path / "onnx")
    args = training_args(tmp_path / "run", max_steps=2, eval_strategy="steps", eval_steps=1)
    trainer = Trainer(model=peft_model(), args=args, train_dataset=ToyDataset(), eval_dataset=ToyDataset(16, seed=1),
                      callbacks=[callback])
    with caplog.at_level(logging.ERROR, logger="exporters.onnx.callbacks"):
        trainer.train()
    from exporters.onnx.tolerances import default_tolerance

    tolerance = default_tolerance("float32")
    assert f"differs from PyTorch by 0.5, beyond {tolerance.describe()}, on real evaluation batches" in caplog.text
    report = json.loads((tmp_path / "onnx" / "ptv2_validation_report.json").read_text())
    assert report["ok"] is False and report["device"] == "cpu"
    assert report["max_abs_diff"] == pytest.approx(0.5, abs=1e-4)  # the shift plus the (float32) parity error
    assert (report["atol"], report["rtol"]) == (tolerance.atol, tolerance.rtol)
    onnx_exporter.check_output_dir(tmp_path / "onnx", force=True)  # the report counts as the export's own file


def test_cpu_copy_is_float32_eval_and_leaves_the_model_alone():
    from exporters.onnx.callbacks import cpu_copy

    model = peft_model().to(torch.bfloat16).train()
    copy = cpu_copy(model)
    assert not copy.training and model.training
    assert all(p.dtype == torch.float32 for p in copy.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for (name, original), (_, copied) in zip(model.named_parameters(), copy.named_parameters()):
        assert copied is not original and copied.requires_grad == original.requires_grad, name
        torch.testing.assert_close(copied, original.float(), atol=0, rtol=0)

"""Trainer callbacks: ship the adapter the Trainer ends with (the best one with ``load_best_model_at_end``) to ONNX."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


class ExportOnnxCallback(TrainerCallback):
    """At the end of training, export the model to ONNX and check ONNX Runtime against PyTorch.

    The Trainer calls ``on_train_end`` after ``load_best_model_at_end`` restored the best checkpoint, so the export is
    the best adapter. The exporter's own parity check runs on synthetic shapes; this callback adds a check on up to
    ``validation_batches`` real evaluation batches and fails the run if the two runtimes disagree beyond the
    exporter's tolerance (``atol`` overrides its absolute part).
    Only the main process exports. ``exporters`` (and onnx/onnxruntime) are imported here, not by ``ptv2_plugin``.
    ``progress`` receives the exporter's stage messages (default: this module's logger).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        *,
        task: str | None = None,
        opset: int | None = None,
        dtype: str = "float32",
        atol: float | None = None,
        validation_batches: int = 2,
        overwrite: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.task = task
        self.opset = opset
        self.dtype = dtype
        self.atol = atol
        self.validation_batches = validation_batches
        self.overwrite = overwrite
        self.progress = progress
        self.export_dir: Path | None = None
        self.report: dict[str, Any] = {}

    def on_train_end(self, args, state, control, model=None, processing_class=None, tokenizer=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        try:
            from exporters.onnx import export
        except ImportError as error:
            raise ImportError(
                "ExportOnnxCallback needs the ONNX exporter and its dependencies: pip install 'ptv2-plugin[onnx]'."
            ) from error
        target = Path(self.output_dir) if self.output_dir is not None else Path(args.output_dir) / "onnx"
        was_training = model.training
        model.eval()
        try:
            self.export_dir = export(
                model,
                target,
                task=self.task,
                opset=self.opset,
                dtype=self.dtype,
                atol=self.atol,
                force=self.overwrite,
                progress=self.progress or logger.info,
            )
            tokenizer = processing_class if processing_class is not None else tokenizer
            if tokenizer is not None and not any((self.export_dir / f).is_file() for f in _TOKENIZER_MARKERS):
                tokenizer.save_pretrained(self.export_dir)
            if self.validation_batches > 0 and kwargs.get("eval_dataloader") is not None:
                self.report = self._check_real_batches(model, kwargs["eval_dataloader"])
        finally:
            model.train(was_training)
        logger.info("Exported the final adapter to %s %s", self.export_dir, self.report)

    def _check_real_batches(self, model, dataloader) -> dict[str, Any]:
        """PyTorch vs ONNX Runtime on real evaluation batches: max |difference| and argmax agreement."""
        from exporters.onnx import load
        from exporters.onnx.providers import CPU
        from exporters.onnx.tolerances import resolve_tolerance

        ort_model = load(self.export_dir)
        tolerance = resolve_tolerance(self.dtype, CPU, atol=self.atol)
        device = next(model.parameters()).device
        max_diff, agree, total, failed = 0.0, 0, 0, False
        for index, batch in enumerate(dataloader):
            if index >= self.validation_batches:
                break
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                reference = model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()
            actual = ort_model(**{k: v.cpu() for k, v in inputs.items()}).logits.float().cpu()
            diff = (reference - actual).abs().max().item()
            failed |= not tolerance.allows(diff, reference.abs().max().item())
            max_diff = max(max_diff, diff)
            agree += (reference.argmax(-1) == actual.argmax(-1)).sum().item()
            total += reference.argmax(-1).numel()
        report = {"max_abs_diff": max_diff, "argmax_agreement": agree / max(total, 1), "atol": tolerance.atol,
                  "rtol": tolerance.rtol}
        if failed:
            raise RuntimeError(
                f"ONNX export at {self.export_dir} differs from PyTorch by {max_diff:.3g}, beyond "
                f"{tolerance.describe()}, on real evaluation batches."
            )
        return report

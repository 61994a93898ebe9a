"""Trainer callbacks: ship the adapter the Trainer ends with (the best one with ``load_best_model_at_end``) to ONNX.

The callback never costs a run. Its folder is checked when the Trainer is built and again when training begins: it
may not be, or contain, the Trainer's ``output_dir`` (replacing it would delete the checkpoints), and it must be
empty unless ``overwrite=True`` allows replacing an earlier export (never anything else). At the end it works on a
float32 CPU copy of the model, and a failure is logged and written to a report instead of raised, so the code after
``trainer.train()`` (your own ``trainer.save_model()``) still runs; ``strict=True`` raises instead.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .export import export
from .folder import check_output_dir
from .layout import VALIDATION_REPORT_FILE_NAME
from .providers import CPU
from .serving import load
from .tolerances import resolve_tolerance

logger = logging.getLogger(__name__)


class ExportOnnxCallback(TrainerCallback):
    """At the end of training, export the model to ONNX and check ONNX Runtime against PyTorch on real batches.

    The Trainer calls ``on_train_end`` after its last checkpoint was saved and ``load_best_model_at_end`` restored
    the best one, so the export is the best adapter. The exporter's own parity check runs on synthetic shapes; this
    callback adds up to ``validation_batches`` real evaluation batches, PyTorch and ONNX Runtime both on the CPU
    (the training device may use TF32 or another kernel), at the exporter's tolerance for the dtype on the CPU
    (``atol + rtol * max|torch|``, see ``exporters/onnx/tolerances.py``; ``atol`` overrides the absolute part).
    A failed export goes to ``<folder>-export-report.json`` beside the folder, a failed real-batch check to
    ``ptv2_validation_report.json`` inside it; both are logged as errors, and raised only with ``strict=True``.
    Only the main process exports. It lives with the exporter (``from exporters.onnx import ExportOnnxCallback``):
    ``ptv2_plugin`` never imports ``exporters``, onnx or onnxruntime.
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
        overwrite: bool = False,
        strict: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.task = task
        self.opset = opset
        self.dtype = dtype
        self.atol = atol
        self.validation_batches = validation_batches
        self.overwrite = overwrite
        self.strict = strict
        self.progress = progress
        self.export_dir: Path | None = None
        self.report: dict[str, Any] = {}
        self.report_path: Path | None = None

    # ------------------------------------------------------------------------------------ checks before training
    def on_init_end(self, args, state, control, **kwargs):
        self._check_target(args)

    def on_train_begin(self, args, state, control, **kwargs):
        self._check_target(args)  # also covers a callback added after the Trainer was built

    def _target(self, args) -> Path:
        return Path(self.output_dir) if self.output_dir is not None else Path(args.output_dir) / "onnx"

    def _check_target(self, args) -> None:
        target = self._target(args).resolve()
        run = Path(args.output_dir).resolve()
        if target == run or target in run.parents:
            raise ValueError(
                f"ExportOnnxCallback: the export folder {target} is the Trainer's output_dir {run} or contains it. "
                f"An export there would replace the folder and delete the checkpoints. Give the export a folder of "
                f"its own, e.g. ExportOnnxCallback({str(run / 'onnx')!r}) (the default when output_dir is None)."
            )
        check_output_dir(target, self.overwrite, option="ExportOnnxCallback(..., overwrite=True)")

    # ----------------------------------------------------------------------------------------- export at the end
    def on_train_end(self, args, state, control, model=None, processing_class=None, tokenizer=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        target = self._target(args)
        self.report, self.report_path = {}, None
        try:
            reference = cpu_copy(model)
            self.export_dir = export(
                reference,
                target,
                task=self.task,
                opset=self.opset,
                dtype=self.dtype,
                atol=self.atol,
                force=self.overwrite,
                tokenizer=processing_class if processing_class is not None else tokenizer,
                progress=self.progress or logger.info,
            )
            dataloader = kwargs.get("eval_dataloader")
            if self.validation_batches > 0 and dataloader is not None:
                self.report = self._check_real_batches(reference, dataloader)
        except Exception as error:  # a finished run must not be lost to an export problem (strict=True: raise)
            self.report = {"ok": False, "error": f"{type(error).__name__}: {error}", "export_dir": str(target)}
            self._fail(target.parent / f"{target.name}-export-report.json", f"export to {target} failed: {error}",
                       error)
            return
        if self.report and not self.report["ok"]:
            message = (f"the ONNX export at {self.export_dir} differs from PyTorch by {self.report['max_abs_diff']:.3g}"
                       f", beyond {self.report['tolerance']}, on real evaluation batches (both on the CPU)")
            self._fail(self.export_dir / VALIDATION_REPORT_FILE_NAME, message, None)
            return
        logger.info("Exported the final adapter to %s %s", self.export_dir, self.report)

    def _check_real_batches(self, reference: nn.Module, dataloader) -> dict[str, Any]:
        """PyTorch (CPU copy) vs ONNX Runtime (CPU) on real evaluation batches: max |difference|, argmax agreement."""
        ort_model = load(self.export_dir)
        tolerance = resolve_tolerance(self.dtype, CPU, atol=self.atol)
        failed = False
        max_diff, agree, total = 0.0, 0, 0
        for batch in itertools.islice(dataloader, self.validation_batches):
            inputs = {k: v.cpu() for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                expected = reference(**inputs).logits.float()
            actual = torch.as_tensor(ort_model(**inputs).logits).float()
            diff = (expected - actual).abs().max().item()
            failed |= not tolerance.allows(diff, expected.abs().max().item())
            max_diff = max(max_diff, diff)
            agree += (expected.argmax(-1) == actual.argmax(-1)).sum().item()
            total += expected.argmax(-1).numel()
        return {"ok": not failed, "max_abs_diff": max_diff, "argmax_agreement": agree / max(total, 1),
                "atol": tolerance.atol, "rtol": tolerance.rtol, "tolerance": tolerance.describe(), "device": "cpu"}

    def _fail(self, path: Path, message: str, error: Exception | None) -> None:
        """Write the report, log the error; raise only with ``strict``."""
        self.report["message"] = message
        try:
            path.write_text(json.dumps(self.report, indent=2) + "\n")
            self.report_path = path
            where = f"; report: {path}"
        except OSError as write_error:
            where = f"; the report could not be written to {path} ({write_error})"
        logger.error("ExportOnnxCallback: %s%s", message, where)
        if self.strict:
            if error is not None:
                raise error
            raise RuntimeError(f"ExportOnnxCallback: {message}.")


def cpu_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` on the CPU in eval mode, made tensor by tensor, so the training device never
    holds a second copy (``copy.deepcopy(model).cpu()`` would first copy on the GPU)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
        clone = tensor.detach().to("cpu", dtype, copy=True)
        memo[id(tensor)] = nn.Parameter(clone, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else clone
    return copy.deepcopy(model, memo).eval()


"""The export folder: whether an output folder may be replaced, and what goes into it besides the graphs (config,
generation config, tokenizer files, ``ptv2_export.json``). Metadata is built once, from the plan, and written once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import peft
import torch
import transformers

import ptv2_plugin

from . import layout as L
from .plan import GENERATIVE_TASKS, ExportPlan

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja",
)


def check_output_dir(output_dir: str | os.PathLike, force: bool, option: str = "force=True (--force)") -> None:
    """Refuse an output folder unless it is missing, empty, or (with ``force``) an earlier export and nothing else.

    An earlier export is recognised by its ``ptv2_export.json``; every entry of the folder must be a file that
    export listed as written (or the callback's validation report), so a user's file inside it is never deleted.
    ``option`` is how the caller's user spells ``force`` in the messages.
    """
    output_dir = Path(output_dir)
    if os.path.lexists(output_dir) and not output_dir.is_dir():
        raise FileExistsError(f"Output path {output_dir} exists and is not a folder.")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not force:
        raise FileExistsError(
            f"Output folder {output_dir} is not empty; pass {option} to replace an earlier export there."
        )
    foreign = foreign_entries(output_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"Refusing to replace {output_dir}: it holds {shown}, which no export wrote. {option} only "
            f"replaces an empty folder or an earlier export (a folder with {L.METADATA_FILE_NAME} and only the files "
            "it lists). Nothing was changed; move those files or choose another output folder."
        )


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that no export wrote there (all of them when it holds no readable export metadata)."""
    try:
        metadata = json.loads((folder / L.METADATA_FILE_NAME).read_text())
        written = metadata.get("written_files")
        if written is None:  # exports made before the list was recorded: the names an export writes
            graphs = list(metadata["files"])
            written = [*graphs, *(g + "_data" for g in graphs), "config.json", "generation_config.json",
                       *TOKENIZER_FILES]
        if not isinstance(written, list) or not all(isinstance(name, str) for name in written):
            raise TypeError("written_files is not a list of names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sorted(e.name for e in os.scandir(folder))
    ours = {*written, L.METADATA_FILE_NAME, L.VALIDATION_REPORT_FILE_NAME}
    return sorted(e.name for e in os.scandir(folder) if e.name not in ours or not e.is_file(follow_symlinks=False))


def write_model_files(plan: ExportPlan, staging: Path, tokenizer: Any = None) -> list[str]:
    """Config, generation config (generative tasks) and tokenizer files; returns the tokenizer files copied from
    the source folders (empty when ``tokenizer`` was saved instead, or there was none)."""
    inner = plan.inner
    inner.config.save_pretrained(staging)
    if plan.task in GENERATIVE_TASKS and getattr(inner, "generation_config", None) is not None:
        inner.generation_config.save_pretrained(staging)
    copied = _copy_tokenizer(plan.source_dirs, staging)
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(staging)
    return copied


def _copy_tokenizer(source_dirs: list[Path], target: Path) -> list[str]:
    for folder in source_dirs:
        found = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
        if found:
            for name in found:
                shutil.copy2(folder / name, target / name)
            return found
    return []


def build_metadata(plan: ExportPlan, fused: Counter, base_fingerprint: str | None,
                   quantized: dict[str, Any] | None = None) -> dict[str, Any]:
    """``ptv2_export.json`` of an export (``parity`` and ``written_files`` are filled in by the pipeline)."""
    peft_model, names, multi = plan.peft_model, plan.adapters, plan.multi
    first = peft_model.peft_config[names[0]]
    graph = plan.graphs[0].layout
    with_past = any(g.layout.with_past for g in plan.graphs)
    ids = [L.ADAPTER_IDS_INPUT] if multi else []
    return {
        "format": "ptv2-onnx/1",
        "task": plan.task,
        "optimum_task": L.OPTIMUM_TASK[plan.task] + ("-with-past" if with_past else ""),
        "model_type": plan.inner.config.model_type,
        "adapters": names,
        "multi_adapter": multi,
        "adapter_ids_input": L.ADAPTER_IDS_INPUT if multi else None,
        "num_virtual_tokens": max(peft_model.peft_config[n].num_virtual_tokens for n in names),
        "num_virtual_tokens_per_adapter": {n: peft_model.peft_config[n].num_virtual_tokens for n in names},
        "base_model_name_or_path": first.base_model_name_or_path,
        "dtype": plan.dtype if isinstance(plan.dtype, str) else str(plan.dtype).replace("torch.", ""),
        "exporter": plan.exporter,
        "opset": plan.opset,
        "with_past": with_past,
        "inputs": graph.inputs + ids,
        "outputs": graph.outputs,
        "files": {
            g.file_name: {"inputs": g.layout.inputs + (ids if g.slots else []), "outputs": g.layout.outputs,
                          "prefix_slots": g.slots}
            for g in plan.graphs
        },
        "exported_on": str(plan.device),
        "versions": {
            "ptv2_plugin": ptv2_plugin.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "parity": None,
        "prefix_as": plan.prefix_as,
        "prefix_capacity": plan.prefix_capacity,
        "base_fingerprint": base_fingerprint,
        # by op: com.microsoft.Attention where packed_attention.py packed a layer, else MultiHeadAttention
        "fused_attention": {"ops": dict(sorted(fused.items())), "layers": sum(fused.values())} if fused else None,
        "quantization": {"scheme": plan.quantize, "files": quantized} if quantized else None,
    }


def write_metadata(staging: Path, metadata: dict[str, Any]) -> None:
    """The last file of the folder: it lists every file the export wrote (itself included), which is what lets a
    later ``force=True`` export replace this one and nothing else."""
    metadata["written_files"] = sorted({p.name for p in staging.iterdir()} | {L.METADATA_FILE_NAME})
    (staging / L.METADATA_FILE_NAME).write_text(json.dumps(metadata, indent=2) + "\n")

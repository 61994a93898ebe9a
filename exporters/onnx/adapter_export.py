"""Write one P-Tuning v2 adapter as an ONNX Runtime adapter file for a graph exported with
``prefix_as="adapter_inputs"``: a task added to a deployment is a file of a few hundred KB, not a new graph.

The file is ``onnxruntime.AdapterFormat``: named tensors (``ptv2.prefix.{slot}.key/value`` and the task head's
``ptv2.head.{module}.{param}``), bound by name to the graph's overridable inputs. AdapterFormat has no free-form
metadata, so the base model and geometry go into a JSON sidecar next to it (``sst2.onnx_adapter.json``); its
``model_version`` carries the first 28 bits of the base model's fingerprint as well, so a file that lost its sidecar
still cannot be bound to a graph of another base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import layout as L
from .adapter_tensors import adapter_tensors, base_fingerprint
from .model_source import resolve_adapters, resolve_model, resolve_task
from .plan import parse_dtype


def export_prefix_adapter(model: Any, path: str | os.PathLike, *, adapter_name: str | None = None,
                          base_model: Any = None, task: str | None = None, dtype: str = "float32",
                          prefix_capacity: int | None = None, force: bool = False) -> Path:
    """Write ``path`` (an ``.onnx_adapter`` file) and ``path + ".json"`` for one adapter of ``model``.

    ``model`` is a ``PeftModel`` or a saved adapter folder (then ``base_model`` as in ``export``). ``dtype`` must
    match the graph's (float32 or float16), ``prefix_capacity`` the graph's (for graphs exported with one: the
    prefix is padded to it and its real length stored). Returns ``path``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to replace it.")
    torch_dtype = parse_dtype(dtype)
    peft_model, _ = resolve_model(model, base_model, task, lambda _message: None)
    task = resolve_task(peft_model, task)
    if task == "SEQ_2_SEQ_LM":
        raise NotImplementedError("Prefix adapter files for encoder-decoder (SEQ_2_SEQ_LM) models are not supported "
                                  "yet.")
    (name,) = resolve_adapters(peft_model, adapter_name, None)
    tensors = {key: (value if key == L.PREFIX_LENGTH else value.to(torch_dtype)).numpy()
               for key, value in adapter_tensors(peft_model, name, prefix_capacity).items()}
    fingerprint = base_fingerprint(peft_model)
    config = peft_model.peft_config[name]
    sidecar = {
        "format": L.ADAPTER_FORMAT,
        "adapter_name": name,
        "task": task,
        "model_type": peft_model.base_model.model.config.model_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "base_fingerprint": fingerprint,
        "num_virtual_tokens": config.num_virtual_tokens,
        "prefix_capacity": prefix_capacity,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "parameters": {key: {"shape": list(value.shape), "dtype": str(value.dtype)} for key, value in tensors.items()},
    }
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(L.ADAPTER_FORMAT_VERSION)
    adapter.set_model_version(L.model_version(fingerprint))
    adapter.set_parameters({key: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                            for key, value in tensors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    adapter.export_adapter(str(partial))
    L.adapter_sidecar(partial).write_text(json.dumps(sidecar, indent=2) + "\n")
    os.replace(L.adapter_sidecar(partial), L.adapter_sidecar(path))
    os.replace(partial, path)  # the adapter file appears last: whoever sees it finds its sidecar
    return path

"""Serving side of swappable prefixes: read an ``.onnx_adapter`` file, check that it fits the loaded graph, and keep
what a run needs to bind it, without rebuilding the session.

Plain runs bind the adapter the way ONNX Runtime intends: ``RunOptions.add_active_adapter(LoraAdapter)`` feeds its
tensors to the graph inputs of the same names. ``run_with_iobinding`` ignores active adapters (ORT logs that they
"won't have an effect"), so IOBinding runs bind the same tensors as ``OrtValue``s, copied to the device once at load.
An adapter made for another base model or of another shape is refused here, with the reason; nothing is ever bound
partially or silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .. import layout as L

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


class PrefixAdapterMismatch(ValueError):
    """The adapter file does not fit this graph (another base model, prefix length, head or dtype)."""


@dataclass
class PrefixAdapter:
    """One loaded adapter: run options for plain runs, ``OrtValue``s (on the session's device) for IOBinding."""

    name: str
    path: Path
    run_options: Any
    values: dict[str, Any]
    info: dict = field(default_factory=dict)
    _keep_alive: tuple = ()  # the LoraAdapter and the host arrays the OrtValues point into


def swappable_inputs(session) -> dict[str, tuple[tuple, str]]:
    """Name -> (shape, dtype) of the graph's swappable prefix/head inputs (its overridable ``ptv2.*`` initializers)."""
    return {i.name: (tuple(i.shape), _ORT_TYPES.get(i.type, i.type))
            for i in session.get_overridable_initializers() if i.name.startswith(L.OWNED_PREFIX)}


def read_prefix_adapter(path: str | Path, name: str | None, session, metadata: dict, device: str = "cpu",
                        device_id: int = 0) -> PrefixAdapter:
    """Load ``path`` for ``session`` (a graph exported with ``prefix_as="adapter_inputs"``) after checking it fits."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No adapter file {path}; write one with exporters.onnx.export_prefix_adapter(...).")
    expected = swappable_inputs(session)
    if metadata.get("prefix_as") != "adapter_inputs" or not expected:
        raise ValueError("This graph has its prefix baked in as constants; export it with "
                         "prefix_as='adapter_inputs' to swap prefix adapters per call.")
    sidecar_path = L.adapter_sidecar(path)
    info = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    if info and info.get("format") != L.ADAPTER_FORMAT:
        raise PrefixAdapterMismatch(f"{sidecar_path} is not a {L.ADAPTER_FORMAT} sidecar (format "
                                    f"{info.get('format')!r}).")
    adapter = ort.AdapterFormat.read_adapter(str(path))
    _check_base(adapter, info, metadata, path)
    # .numpy() views the reader's buffer, which goes away with ``adapter``: copy
    arrays = {key: np.array(value.numpy(), copy=True) for key, value in adapter.get_parameters().items()}
    _check_geometry(arrays, expected, path)
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(lora)
    if device == "cpu":
        values = {key: ort.OrtValue.ortvalue_from_numpy(array) for key, array in arrays.items()}
    else:
        values = {key: ort.OrtValue.ortvalue_from_numpy(array, device, device_id) for key, array in arrays.items()}
    name = name or info.get("adapter_name") or path.name.removesuffix(L.ADAPTER_FILE_SUFFIX)
    return PrefixAdapter(name, path, run_options, values, info, (lora, arrays))


def _check_base(adapter, info: dict, metadata: dict, path: Path) -> None:
    graph_fingerprint = metadata.get("base_fingerprint") or ""
    ours = f"{metadata.get('base_model_name_or_path')!r} (fingerprint {graph_fingerprint[:12]})"
    theirs = f"{info.get('base_model_name_or_path')!r} (fingerprint {str(info.get('base_fingerprint'))[:12]})" \
        if info else f"model version {adapter.get_model_version()}"
    if adapter.get_adapter_version() != L.ADAPTER_FORMAT_VERSION:
        raise PrefixAdapterMismatch(f"{path} has adapter version {adapter.get_adapter_version()}; this runtime "
                                    f"reads version {L.ADAPTER_FORMAT_VERSION} (written by export_prefix_adapter).")
    same_version = adapter.get_model_version() == L.model_version(graph_fingerprint) if graph_fingerprint else False
    if not same_version or (info and info.get("base_fingerprint") != graph_fingerprint):
        raise PrefixAdapterMismatch(f"{path} was made for base model {theirs}; this graph serves {ours}. A prefix "
                                    "only works with the frozen backbone it was trained on.")
    if info and metadata.get("task") and info.get("task") != metadata["task"]:
        raise PrefixAdapterMismatch(f"{path} is a {info.get('task')} adapter; this graph serves {metadata['task']}.")


def _check_geometry(arrays: dict[str, np.ndarray], expected: dict[str, tuple[tuple, str]], path: Path) -> None:
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if L.PREFIX_LENGTH in missing:
        capacity = expected[L.PREFIX_KEY_0][0][-2] if L.PREFIX_KEY_0 in expected else "its"
        raise PrefixAdapterMismatch(f"{path} was written without a prefix capacity; this graph holds prefixes of up "
                                    f"to {capacity} tokens: write it with export_prefix_adapter(..., "
                                    f"prefix_capacity={capacity}) (CLI: --prefix-capacity {capacity}).")
    if L.PREFIX_LENGTH in extra:
        raise PrefixAdapterMismatch(f"{path} is padded for a graph with a prefix capacity; this graph has none: "
                                    "write it without prefix_capacity.")
    if missing or extra:
        raise PrefixAdapterMismatch(f"{path} does not fit this graph: missing tensors {missing}, unknown tensors "
                                    f"{extra} (another architecture, number of prefixed layers or task head).")
    for key, (shape, dtype) in expected.items():
        got = (tuple(arrays[key].shape), str(arrays[key].dtype))
        if got != (shape, dtype):
            raise PrefixAdapterMismatch(
                f"{path}: {key} is {got[1]} {list(got[0])}, the graph takes {dtype} {list(shape)}; prefix adapters "
                "must match the graph's num_virtual_tokens, heads, head size, label count and dtype."
            )

"""ONNX Runtime sessions and the base class of every served model: one graph, its config and export metadata.

A session really runs on the provider asked for (ORT's silent fallback to CPU is an error here). On CUDA, inputs and
outputs go through IOBinding, bound to the session's ``device_id``; outputs named in ``keep_on_device`` stay
``OrtValue``s on the device, so a decoder's cache never crosses to the host between steps. A loaded prefix adapter
(``prefix_adapters.py``) is bound per run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoConfig

from .. import layout as L
from ..providers import CPU, CUDA, disabled_optimizers, missing_provider_message, warn_on_wheel_clash
from .prefix_adapters import PrefixAdapter, read_prefix_adapter

warn_on_wheel_clash()  # two onnxruntime wheels in one folder: say so at import, before CUDA silently goes missing

ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def create_session(path: str | Path, provider: str = CPU, *, session_options=None,
                   provider_options: Mapping[str, Any] | None = None, skip_optimizers: Sequence[str] | None = None):
    """An InferenceSession that really runs on ``provider``: ORT's silent fallback to CPU is turned into an error
    that says which onnxruntime is active and how to fix it. ``skip_optimizers`` names ORT graph rewrites to skip;
    by default those that slow ``provider`` down (``providers.DISABLED_OPTIMIZERS``)."""
    if provider not in ort.get_available_providers():
        raise RuntimeError(missing_provider_message(provider, ort))
    providers: list = [(provider, dict(provider_options or {}))]
    if provider != CPU:
        providers.append(CPU)  # for the few ops a GPU provider leaves to the CPU
    skip = disabled_optimizers(provider) if skip_optimizers is None else list(skip_optimizers)
    session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers,
                                   disabled_optimizers=skip)
    if provider not in session.get_providers():
        raise RuntimeError(
            f"ONNX Runtime could not start {provider} (available: {ort.get_available_providers()}, session uses "
            f"{session.get_providers()}): the CUDA or cuDNN libraries onnxruntime-gpu {ort.__version__} needs were not "
            "found. Install the matching CUDA/cuDNN, or call onnxruntime.preload_dlls() (onnxruntime-gpu >= 1.21) to "
            "load those of the nvidia-* pip packages PyTorch uses."
        )
    return session


class ORTModel:
    """Base class: one ``model.onnx`` session plus the folder's config and export metadata."""

    task: ClassVar[str] = ""

    def __init__(self, session, config, model_dir: Path, metadata: dict | None = None,
                 use_io_binding: bool | None = None) -> None:
        self.session = session
        self.config = config
        self.model_dir = Path(model_dir)
        self.metadata = metadata or {}
        self.provider = session.get_providers()[0]
        self.device = "cuda" if self.provider == CUDA else "cpu"
        self.device_id = int(session.get_provider_options().get(self.provider, {}).get("device_id", 0))
        self.use_io_binding = self.device == "cuda" if use_io_binding is None else bool(use_io_binding)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_dtypes = {i.name: ORT_TO_NUMPY.get(i.type, np.float32) for i in session.get_inputs()}
        self.adapters: list[str] = list(self.metadata.get("adapters") or [])
        self.prefix_adapters: dict[str, PrefixAdapter] = {}
        if self.task and self.metadata.get("task") not in (None, self.task):
            raise ValueError(
                f"{self.model_dir} holds a {self.metadata['task']} export; {type(self).__name__} serves {self.task}."
            )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, provider: str = CPU, *,
                        session_options=None, provider_options: Mapping[str, Any] | None = None,
                        use_io_binding: bool | None = None, file_name: str = L.ONNX_FILE_NAME,
                        metadata: dict | None = None):
        """``metadata``: the folder's ``ptv2_export.json`` as a dict (default: read from the folder); the exporter
        passes it while validating, before the file is written."""
        model_dir = Path(model_dir)
        path = model_dir / file_name
        if not path.is_file():
            raise FileNotFoundError(f"No {file_name} in {model_dir}; export one with exporters.onnx.export(...).")
        metadata = read_metadata(model_dir) if metadata is None else metadata
        config = AutoConfig.from_pretrained(str(model_dir))
        if session_options is None and metadata.get("prefix_as") == "adapter_inputs":
            session_options = swappable_session_options()
        session = create_session(path, provider, session_options=session_options, provider_options=provider_options)
        return cls(session, config, model_dir, metadata, use_io_binding)

    # ------------------------------------------------------------------------------------------ prefix adapters
    def load_prefix_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Make the adapter file ``path`` (``export_prefix_adapter``) selectable as ``adapter=name`` in later calls.

        The graph must be exported with ``prefix_as="adapter_inputs"``; a file for another base model or of another
        geometry is refused. Costs one file read and (on CUDA) one copy to the device; the session is untouched, so
        adapters can be added or replaced while others are served. Returns the name (default: the adapter's own).
        """
        adapter = read_prefix_adapter(path, name, self.session, self.metadata, self.device, self.device_id)
        self.prefix_adapters[adapter.name] = adapter
        return adapter.name

    def unload_prefix_adapter(self, name: str) -> None:
        self._prefix_adapter(name)
        del self.prefix_adapters[name]

    def _prefix_adapter(self, name: str) -> PrefixAdapter:
        adapter = self.prefix_adapters.get(name)
        if adapter is None:
            loaded = sorted(self.prefix_adapters) or "none (use load_prefix_adapter)"
            raise KeyError(f"No prefix adapter named {name!r}; loaded: {loaded}.")
        return adapter

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------ inputs
    def _prepare(self, input_ids, attention_mask=None, token_type_ids=None, adapter_ids=None,
                 adapter_names: Sequence[str] | None = None, **extra) -> dict[str, np.ndarray]:
        ids = to_numpy(input_ids, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {ids.shape}.")
        feed = {"input_ids": ids}
        feed["attention_mask"] = np.ones_like(ids) if attention_mask is None else to_numpy(attention_mask, np.int64)
        if "token_type_ids" in self.input_names:
            types = np.zeros_like(ids) if token_type_ids is None else to_numpy(token_type_ids, np.int64)
            feed["token_type_ids"] = types
        if L.ADAPTER_IDS_INPUT in self.input_names:
            feed[L.ADAPTER_IDS_INPUT] = self._adapter_ids(adapter_ids, adapter_names, ids.shape[0])
        elif adapter_ids is not None or adapter_names is not None:
            raise ValueError("This export holds a single adapter; adapter_ids/adapter_names do not apply.")
        unknown = [k for k, v in extra.items() if v is not None and k not in ("return_dict", "output_attentions",
                                                                              "output_hidden_states")]
        if unknown:
            raise TypeError(f"{type(self).__name__} got unsupported arguments {unknown}.")
        return feed

    def _adapter_ids(self, adapter_ids, adapter_names, batch: int) -> np.ndarray:
        if adapter_names is not None:
            if isinstance(adapter_names, str):
                adapter_names = [adapter_names] * batch
            unknown = sorted(set(adapter_names) - set(self.adapters))
            if unknown:
                raise ValueError(f"Unknown adapters {unknown}; this export holds {self.adapters}.")
            adapter_ids = [self.adapters.index(name) for name in adapter_names]
        if adapter_ids is None:
            raise ValueError(f"This export holds adapters {self.adapters}: pass adapter_names=[...] (one per row).")
        ids = to_numpy(adapter_ids, np.int64).reshape(-1)
        if ids.shape[0] == 1 and batch > 1:
            ids = np.repeat(ids, batch)
        if ids.shape[0] != batch or ids.min() < 0 or ids.max() >= len(self.adapters):
            raise ValueError(f"adapter_ids must hold {batch} values in [0, {len(self.adapters)}), got {ids.tolist()}.")
        return ids

    # --------------------------------------------------------------------------------------------------- run
    def _run(self, feed: Mapping[str, Any], keep_on_device: Sequence[str] = (),
             adapter: str | None = None) -> dict[str, Any]:
        """Outputs by name: numpy arrays, except ``keep_on_device`` names, which stay ``OrtValue``s under IOBinding.
        ``adapter`` names a loaded prefix adapter to bind for this run (default: the graph's own prefix)."""
        prefix = self._prefix_adapter(adapter) if adapter is not None else None
        if not self.use_io_binding:
            arrays = {k: (v.numpy() if is_ort_value(v) else v) for k, v in feed.items()}
            options = prefix.run_options if prefix is not None else None
            return dict(zip(self.output_names, self.session.run(None, arrays, options)))
        binding = self.session.io_binding()
        if prefix is not None:
            for name, value in prefix.values.items():
                binding.bind_ortvalue_input(name, value)
        for name, value in feed.items():
            if is_ort_value(value):  # an OrtValue, possibly already on the device
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: value if name in keep_on_device else value.numpy()
                for name, value in zip(self.output_names, values)}

    def _forward_outputs(self, adapter: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        feed = self._prepare(**kwargs)
        return {name: torch.from_numpy(np.asarray(value)) for name, value in self._run(feed, adapter=adapter).items()}


def swappable_session_options(intra_op_threads: int = 0):
    """Session options for swappable-prefix graphs: ORT warns once per overridable initializer that it will not be
    constant-folded, which is exactly what makes the prefix swappable, so only errors are logged.
    ``intra_op_threads`` 0 is ORT's default (one per core)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = intra_op_threads
    return options


def read_metadata(model_dir: str | Path) -> dict:
    """An export folder's ``ptv2_export.json`` ({} for a folder without one)."""
    path = Path(model_dir) / L.METADATA_FILE_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def one_cache(cache, past_key_values):
    """The cache a runtime call was given under either name; both at once is ambiguous."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the cache once: as cache= or as past_key_values=, not both.")
    return cache if cache is not None else past_key_values


def is_ort_value(value) -> bool:
    return hasattr(value, "device_name")


def to_numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value).astype(dtype, copy=False)

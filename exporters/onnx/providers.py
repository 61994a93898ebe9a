"""ONNX Runtime execution providers: which wheel is installed, CUDA provider options, and errors that say the fix.

Why the wheel check: ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same ``onnxruntime`` package folder.
Installed side by side, whichever came last wins file by file, and a CUDA request then silently finds no CUDA
provider. Install exactly one: ``pip install "ptv2-plugin[onnx]"`` (CPU) or ``pip install "ptv2-plugin[gpu]"``
(CUDA). A GPU wheel installed into its own folder that comes first on ``sys.path`` (``pip install --target``, as
``scripts/gpu_check.sh`` does) does not clash: that one is imported.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
ONNXRUNTIME_WHEELS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                      "onnxruntime-qnn", "onnxruntime-training")
INSTALL_HINT = ("install exactly one onnxruntime wheel: pip uninstall -y onnxruntime onnxruntime-gpu, then "
                "pip install \"ptv2-plugin[gpu]\" for CUDA (or \"ptv2-plugin[onnx]\" for CPU)")


# Graph rewrites ONNX Runtime should skip per provider. On CPU, ORT's SkipLayerNormalization kernel runs 2.2-4.9x
# slower than the Add + LayerNormalization it replaces (ORT 1.32, float32, hidden 384-2048, batch 1 x 16 and 32 x 64,
# 2 threads; `python -m benchmarks.ort_fusions`, benchmarks/results/ort_fusions); its RMSNorm variant 1.05-1.33x
# slower but for one case (hidden 2048 at 32 x 64: 0.80x). The fusion fires on graphs whose shapes are annotated
# (ORT's quantizer annotates them: every torchscript int8 graph). CUDA keeps it (the fused kernel is fast there).
DISABLED_OPTIMIZERS: dict[str, tuple[str, ...]] = {CPU: ("SkipLayerNormFusion",)}


def disabled_optimizers(provider: str) -> list[str]:
    """The ORT graph rewrites to skip on ``provider`` (``InferenceSession(..., disabled_optimizers=...)``)."""
    return list(DISABLED_OPTIMIZERS.get(provider, ()))


def cuda_provider_options(*, tf32: bool = False, device_id: int = 0) -> dict[str, str]:
    """CUDA provider options for exact float32: ORT enables TF32 MatMuls by default, and their rounding alone can move
    float32 outputs past a float32 parity tolerance. Serving may opt in with ``tf32=True`` for speed."""
    return {"device_id": str(int(device_id)), "use_tf32": "1" if tf32 else "0"}


def installed_onnxruntime_wheels() -> dict[str, str]:
    """Installed onnxruntime distributions -> the folder each is installed into."""
    found = {}
    for name in ONNXRUNTIME_WHEELS:
        try:
            found[name] = str(importlib.metadata.distribution(name).locate_file(""))
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def wheel_clash(wheels: dict[str, str] | None = None) -> str | None:
    """A message when two onnxruntime wheels share one folder (one shadows the other), else None."""
    wheels = installed_onnxruntime_wheels() if wheels is None else wheels
    by_folder: dict[str, list[str]] = defaultdict(list)
    for name, folder in wheels.items():
        by_folder[folder].append(name)
    for folder, names in by_folder.items():
        if len(names) > 1:
            return (f"{' and '.join(sorted(names))} are installed side by side in {folder}: they share one "
                    f"`onnxruntime` package and the one installed last shadows the other, so CUDA may be missing "
                    f"although onnxruntime-gpu is installed. Fix: {INSTALL_HINT}.")
    return None


def warn_on_wheel_clash() -> None:
    problem = wheel_clash()
    if problem:
        warnings.warn(problem, RuntimeWarning, stacklevel=3)


def missing_provider_message(provider: str, ort: Any, wheels: dict[str, str] | None = None) -> str:
    """Why ``provider`` is not available in the imported onnxruntime, and how to fix it."""
    wheels = installed_onnxruntime_wheels() if wheels is None else wheels
    active = (f"the imported onnxruntime {ort.__version__} ({getattr(ort, '__file__', '?')}) offers "
              f"{ort.get_available_providers()}")
    if provider != CUDA:
        return f"{provider} is not available: {active}."
    clash = wheel_clash(wheels)
    if clash:
        return f"CUDA was requested but {active}. {clash}"
    if "onnxruntime-gpu" not in wheels:
        return (f"CUDA was requested but {active}; onnxruntime-gpu is not installed (found: "
                f"{', '.join(sorted(wheels)) or 'none'}). Fix: {INSTALL_HINT}.")
    return (f"CUDA was requested but {active}, although onnxruntime-gpu is installed in "
            f"{wheels['onnxruntime-gpu']}: another onnxruntime comes first on sys.path. Fix: {INSTALL_HINT}.")


def cuda_unavailable_reason() -> str | None:
    """None when ONNX Runtime's CUDA provider really runs here, else why not.

    Decided by running a one-op graph, not by listing providers: onnxruntime-gpu lists CUDAExecutionProvider even
    when the driver, CUDA or cuDNN libraries are missing, and then silently runs on CPU. CUDA/cuDNN from the nvidia-*
    pip packages (what PyTorch uses) are preloaded first where onnxruntime can (``preload_dlls``, >= 1.21).
    """
    from onnx import TensorProto, helper  # onnx only for this probe graph: serving processes need no onnx otherwise

    if CUDA not in ort.get_available_providers():
        return missing_provider_message(CUDA, ort)
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA])
        if session.get_providers()[0] != CUDA:
            return f"onnxruntime {ort.__version__} fell back to {session.get_providers()} (no usable CUDA device)"
        result = session.run(None, {"x": np.ones(2, dtype=np.float32)})[0]
        if result.tolist() != [2.0, 2.0]:
            return "CUDA session returned wrong results"
    except Exception as error:  # noqa: BLE001 - any failure to start or run means "no CUDA here"
        return f"CUDAExecutionProvider cannot run here: {type(error).__name__}: {error}"
    return None

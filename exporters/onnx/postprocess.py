"""After tracing: turn a traced graph's prefix inputs into initializers holding exactly the exported prefix, merge
projections that share an input into one GEMM, pack fused attention onto that GEMM where the graph stays float32,
convert to float16 where asked, move weights to a side file above protobuf's size cap, and check the result."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from .float16 import convert_to_float16
from .fused_attention import fused_ops
from .merge_projections import merge_shared_input_projections
from .packed_attention import pack_prefixed_attention

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a serialized graph at 2 GB: weights go to a side file above this


def finalize_graph(traced: Path, path: Path, initializers: dict[str, torch.Tensor], dtype: torch.dtype,
                   overridable: bool = False, pack_attention: bool = False) -> Counter:
    """Write ``path`` from the traced graph ``traced``; ``initializers`` are its trailing inputs (prefix, extras).
    ``overridable`` keeps them listed as graph inputs too: an initializer that is also an input is an input with a
    default value, which ONNX Runtime's adapters (and plain feeds) can replace per run. ``pack_attention`` rewrites
    fused layers as ``com.microsoft.Attention`` (packed_attention.py; the caller decides, ``export._packs_attention``).
    Returns the fused attention nodes written, by op (``fused_attention.fused_ops``)."""
    proto = onnx.load(str(traced))
    present = {i.name for i in proto.graph.input}
    missing = [name for name in initializers if name not in present]
    if missing:
        raise RuntimeError(f"The traced graph lost prefix inputs {missing}; the prefix never reached attention.")
    kept = [i for i in proto.graph.input if overridable or i.name not in initializers]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    for name, tensor in initializers.items():
        proto.graph.initializer.append(numpy_helper.from_array(tensor.cpu().numpy(), name))
    merge_shared_input_projections(proto)  # one GEMM per shared input (merge_projections.py says why)
    if pack_attention:
        pack_prefixed_attention(proto)
    external = sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    if dtype == torch.float16:
        proto = convert_to_float16(proto, external_path=traced.with_name("float32-" + path.name) if external else None)
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + "_data" if external else None)
    onnx.checker.check_model(str(path))
    return fused_ops(proto.graph)

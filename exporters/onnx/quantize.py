"""int8 serving graphs: dynamic quantization with ONNX Runtime's quantizer, validated by prediction agreement.

Why dynamic quantization: weights are stored as int8 once, activations are quantized per call
(``DynamicQuantizeLinear``), so no calibration data is needed and any exported folder can be converted. ONNX
Runtime's CPU optimizer fuses the ``DynamicQuantizeLinear -> MatMulInteger -> scale`` chains into its int8 GEMM
kernels. Weights are signed (``QInt8``): with ORT's u8 activations that is the u8s8 kernel that VNNI CPUs run
natively; ``QUInt8`` weights (u8u8) measured about 2x slower on this project's machines with no accuracy gain
(``benchmarks/onnx_inference.py`` records the choice).

What is quantized: MatMuls whose second input is a constant weight (``MatMulConstBOnly``: query/key/value and
attention-output projections, feed-forward up/gate and down projections, pooler, LM head), weights per output
channel, and ``com.microsoft.Attention``. Feed-forward down projections keep their ``OUTLIER_CHANNELS`` largest
input channels in float32 (``outlier_channels.py``: those channels would otherwise set the per-tensor activation
scale). Measured on MiniLM with a trained SST-2 adapter (dev set, 872 examples, one-off script): down projections
whole in float32 (the earlier scheme) 98.62% agreement with float32, mean |logit margin error| 0.054, 158 ms at
b32 x s64 (2 threads); quantized whole 97.25%, 0.075, 110 ms; with 4 outlier channels float32 98.51%, 0.056, 116 ms.
Per-tensor weights instead of per-channel flipped 8.5% of predictions (max logit error 0.69). What stays float32:

* classifier heads (a weight with more rows than columns whose product reaches a graph output with no weight
  MatMul, norm, attention or residual connection in between): tiny, and the logits they produce are what
  agreement is judged on;
* the attention-score MatMuls (both inputs are activations), the fused ``com.microsoft.MultiHeadAttention`` (a
  float kernel; its input projections are quantized), norms, softmax;
* every node that reads a ``ptv2.*`` initializer: the prefix keys/values and the swappable task heads stay float32
  and bit-equal to the float export's, so an adapter file still binds to the graph.

Why a float tolerance cannot validate it: int8 rounding moves logits by ~1e-2 of their range. The check therefore
compares predictions: the argmax agreement rate over every logits row (every token for token classification and
decoders) and the largest logit error; it fails below ``min_agreement``. Graphs without logits (feature
extraction) are checked by the cosine similarity of their hidden-state vectors instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from . import layout as L
from .float16 import _name_nodes
from .layout import build_layout
from .outlier_channels import as_matmul, channel_absmax, outlier_channels, split_outlier_channels
from .providers import CPU
from .sample_inputs import sample_inputs
from .serving import load
from .validate import check_parity

logger = logging.getLogger(__name__)

QUANTIZE_OPTIONS = ("int8",)
WEIGHT_TYPE = "QInt8"
OP_TYPES = ("MatMul", "Attention")
# Ops that only a quantized graph holds (before ORT's session-time fusions).
QUANTIZED_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "QAttention", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat")
DEFAULT_MIN_AGREEMENT = 0.95
MIN_COSINE = 0.99  # feature extraction: every hidden-state vector at least this close to PyTorch's in direction
# Encoders: 16 extra batches of 64 x 16 random tokens, so the rate rests on 1024 rows. int8 flips 2-3% of a trained
# MiniLM SST-2 classifier's predictions, random tokens and dev sentences alike (10 of the 11 flips seen in a one-off
# probe had a PyTorch margin under 0.11). Over the 70 rows of one batch such a healthy graph falls below 95% about
# one time in six (binomial at 3%); over 1024 rows about once in 4000, while a graph flipping 8.5% (per-tensor
# weights) still fails.
AGREEMENT_BATCHES, AGREEMENT_ROWS = 16, (64, 16)
# where the search for task heads stops: what lies beyond one of these is no longer a head's own output
STOP_OPS = ("MatMul", "Gemm", "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "ReduceMean", "Softmax", "MultiHeadAttention", "Attention")
CALIBRATION_ROWS, CALIBRATION_BATCHES = (16, 16), 4  # 1024 random tokens: where the down projections' outliers are


def parse_quantize(value: Any, dtype: torch.dtype, prefix_as: str = "constants") -> str | None:
    """``None`` (float graph) or ``"int8"``; anything else, int8 on a float16 export or on a swappable-prefix graph
    is refused by name."""
    if value is None or value is False:
        return None
    text = str(value).strip().lower()
    if text not in QUANTIZE_OPTIONS:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_OPTIONS} (dynamic int8 with ONNX Runtime's "
                         f"quantizer), got {value!r}.")
    if dtype != torch.float32:
        raise ValueError("quantize='int8' quantizes a float32 graph's weights; it cannot combine with "
                         "dtype='float16'. Export with dtype='float32' (the default).")
    if prefix_as != "constants":
        raise ValueError("quantize='int8' is not supported with prefix_as='adapter_inputs' yet: ONNX Runtime's "
                         "quantizer rewrites the task head's Gemm and drops its overridable input, so adapter files "
                         "would no longer bind. Use prefix_as='constants'.")
    return text


def check_min_agreement(value: float | None, quantization: str | None) -> float:
    if value is None:
        return DEFAULT_MIN_AGREEMENT
    if quantization is None:
        raise ValueError("min_agreement applies to quantized exports (quantize='int8'); a float graph is validated "
                         "by atol/rtol.")
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1], got {value}.")
    return value


# ------------------------------------------------------------------------------------------------ quantizing
def protected_nodes(graph) -> list[str]:
    """Nodes that read a ``ptv2.*`` initializer (named, so the quantizer can exclude them)."""
    owned = {t.name for t in graph.initializer if t.name.startswith(L.OWNED_PREFIX)}
    return [node.name for node in graph.node if owned.intersection(node.input)]


def down_projections(graph) -> list[str]:
    """MatMul/Gemm nodes whose constant weight maps K inputs to N < K outputs: feed-forward output layers and
    classifier heads."""
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(shapes.get(node.input[1], [])) != 2:
            continue
        rows, columns = shapes[node.input[1]]
        if any(a.name == "transB" and a.i for a in node.attribute):
            rows, columns = columns, rows
        if rows > columns:
            found.append(node.name)
    return found


def task_heads(graph, candidates: list[str]) -> list[str]:
    """The nodes among ``candidates`` that produce a graph output without another weight MatMul, a norm or an
    attention or residual connection in between: task heads (and the per-adapter heads of a multi-adapter graph),
    which stay float32 whole. A feed-forward down projection's product joins the residual stream, which stops the
    search."""
    outputs = {o.name for o in graph.output}
    constants = {t.name for t in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def stops(node) -> bool:  # a residual connection adds two activations; a bias add has one constant input
        return node.op_type in STOP_OPS or (node.op_type == "Add" and not constants.intersection(node.input))

    heads = []
    for node in graph.node:
        if node.name not in candidates:
            continue
        frontier, seen = [node.output[0]], set()
        while frontier and not outputs.intersection(frontier):
            tensor = frontier.pop()
            for consumer in consumers.get(tensor, []):
                if not stops(consumer) and consumer.name not in seen:
                    seen.add(consumer.name)
                    frontier.extend(consumer.output)
        if outputs.intersection(frontier):
            heads.append(node.name)
    return heads


def quantized_op_counts(graph) -> dict[str, int]:
    ops = Counter(node.op_type for node in graph.node)
    return {op: ops[op] for op in QUANTIZED_OPS if ops[op]}


def quantize_graph(path: Path, calibration: Iterable[dict[str, np.ndarray]],
                   weight_type: str = WEIGHT_TYPE) -> dict[str, Any]:
    """Replace the float32 graph at ``path`` (inside an export's staging folder) by its dynamically quantized form.

    ``calibration``: feeds for the float graph (``calibration_feeds``), from which the down projections' outlier
    channels are found. Returns what the metadata records: method, weight type, op types and the quantized op counts.
    """
    proto = onnx.load(str(path))
    _name_nodes(proto.graph)  # the quantizer excludes nodes by name
    protected = protected_nodes(proto.graph)
    downs = [name for name in down_projections(proto.graph) if name not in protected]
    heads = task_heads(proto.graph, downs)
    nodes = {node.name: node for node in proto.graph.node}
    splits = [node for name in downs if name not in heads and (node := as_matmul(proto.graph, nodes[name]))]
    heads += [name for name in downs if name not in heads and nodes[name].op_type != "MatMul"]  # an unusual Gemm
    absmax = channel_absmax(proto, sorted({node.input[0] for node in splits}), calibration, path.parent)
    float_parts, split_channels = [], 0
    for node in splits:
        channels = outlier_channels(absmax[node.input[0]])
        if channels.size:
            float_parts.append(split_outlier_channels(proto.graph, node, channels))
            split_channels += int(channels.size)
    excluded = protected + heads + float_parts
    excluded += [name + "_MatMul" for name in excluded]  # the quantizer's name for a Gemm it rewrites as MatMul
    named = path.with_name("named-" + path.name)
    onnx.save_model(proto, str(named))
    side_file = path.with_name(path.name + "_data")
    quantized = path.with_name("int8-" + path.name)
    quantize_dynamic(
        str(named), str(quantized), weight_type=getattr(QuantType, weight_type), op_types_to_quantize=list(OP_TYPES),
        nodes_to_exclude=excluded, per_channel=True, reduce_range=False,
        # contrib ops (MultiHeadAttention) defeat ONNX shape inference: their outputs are float32
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    counts = quantized_op_counts(onnx.load(str(quantized), load_external_data=False).graph)
    if not counts:
        raise RuntimeError(f"Quantizing {path.name} changed no op (no MatMul with a constant weight?); nothing "
                           "would run in int8.")
    quantized.replace(path)
    named.unlink()
    side_file.unlink(missing_ok=True)  # a >2 GB float graph's weights; the int8 graph holds its own
    return {"method": "dynamic", "weight_type": weight_type, "per_channel": True, "op_types": list(OP_TYPES),
            "float32_nodes": {"reading_ptv2_initializers": len(protected), "heads": len(heads),
                              "outlier_channel_matmuls": len(float_parts)},
            "down_projections_split": {"count": len(float_parts), "float32_input_channels": split_channels,
                                       "calibration": "the export's sample inputs (random token ids)"},
            "quantized_ops": counts}


def calibration_feeds(config, graph: L.GraphLayout, path: Path, batches: int = CALIBRATION_BATCHES
                      ) -> list[dict[str, np.ndarray]]:
    """Feeds for the float graph at ``path``: the export's own sample inputs (random token ids; why that suffices:
    ``outlier_channels.py``), ``batches`` of them, with cache shapes read from the graph's past inputs."""
    inputs = onnx.load(str(path), load_external_data=False).graph.input
    past = [i for i in inputs if i.name.startswith("past_key_values.")]
    kv_shape = None
    if past:
        dims = past[0].type.tensor_type.shape.dim
        kv_shape = (dims[1].dim_value, dims[3].dim_value)
    batch, length = CALIBRATION_ROWS
    feeds = []
    for seed in range(batches):
        sample = sample_inputs(config, graph, batch=batch, length=length, kv_shape=kv_shape,
                               generator=torch.Generator().manual_seed(100 + seed))
        feed = {}
        for spec in inputs:
            if spec.name in sample:
                feed[spec.name] = sample[spec.name].numpy()
            elif spec.name == L.ADAPTER_IDS_INPUT:
                feed[spec.name] = np.zeros(batch, dtype=np.int64)
            elif not spec.name.startswith(L.OWNED_PREFIX):  # an overridable initializer has its default
                raise RuntimeError(f"No calibration input for graph input {spec.name!r} of {path.name}.")
        feeds.append(feed)
    return feeds


# ------------------------------------------------------------------------------------------------ validation
@dataclass
class AgreementReport:
    """Prediction agreement between PyTorch (float32) and the quantized graph; the parity report's interface."""

    min_agreement: float
    provider: str = CPU
    rows: int = 0
    agreeing: int = 0
    max_logit_diff: float = 0.0
    logit_scale: float = 0.0  # max |PyTorch logit| over all comparisons
    min_cosine: float | None = None
    max_other_diff: float = 0.0  # hidden states, caches: reported, not judged
    finite: bool = True
    worst: str = "-"
    cases: list[str] = field(default_factory=list)

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.rows if self.rows else None

    @property
    def ok(self) -> bool:
        if not self.finite or not self.cases:
            return False
        if self.rows:
            return self.agreement >= self.min_agreement
        return self.min_cosine is not None and self.min_cosine >= MIN_COSINE

    def add(self, case: str, reference: torch.Tensor, actual: torch.Tensor) -> None:
        if reference.shape != actual.shape:
            raise AssertionError(f"{case}: ONNX output shape {tuple(actual.shape)} != PyTorch {tuple(reference.shape)}")
        self.cases.append(case)
        if not reference.numel():
            return
        expected = reference.detach().float().cpu()
        got = torch.as_tensor(actual).float()
        if not torch.isfinite(got).all():
            self.finite, self.worst = False, case
            return
        diff = float((expected - got).abs().max())
        if case.split("] ", 1)[-1].split(" ")[0].endswith("logits"):  # "[adapter] logits batch=..."
            same = expected.argmax(-1) == got.argmax(-1)
            self.rows += same.numel()
            self.agreeing += int(same.sum())
            if diff >= self.max_logit_diff:
                self.max_logit_diff, self.worst = diff, case
            self.logit_scale = max(self.logit_scale, float(expected.abs().max()))
        else:
            self.max_other_diff = max(self.max_other_diff, diff)
            if "hidden_state" in case:
                cosine = float(torch.nn.functional.cosine_similarity(expected, got, dim=-1).min())
                self.min_cosine = cosine if self.min_cosine is None else min(self.min_cosine, cosine)

    def as_dict(self) -> dict:
        return {"kind": "agreement", "ok": self.ok, "provider": self.provider, "min_agreement": self.min_agreement,
                "agreement": self.agreement, "rows": self.rows, "max_abs_logit_diff": self.max_logit_diff,
                "max_abs_logit": self.logit_scale, "min_cosine": self.min_cosine,
                "max_abs_diff_other_outputs": self.max_other_diff, "cases": len(self.cases),
                "worst_case": self.worst}

    def worst_detail(self) -> str:
        if not self.cases:
            return "no comparisons"
        if not self.finite:
            return f"non-finite output in {self.worst}"
        if self.rows:
            return (f"argmax agreement {self.agreement:.2%} over {self.rows} rows (needs >= {self.min_agreement:.2%}), "
                    f"max |logit diff| {self.max_logit_diff:.3g} (max|torch| {self.logit_scale:.3g}, in {self.worst})")
        return f"min cosine similarity of hidden states {self.min_cosine} (needs >= {MIN_COSINE})"

    def lines(self) -> list[str]:
        status = "OK" if self.ok else "FAILED"
        return [f"Agreement, int8 graph vs PyTorch float32 ({self.provider}, {len(self.cases)} comparisons): "
                f"{self.worst_detail()} -> {status}"]


def check_agreement(model, folder: str | Path, adapters: list[str] | None = None, *, provider: str = CPU,
                    min_agreement: float = DEFAULT_MIN_AGREEMENT, metadata: dict | None = None) -> AgreementReport:
    """The parity check's inputs (several shapes, padding, decoder steps) plus, for encoders, ``AGREEMENT_BATCHES``
    wider batches, judged by prediction agreement (``AgreementReport``). ``metadata``: as in ``check_parity``."""
    report = AgreementReport(min_agreement=min_agreement, provider=provider)
    check_parity(model, folder, adapters, provider=provider, report=report, metadata=metadata)
    ort_model = load(folder, provider, metadata=metadata)
    if ort_model.task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"):
        graph = build_layout(model.base_model.model.config, ort_model.task, with_past=False)
        batch, length = AGREEMENT_ROWS
        ids = None if adapters is None else torch.zeros(batch, dtype=torch.long)
        active = model.active_adapter
        if adapters is not None:
            model.set_adapter(adapters[0])
        device = next(model.parameters()).device
        try:
            for seed in range(2, 2 + AGREEMENT_BATCHES):
                inputs = sample_inputs(model.config, graph, batch=batch, length=length,
                                       generator=torch.Generator().manual_seed(seed))
                with torch.no_grad():
                    reference = model(**{k: v.to(device) for k, v in inputs.items()})
                actual = ort_model(**inputs, adapter_ids=ids)
                for output in graph.outputs:
                    report.add(f"{output} batch={batch} len={length} seed={seed}", getattr(reference, output),
                               getattr(actual, output))
        finally:
            model.set_adapter(active)
    return report

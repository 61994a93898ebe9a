"""Fused attention for prefixed encoder layers: ONNX Runtime's ``com.microsoft.MultiHeadAttention`` contrib op.

Why: ORT's transformer optimizer fuses BERT attention only when it recognises the plain ``MatMul -> Softmax ->
MatMul`` pattern; once prefix keys/values are concatenated in front of the real ones nothing fuses and every layer
runs as a dozen small ops. So the exporter writes the fused op itself.

Mechanism (trace time, no change to ``ptv2_plugin``): a prefixed self-attention call becomes a
``torch.autograd.Function`` whose ``symbolic`` emits one ``MultiHeadAttention`` node over the layer's keys/values
with the prefix in front, and a (batch, n + seq) key padding mask built from the graph's ``attention_mask``.
Where the call is intercepted depends on how the prefix enters (see ``ptv2_plugin.attention``):

* "interface" (transformers 5): the ``AttentionInterface`` entry ``ptv2_plugin`` registered is wrapped for the
  duration of the trace; it receives query/key/value in BNSH and reads the running layer's prefix, exactly as the
  plugin would prepend it.
* "projection" (BERT family on transformers 4.5x, attention computed inline): the self-attention module's forward
  is swapped for the trace; its key/value projections still run through the plugin's hooks, so they come out
  with the prefix already in front (BSD), and only the inline score/softmax/context math is replaced.

Any call the op cannot express (causal, cross-attention, cache, sliding windows, per-row prefix visibility, ...)
goes to the plugin's own code path, so the graph stays correct, only unfused.

Why keys/values and not the op's ``past_key``/``past_value`` inputs: ORT's CPU kernel (1.32) silently ignores the
past unless the node also declares its ``present`` outputs, which graph optimizers may prune; a 4-D key/value is
the op's documented "keys already in BNSH" path and has no such trap. Why not a post-export graph rewrite: the
traced attention subgraph differs between eager/SDPA, transformers versions and mask styles; at trace time the
query/key/value/prefix are at hand as tensors.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ptv2_plugin import PTuningV2Layer
from ptv2_plugin.attention import PTUNING_V2_ATTENTION, current_prefix, prepend_prefix, uses_attention_interface
from ptv2_plugin.transformers_compat import CACHE_NAMES

logger = logging.getLogger(__name__)

DOMAIN = "com.microsoft"
FUSED_OP = "MultiHeadAttention"
PACKED_OP = "Attention"  # the same layer after packed_attention.py
FUSED_OPS = (FUSED_OP, PACKED_OP)
# Encoders whose self-attention mask is pure key padding with absolute positions, so the graph's 2-D
# ``attention_mask`` is the whole mask. (ModernBERT's local layers and DeBERTa's relative bias are not.)
FUSABLE_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
ENCODER_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
OPTIONS = (True, False, "auto")


def parse_option(value: Any) -> bool | str:
    """``True`` / ``False`` / ``"auto"`` (also from the strings "true", "false", "on", "off")."""
    if isinstance(value, bool) or value == "auto":
        return value
    text = str(value).strip().lower()
    if text in ("auto",):
        return "auto"
    if text in ("true", "on", "1", "yes"):
        return True
    if text in ("false", "off", "0", "no"):
        return False
    raise ValueError(f"fused_attention must be True, False or 'auto', got {value!r}.")


def unsupported_reason(*, task: str, model_type: str, dtype: torch.dtype) -> str | None:
    """Why the fused op cannot serve this export at all (None: it can, layer by layer)."""
    if task not in ENCODER_TASKS:
        return f"task {task} is generative; fused prefix attention covers encoder graphs only"
    if model_type not in FUSABLE_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose attention mask is pure key padding "
                f"({', '.join(FUSABLE_MODEL_TYPES)})")
    if dtype != torch.float32:
        return "ONNX Runtime's CPU MultiHeadAttention kernel is float32-only (float16 fused graphs are not validated)"
    return None


@dataclass
class FusedTrace:
    """What one traced forward needs and reports: the graph's 2-D mask in, per-call decisions out."""

    attention_mask: torch.Tensor | None = None
    fused: int = 0
    skipped: list[str] = field(default_factory=list)
    _key_padding: dict[int, torch.Tensor] = field(default_factory=dict)

    def key_padding(self, n: int) -> torch.Tensor:
        """(batch, n + seq) int32: prefix always visible, then the real padding; built once, shared by layers."""
        if n not in self._key_padding:
            mask = self.attention_mask
            ones = torch.ones(mask.shape[0], n, dtype=torch.int32, device=mask.device)
            self._key_padding[n] = torch.cat([ones, mask.to(torch.int32)], dim=1)
        return self._key_padding[n]


_TRACE: ContextVar[FusedTrace | None] = ContextVar("ptv2_fused_trace", default=None)


class PrefixMultiHeadAttention(torch.autograd.Function):
    """Eager: attention over the given keys/values, prefix included (what the tracer records values from).
    Export: one ``com.microsoft.MultiHeadAttention`` node: query BSD, key/value BSD or BNSH, 2-D key padding mask
    (batch, n + seq)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding: torch.Tensor,
                num_heads: int, scale: float) -> torch.Tensor:
        batch, length, hidden = query.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], num_heads, hidden // num_heads).transpose(1, 2)

        heads = split(query)
        if key.dim() == 3:
            key, value = split(key), split(value)
        mask = key_padding.bool()[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(heads, key, value, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(batch, length, -1)

    @staticmethod
    def symbolic(g, query, key, value, key_padding, num_heads: int, scale: float):
        none = g.op("prim::Constant")  # a None-typed constant is written as an omitted optional input ("")
        none.setType(torch._C.NoneType.get())
        out = g.op(f"{DOMAIN}::{FUSED_OP}", query, key, value, none, key_padding, num_heads_i=num_heads,
                   scale_f=scale)
        out.setType(query.type())
        return out


def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding: torch.Tensor,
                         num_heads: int, scale: float) -> torch.Tensor:
    """The fused node under either exporter: ``torch.export`` (dynamo) records ``torch.onnx.ops.symbolic`` as the
    node itself; the TorchScript tracer honours ``PrefixMultiHeadAttention.symbolic``."""
    if torch.compiler.is_exporting():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{FUSED_OP}", (query, key, value, None, key_padding),
            {"num_heads": num_heads, "scale": scale}, dtype=query.dtype, shape=query.shape, version=1,
        )
    return PrefixMultiHeadAttention.apply(query, key, value, key_padding, num_heads, scale)


def _skip_reason(module, query, key, prefix, trace: FusedTrace, kwargs: dict) -> str | None:
    if prefix.visible is not None:
        return "rows see different parts of the prefix"
    if trace.attention_mask is None:
        return "the graph has no 2-D attention_mask input"
    if query.shape[2] != key.shape[2]:
        return "cross-attention or cached keys (query and key lengths differ)"
    if query.shape[1] != key.shape[1]:
        return "grouped key/value heads"
    if getattr(module, "is_causal", False) or kwargs.get("is_causal") or getattr(module, "is_decoder", False):
        return "causal self-attention"
    for name in ("sliding_window", "softcap", "position_bias", "head_mask"):
        if kwargs.get(name) is not None:
            return f"the call passes {name}"
    if float(kwargs.get("dropout") or 0.0) > 0.0:
        return "attention dropout is active"
    return None


def _fused_or(original):
    """The plugin's registered attention function, with prefixed encoder self-attention fused while tracing."""

    def attention(module, query, key, value, attention_mask, *args: Any, **kwargs: Any):
        trace, prefix = _TRACE.get(), current_prefix()
        if trace is None or prefix is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        reason = _skip_reason(module, query, key, prefix, trace, kwargs)
        if reason is not None:
            trace.skipped.append(f"{type(module).__name__}: {reason}")
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        batch, heads, length, head_dim = query.shape
        keys, values = prepend_prefix(prefix, key, value)
        scale = kwargs.get("scaling") or head_dim**-0.5
        flat_query = query.transpose(1, 2).reshape(batch, length, heads * head_dim)
        out = multi_head_attention(flat_query, keys, values, trace.key_padding(prefix.length), int(heads),
                                   float(scale))
        trace.fused += 1
        return out.view(batch, length, heads, head_dim), None

    return attention


# ------------------------------------------------------------------------- "projection" injection (4.5x)
_INLINE_EXTRAS = ("head_mask", "encoder_hidden_states", *CACHE_NAMES, "past_key_value", "output_attentions")


def _inline_self_attention(module: torch.nn.Module) -> bool:
    """BERT-style self-attention computing attention inline: query/key/value Linears, absolute positions."""
    return (all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("query", "key", "value"))
            and isinstance(getattr(module, "num_attention_heads", None), int)
            and getattr(module, "position_embedding_type", "absolute") == "absolute"
            and not getattr(module, "is_decoder", False)
            and not uses_attention_interface(module))


def _fused_forward(module: torch.nn.Module, original):
    """``module.forward`` with the inline attention math as the fused op (projections and their hooks kept)."""

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        trace, prefix = _TRACE.get(), current_prefix()
        extras = [name for name in _INLINE_EXTRAS if kwargs.get(name) not in (None, False)]
        if trace is None or prefix is None:
            return original(hidden_states, attention_mask, *args, **kwargs)
        reason = "the call passes " + ", ".join(extras or ["positional extras"]) if extras or args else None
        if reason is None and prefix.visible is not None:
            reason = "rows see different parts of the prefix"
        if reason is None and trace.attention_mask is None:
            reason = "the graph has no 2-D attention_mask input"
        if reason is not None:
            trace.skipped.append(f"{type(module).__name__}: {reason}")
            return original(hidden_states, attention_mask, *args, **kwargs)
        query = module.query(hidden_states)
        key, value = module.key(hidden_states), module.value(hidden_states)  # the plugin's hooks prepend the prefix
        heads = int(module.num_attention_heads)
        scale = float(module.query.out_features // heads) ** -0.5  # static: a traced shape would become an input
        out = multi_head_attention(query, key, value, trace.key_padding(prefix.length), heads, scale)
        trace.fused += 1
        return out, None

    return forward


@contextmanager
def _fused_inline_modules(model: torch.nn.Module | None) -> Iterator[None]:
    modules = [] if model is None else [
        m.base_layer for m in model.modules() if isinstance(m, PTuningV2Layer) and _inline_self_attention(m.base_layer)
    ]
    try:
        for module in modules:
            module.forward = _fused_forward(module, module.forward)  # instance attribute shadows the method
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


# ------------------------------------------------------------------------------------------------ entry point
@contextmanager
def fused_prefix_attention(enabled: bool = True, model: torch.nn.Module | None = None) -> Iterator[FusedTrace | None]:
    """While tracing ``model``, route prefixed self-attention to the fused op; yields the trace record (None if
    disabled)."""
    if not enabled:
        yield None
        return
    original = ALL_ATTENTION_FUNCTIONS[PTUNING_V2_ATTENTION]
    trace = FusedTrace()
    token = _TRACE.set(trace)
    AttentionInterface.register(PTUNING_V2_ATTENTION, _fused_or(original))
    try:
        with _fused_inline_modules(model):
            yield trace
    finally:
        AttentionInterface.register(PTUNING_V2_ATTENTION, original)
        _TRACE.reset(token)


def count_fused(graph) -> int:
    """Number of fused attention nodes in an ``onnx.GraphProto``: ``MultiHeadAttention``, or ``Attention`` where
    packed_attention.py packed one onto its projection GEMM."""
    return sum(fused_ops(graph).values())


def fused_ops(graph) -> Counter:
    """Fused attention nodes of an ``onnx.GraphProto`` by qualified op name (``com.microsoft.Attention``, ...)."""
    return Counter(f"{DOMAIN}.{node.op_type}" for node in graph.node
                   if node.op_type in FUSED_OPS and node.domain == DOMAIN)

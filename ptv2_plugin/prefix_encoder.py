"""The trainable prefix: prompt embedding P and its reparameterization MLP."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import KVGeometry
from .attention import ActivePrefix

_VERSION = operator.attrgetter("_version")  # a tensor's in-place update counter


class PrefixEncoder(nn.Module):
    """Emits, for every prefixed attention layer ("slot"), n keys and n values.

    Output layout of the MLP (one row per virtual token): ``[slot_0 | slot_1 | ...]`` with each slot
    ``[keys (kv_heads x head_dim) | values (kv_heads x head_dim)]``, as in the seed implementation.

    Training computes each slot from the leaf parameters when the layer asks for it, so gradient checkpointing
    (which re-runs a layer in backward) sees the parameters themselves, never a tensor from another graph.
    Inference runs the whole MLP once and reuses its output until a parameter changes or training resumes.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        hidden_size: int,
        slots: Sequence[KVGeometry],
        *,
        prefix_projection: bool = True,
        encoder_hidden_size: int | None = None,
        prefix_dropout: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not slots:
            raise ValueError("A prefix encoder needs at least one attention layer to feed.")
        self.num_virtual_tokens = num_virtual_tokens
        self.slots = list(slots)
        self.offsets = [0]
        for geometry in self.slots:
            self.offsets.append(self.offsets[-1] + geometry.width)
        total = self.offsets[-1]
        self.prefix_projection = prefix_projection
        if prefix_projection:
            width = encoder_hidden_size or hidden_size
            self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)
            self.transform = nn.Sequential(nn.Linear(hidden_size, width), nn.Tanh(), nn.Linear(width, total))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, total)
            self.transform = None
        self.dropout = nn.Dropout(prefix_dropout)
        self.init_std = init_std
        self.reset_parameters()
        self._cache: list[ActivePrefix] | None = None
        self._cache_key: tuple | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.transform is None:
            nn.init.normal_(self.embedding.weight, std=self.init_std)
            return
        # P like a token embedding; the first layer keeps PyTorch's default fan-in scaling; the output layer starts
        # small so the initial prefix keys/values are near zero (attention is not captured before learning).
        nn.init.normal_(self.embedding.weight, std=1.0)
        nn.init.normal_(self.transform[2].weight, std=self.init_std / self.transform[2].in_features**0.5)
        nn.init.zeros_(self.transform[2].bias)

    @torch.no_grad()
    def zero_output(self) -> None:
        """Start with all-zero keys and values: every prefix key scores 0 and adds nothing to the output but a share
        of the attention. With the MLP its output layer is zeroed (as LoRA's B), so the MLP's first layer and P
        start learning once the output layer has moved."""
        if self.transform is None:
            nn.init.zeros_(self.embedding.weight)
            return
        nn.init.zeros_(self.transform[2].weight)
        nn.init.zeros_(self.transform[2].bias)

    @torch.no_grad()
    def set_key_values(self, key_values: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Make the encoder emit exactly ``key_values`` (one (kv_heads, n, head_dim) pair per slot).

        Without the MLP the free prefix is set directly. With it, P and the first layer keep their random init and
        the output layer is solved for: bias = the tokens' mean key/value, weight = the minimum-norm least-squares
        fit of each token's deviation from the mean on the MLP's hidden rows (float64). That fit is exact while
        n <= the MLP width (the n hidden rows are then linearly independent) and leaves a small output weight
        (~|deviation| / (width * E[tanh^2])), so the MLP still trains at its usual rate. A bias alone cannot do it:
        it is shared by all n virtual tokens.
        """
        if len(key_values) != len(self.slots):
            raise ValueError(f"Got keys/values for {len(key_values)} layers, the prefix feeds {len(self.slots)}.")
        n = self.num_virtual_tokens
        rows = []
        for (key, value), geometry in zip(key_values, self.slots):
            expected = (geometry.num_kv_heads, n, geometry.head_dim)
            if tuple(key.shape) != expected or tuple(value.shape) != expected:
                raise ValueError(f"Prefix keys/values must be {expected} per layer, got {tuple(key.shape)}.")
            rows += [key.transpose(0, 1).reshape(n, -1), value.transpose(0, 1).reshape(n, -1)]
        target = torch.cat(rows, dim=1).to(self.embedding.weight.device, torch.float64)  # the layout _split reads
        if self.transform is None:
            self.embedding.weight.copy_(target)
            return
        hidden = self.transform[1](self.transform[0](self.embedding.weight)).to(torch.float64)
        bias = target.mean(dim=0)
        weight = torch.linalg.pinv(hidden) @ (target - bias)  # (width, total)
        self.transform[2].weight.copy_(weight.T)
        self.transform[2].bias.copy_(bias)

    # ----------------------------------------------------------------------------------------------- computation
    def forward(self) -> torch.Tensor:
        """All slots at once, shape (n, total width): one run of the MLP."""
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def _slot_rows(self, slot: int) -> torch.Tensor:
        start, end = self.offsets[slot], self.offsets[slot + 1]
        if self.transform is None:
            return self.embedding.weight[:, start:end]
        hidden = self.transform[1](self.transform[0](self.embedding.weight))
        out = self.transform[2]
        return F.linear(hidden, out.weight[start:end], out.bias[start:end])

    def _weights(self) -> tuple[torch.Tensor, ...]:
        """The parameters, read straight from their modules (cheaper than ``parameters()``, and never stale)."""
        if self.transform is None:
            return (self.embedding.weight,)
        first, last = self.transform[0], self.transform[2]
        return (self.embedding.weight, first.weight, first.bias, last.weight, last.bias)

    def _uses_cache(self) -> bool:
        if self.training:
            return False
        return not torch.is_grad_enabled() or not any(p.requires_grad for p in self._weights())

    def _state_key(self) -> tuple:
        # A new dtype or device means new storage, so the data pointer covers them; in-place updates bump _version.
        weights = self._weights()
        return (*map(torch.Tensor.data_ptr, weights), *map(_VERSION, weights))

    def _split(self, rows: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, slot width) -> keys and values, each (kv_heads, n, head_dim)."""
        geometry = self.slots[slot]
        kv = rows.reshape(self.num_virtual_tokens, 2, geometry.num_kv_heads, geometry.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def _serving_prefixes(self) -> list[ActivePrefix]:
        """Every slot's prefix from one MLP run, contiguous, cached while the weights stay the same."""
        if self._cache is not None and torch.compiler.is_dynamo_compiling():
            return self._cache  # refreshed before every compiled forward, outside the graph (refresh_serving_caches)
        key = self._state_key()
        if self._cache is None or self._cache_key != key:
            self._cache = [
                ActivePrefix(k.contiguous().unsqueeze(0), v.contiguous().unsqueeze(0)) for k, v in self.all_key_values()
            ]
            self._cache_key = key
        return self._cache

    def slot_prefix(self, slot: int) -> ActivePrefix:
        """One layer's prefix as attention takes it, (1, kv_heads, n, head_dim); while serving, the same object
        every call (this runs in every layer of every forward)."""
        if self._uses_cache():
            return self._serving_prefixes()[slot]
        key, value = self._split(self.dropout(self._slot_rows(slot)), slot)
        return ActivePrefix(key.unsqueeze(0), value.unsqueeze(0))

    def slot_key_value(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values of one layer, each (kv_heads, n, head_dim)."""
        prefix = self.slot_prefix(slot)
        return prefix.key[0], prefix.value[0]

    def all_key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's prefix from one MLP run (what the ONNX exporter freezes), without autograd history."""
        with torch.no_grad():
            rows = self.forward().detach()
        return [self._split(rows[:, self.offsets[s] : self.offsets[s + 1]], s) for s in range(len(self.slots))]

    def train(self, mode: bool = True) -> PrefixEncoder:
        self._cache = None
        self._cache_key = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._cache = None
        self._cache_key = None
        return super()._apply(fn, recurse)


@torch.compiler.disable
def refresh_serving_caches(encoders: nn.ModuleDict, active: Sequence[str]) -> None:
    """Bring the active encoders' serving caches up to date, run eagerly: the check reads data pointers and version
    counters, which dynamo cannot trace, so a compiled forward calls this once, outside its graph, instead of
    checking in every layer."""
    for name in active:
        encoder = encoders[name] if name in encoders else None
        if encoder is not None and encoder._uses_cache():
            encoder._serving_prefixes()

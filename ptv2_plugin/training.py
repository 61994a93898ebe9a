"""The training recipe: the prefix and the task head want different learning rates.

Measured on frozen all-MiniLM-L6-v2 / SST-2 (benchmarks/defaults_study.py): with the projection MLP, a prefix
learning rate of 1e-2 (PEFT prefix tuning's usual one) blows the prefix keys up within tens of steps and the model
predicts one class; 1e-3 trains stably. The freshly initialised classifier head, however, learns faster at 1e-2.
One AdamW with two parameter groups gives both; pass it to the Trainer as ``optimizers=(optimizer, None)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import RECOMMENDED_LEARNING_RATE, RECOMMENDED_LEARNING_RATE_NO_PROJECTION

RECOMMENDED_HEAD_LEARNING_RATE = 1e-2


def recommended_learning_rate(config) -> float:
    """The prefix rate for an adapter: the MLP amplifies each step (~150x per coordinate on MiniLM), free
    keys/values do not, so they want a higher rate."""
    return RECOMMENDED_LEARNING_RATE if config.prefix_projection else RECOMMENDED_LEARNING_RATE_NO_PROJECTION


def optimizer_param_groups(
    model: nn.Module,
    learning_rate: float | None = None,
    head_learning_rate: float = RECOMMENDED_HEAD_LEARNING_RATE,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Trainable parameters in groups: each adapter's prefix encoder at ``learning_rate`` (default: the recommended
    rate for its ``prefix_projection``), everything else that trains (the task head, PEFT's ``modules_to_save``)
    at ``head_learning_rate``."""
    tuner = model.base_model if hasattr(model, "base_model") else model
    encoders = getattr(tuner, "ptv2_prefix_encoder", {})
    groups, prefix_ids = [], set()
    for name, encoder in encoders.items():
        params = [p for p in encoder.parameters() if p.requires_grad]
        if params:
            rate = learning_rate if learning_rate is not None else recommended_learning_rate(tuner.peft_config[name])
            groups.append({"params": params, "lr": rate, "weight_decay": weight_decay})
            prefix_ids.update(id(p) for p in params)
    if not groups:
        raise ValueError("No trainable P-Tuning v2 prefix parameters: is an adapter active and not in inference mode?")
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in prefix_ids]
    if head:
        groups.append({"params": head, "lr": head_learning_rate, "weight_decay": weight_decay})
    return groups


def create_optimizer(
    model: nn.Module,
    learning_rate: float | None = None,
    head_learning_rate: float = RECOMMENDED_HEAD_LEARNING_RATE,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW over ``optimizer_param_groups``; the Trainer's scheduler scales each group from its own rate."""
    groups = optimizer_param_groups(model, learning_rate, head_learning_rate, weight_decay)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=weight_decay)

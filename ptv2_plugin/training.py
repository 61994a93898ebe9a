"""The training recipe: the prefix and the task head want different learning rates.

Measured on frozen all-MiniLM-L6-v2 / SST-2 (benchmarks/defaults_study.py): with the projection MLP, a prefix
learning rate of 1e-2 (PEFT prefix tuning's usual one) blows the prefix keys up within tens of steps and the model
predicts one class; 1e-3 trains stably. The freshly initialised classifier head, however, learns faster at 1e-2.
One AdamW with two parameter groups gives both; pass it to the Trainer as ``optimizers=(optimizer, None)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import RECOMMENDED_LEARNING_RATE

RECOMMENDED_HEAD_LEARNING_RATE = 1e-2


def optimizer_param_groups(
    model: nn.Module,
    learning_rate: float = RECOMMENDED_LEARNING_RATE,
    head_learning_rate: float = RECOMMENDED_HEAD_LEARNING_RATE,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Trainable parameters in two groups: the prefix encoders at ``learning_rate``, everything else that trains
    (the task head, PEFT's ``modules_to_save``) at ``head_learning_rate``."""
    prefix, head = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (prefix if ".ptv2_prefix_encoder." in f".{name}" else head).append(parameter)
    if not prefix:
        raise ValueError("No trainable P-Tuning v2 prefix parameters: is an adapter active and not in inference mode?")
    groups = [{"params": prefix, "lr": learning_rate, "weight_decay": weight_decay}]
    if head:
        groups.append({"params": head, "lr": head_learning_rate, "weight_decay": weight_decay})
    return groups


def create_optimizer(
    model: nn.Module,
    learning_rate: float = RECOMMENDED_LEARNING_RATE,
    head_learning_rate: float = RECOMMENDED_HEAD_LEARNING_RATE,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW over ``optimizer_param_groups``; the Trainer's scheduler scales each group from its own rate."""
    groups = optimizer_param_groups(model, learning_rate, head_learning_rate, weight_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)

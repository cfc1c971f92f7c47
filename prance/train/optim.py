"""DeiT-style optimisation: AdamW without weight decay on norms, biases and embeddings
(timm's ``param_groups_weight_decay``), linear warm-up then cosine decay, per step.

The schedule stays a closed form here rather than timm's ``CosineLRScheduler``: timm's
warm-up starts from ``warmup_lr_init`` and its step count includes the warm-up unless
``warmup_prefix``, so it would not reproduce the learning rates the shipped checkpoint was
trained with, and a resumed run needs only ``lr_at(step)``, no scheduler state."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token")


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over timm's weight-decay groups (no decay on 1-D parameters, biases and the
    named embeddings), the decaying group first, as checkpoints written before store it."""
    names = [n for n, _ in model.named_parameters() if n.split(".")[-1] in NO_DECAY_NAMES]
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=names)
    groups.sort(key=lambda g: -g["weight_decay"])
    return torch.optim.AdamW(groups, lr=lr)


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning rate at ``step`` (0-based) of ``total``: linear warm-up over ``warmup``
    steps, then cosine from ``lr`` to ``min_lr``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

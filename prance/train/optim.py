"""DeiT-style optimisation: AdamW without weight decay on norms, biases and embeddings
(timm's convention), linear warm-up then cosine decay, per step."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token")


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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

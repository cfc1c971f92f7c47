"""One weight-sharing training step by the sandwich rule with in-place distillation
(Yu & Huang, "Universally Slimmable Networks", 2019; BigNAS; AutoFormer's super-net).

Each step trains, on the same batch, the largest sub-network (on the labels), the
smallest and ``k`` random ones (on the largest's soft predictions, detached). Gradients
of all sub-networks accumulate in the shared weights before one optimizer step.
Optionally every sub-network but the largest also runs under a randomly drawn token
strategy, so the shared weights learn to work with fewer tokens.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

from prance.models.arch import ArchSpec
from prance.models.subnet import SubNet, SubnetSpace
from prance.tokens.state import TokenPlan
from prance.tokens.strategies import REGISTRY, StrategyConfig, build_plan, default_param, r_range


def soft_cross_entropy(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL-equivalent distillation loss: cross-entropy to the teacher's softened
    distribution, scaled by T^2 (Hinton et al.)."""
    t = temperature
    target = F.softmax(teacher.float() / t, dim=-1)
    return -(target * F.log_softmax(student.float() / t, dim=-1)).sum(dim=-1).mean() * (t * t)


def sample_plan(arch: ArchSpec, strategies: list[str], keep_min: float, gen: torch.Generator) -> TokenPlan | None:
    """A random token plan from ``strategies`` (None: dense), its strength drawn uniformly:
    keep in [keep_min, 1] for prune/prune_merge, r up to twice the default for merge/ppt."""
    if not strategies:
        return None
    name = strategies[int(torch.randint(len(strategies), (1,), generator=gen))]
    u = float(torch.rand(1, generator=gen))
    if REGISTRY[name].sandwich_keep:
        value: float | int = keep_min + (1 - keep_min) * u
    else:
        value = min(1 + int(u * 2 * default_param(name, arch)), r_range(name, arch)[1])
    return build_plan(StrategyConfig(name).with_param(value), arch)


def sandwich(space: SubnetSpace, random_subnets: int, gen: torch.Generator) -> list[SubNet]:
    """[largest, smallest, random...]: the largest first, it teaches the others."""
    return [space.largest(), space.smallest()] + [space.sample(gen) for _ in range(random_subnets)]


def sandwich_step(
    model: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    subnets: list[SubNet],
    plans: list[TokenPlan | None],
    label_smoothing: float = 0.1,
    distill: bool = True,
    temperature: float = 1.0,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Callable[[], ContextManager] = nullcontext,
    no_sync: Callable[[], ContextManager] = nullcontext,
) -> list[float]:
    """Forward and backward every sub-network; returns their losses. Gradients are left
    in ``.grad`` (accumulated), for the caller to clip and step. ``no_sync`` is DDP's,
    so gradients are all-reduced once, with the last backward."""
    losses = []
    teacher = None
    last = len(subnets) - 1
    for i, (sub, plan) in enumerate(zip(subnets, plans)):
        with no_sync() if i < last else nullcontext():
            with autocast():
                logits = model(x, sub, plan)
            if teacher is None:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
                teacher = logits.detach()
            elif distill:
                loss = soft_cross_entropy(logits, teacher, temperature)
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(float(loss.detach()))
    return losses

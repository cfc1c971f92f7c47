"""A two-configuration confidence cascade of a meta-network: per-image adaptivity without
training, the baseline to beat for a selector that spends more on hard images.

Every image first runs a *cheap* static configuration (:mod:`prance.static_search`);
when the cheap configuration's top softmax probability is below a threshold, the image
also runs an *expensive* one, whose answer is taken. An image costs the cheap
configuration's GFLOPs, plus the expensive one's when it escalates, so a cascade meets
its budget on average over images (a *mean* budget), not on every image. This is the
big/little scheme of Park et al. (2015, "Big/little deep neural network for ultra low
power inference") with the top-1 softmax score as the confidence, on the configurations
of one weight-sharing meta-network.

:func:`search` picks the cascade for a budget on validation images: a ladder of static
configurations (the best static configuration at several multiples of the budget), every
rung's logits on the validation images, then every (cheap, expensive) pair and threshold
(:func:`choose`, exhaustive and cheap once the logits exist) by Top-1 with the mean GFLOPs
within the budget. Never escalating is one of the choices, so on validation the cascade is
never below the best static configuration at the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from prance import flops, static_search
from prance.device import of as device_of, synchronize
from prance.errors import PranceError
from prance.models.meta import MetaViT
from prance.static_search import StaticConfig
from prance.tokens.strategies import STRATEGIES

RUNGS = (0.5, 0.65, 0.8, 1.0, 1.6, 2.5, 4.0)  # ladder budgets as multiples of the cascade's budget
THRESHOLDS = tuple(round(0.3 + 0.01 * i, 2) for i in range(71))  # top-1 softmax probability, 0.30 .. 1.00


@dataclass(frozen=True)
class Cascade:
    cheap: StaticConfig
    expensive: StaticConfig
    threshold: float  # escalate an image when the cheap configuration's top-1 probability is below this

    def gflops(self, escalated: float) -> float:
        """Mean GFLOPs per image when a share ``escalated`` of the images escalates."""
        return self.cheap.gflops + escalated * self.expensive.gflops

    def describe(self) -> str:
        if self.threshold <= 0 or self.expensive is self.cheap:
            return f"{self.cheap.describe()} (never escalates)"
        return f"{self.cheap.describe()} -> {self.expensive.describe()} below p={self.threshold:.2f}"

    def to_dict(self) -> dict:
        return {"cheap": self.cheap.to_dict(), "expensive": self.expensive.to_dict(), "threshold": self.threshold,
                "description": self.describe()}


def escalates(cheap_logits: Tensor, threshold: float) -> Tensor:
    """Which images go on to the expensive configuration: top-1 probability < ``threshold``."""
    return cheap_logits.float().softmax(-1).amax(-1) < threshold


@torch.inference_mode()
def logits_of(meta: MetaViT, config: StaticConfig, x: Tensor, batch_size: int = 256) -> Tensor:
    """``config``'s logits on the images ``x`` (float32, on the CPU)."""
    meta.eval()
    dev = device_of(meta)
    return torch.cat([meta(x[i : i + batch_size].to(dev), config.subnet, config.plan).float().cpu()
                      for i in range(0, x.shape[0], batch_size)])


@torch.inference_mode()
def run(meta: MetaViT, cascade: Cascade, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(logits, escalated mask) of the cascade on the images ``x``: the expensive
    configuration runs only on the images that escalate."""
    logits = logits_of(meta, cascade.cheap, x, batch_size)
    up = escalates(logits, cascade.threshold)
    if bool(up.any()):
        logits[up] = logits_of(meta, cascade.expensive, x[up], batch_size)
    return logits, up


def evaluate(meta: MetaViT, cascade: Cascade, x: Tensor, y: Tensor, batch_size: int = 256) -> dict:
    """Top-1 (%), mean GFLOPs per image, the share that escalated and images/s of the
    cascade run batch by batch (each batch's escalating images as a second, smaller batch)."""
    dev = device_of(meta)
    correct = escalated = 0
    seconds = 0.0
    for i in range(0, x.shape[0], batch_size):
        synchronize(dev)
        t0 = time.perf_counter()
        logits, up = run(meta, cascade, x[i : i + batch_size], batch_size)
        synchronize(dev)
        seconds += time.perf_counter() - t0
        correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
        escalated += int(up.sum())
    n = x.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate")
    return {"top1": 100.0 * correct / n, "gflops": cascade.gflops(escalated / n), "escalated": escalated / n,
            "throughput_img_s": n / seconds, "n_images": n}


@dataclass(frozen=True)
class Choice:
    cheap: int  # ladder indices
    expensive: int
    threshold: float
    top1: float  # %
    gflops: float  # mean per image
    escalated: float  # share of the images


def choose(logits: Tensor, y: Tensor, costs: Sequence[float], budget_gflops: float,
           thresholds: Iterable[float] = THRESHOLDS) -> Choice | None:
    """The best (cheap, expensive, threshold) over a ladder, by Top-1 on ``y`` with the
    mean GFLOPs <= ``budget_gflops``; ties go to the cheaper mean. ``logits`` is (images,
    rungs, classes), ``costs`` each rung's GFLOPs. A rung alone (never escalating) is a
    choice too (``expensive == cheap``, threshold 0). ``None`` when no rung fits."""
    n, k, _ = logits.shape
    if len(costs) != k:
        raise ValueError(f"{k} rungs of logits but {len(costs)} costs")
    right = logits.argmax(-1) == y[:, None]  # (n, k)
    conf = logits.float().softmax(-1).amax(-1)  # (n, k)
    best: Choice | None = None

    def consider(c: Choice) -> None:
        nonlocal best
        if c.gflops <= budget_gflops * (1 + 1e-9) and (best is None or (c.top1, -c.gflops) > (best.top1, -best.gflops)):
            best = c

    ts = sorted(set(float(t) for t in thresholds))
    for i in range(k):
        consider(Choice(i, i, 0.0, 100.0 * float(right[:, i].float().mean()), float(costs[i]), 0.0))
        for j in range(k):
            if costs[j] <= costs[i]:
                continue
            for t in ts:
                up = conf[:, i] < t
                share = float(up.float().mean())
                top1 = 100.0 * float(torch.where(up, right[:, j], right[:, i]).float().mean())
                consider(Choice(i, j, t, top1, float(costs[i]) + share * float(costs[j]), share))
    return best


def ladder(meta: MetaViT, budget_gflops: float, val: tuple[Tensor, Tensor], rungs: Iterable[float] = RUNGS,
           strategies: Iterable[str] = STRATEGIES, first_images: int = 64, eta: int = 3, batch_size: int = 256,
           progress: Callable[[str], None] | None = None) -> list[StaticConfig]:
    """The best static configuration at each ``rung x budget_gflops`` (capped at the full
    sub-network's GFLOPs; rungs below the cheapest configuration skipped), duplicates
    dropped, cheapest first."""
    dense = flops.gflops(meta.arch)
    strategies = list(strategies)
    out: dict[str, StaticConfig] = {}
    for rung in sorted(set(float(r) for r in rungs)):
        if rung <= 0:
            raise PranceError(f"cascade rungs are positive multiples of the budget, got {rung:g}")
        target = min(rung * budget_gflops, dense)
        try:
            found = static_search.search(meta, target, val, strategies, first_images=first_images, eta=eta,
                                         batch_size=batch_size)
        except PranceError:  # nothing fits this rung
            continue
        out.setdefault(found.best.describe(), found.best)
        if progress is not None:
            progress(f"cascade ladder: {rung:g} x budget -> {found.best.describe()} ({found.top1:.2f}%)")
    return sorted(out.values(), key=lambda c: c.gflops)


@dataclass
class CascadeResult:
    best: Cascade
    top1: float  # on every validation image
    gflops: float  # mean per validation image
    escalated: float  # share of the validation images
    static: StaticConfig  # the best single rung within the budget (never escalating)
    static_top1: float
    ladder: list[StaticConfig] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"best": self.best.to_dict(), "val_top1": self.top1, "val_gflops": self.gflops,
                "val_escalated": self.escalated, "static": self.static.to_dict(), "static_val_top1": self.static_top1,
                "ladder": [c.describe() for c in self.ladder]}


def search(meta: MetaViT, budget_gflops: float, val: tuple[Tensor, Tensor], strategies: Iterable[str] = STRATEGIES,
           rungs: Iterable[float] = RUNGS, thresholds: Iterable[float] = THRESHOLDS, first_images: int = 64, eta: int = 3,
           batch_size: int = 256, progress: Callable[[str], None] | None = None) -> CascadeResult:
    """The best cascade at ``budget_gflops`` (mean GFLOPs per image) by Top-1 on ``val``."""
    x, y = val
    strategies, rungs = list(strategies), list(rungs)  # both used twice below
    if 1.0 not in rungs:
        rungs.append(1.0)  # the best static configuration at the budget is always a rung
    configs = ladder(meta, budget_gflops, val, rungs, strategies, first_images, eta, batch_size, progress)
    if not configs:
        raise PranceError(f"no static configuration of strategies {', '.join(strategies)} fits "
                          f"{budget_gflops:.4g} GFLOPs on this meta-network: no cascade either")
    logits = torch.stack([logits_of(meta, c, x, batch_size) for c in configs], dim=1)
    costs = [c.gflops for c in configs]
    best = choose(logits, y, costs, budget_gflops, thresholds)
    alone = choose(logits, y, costs, budget_gflops, thresholds=())
    if best is None or alone is None:
        raise PranceError(f"no rung of the cascade ladder fits {budget_gflops:.4g} GFLOPs")
    cascade = Cascade(configs[best.cheap], configs[best.expensive], best.threshold)
    return CascadeResult(cascade, best.top1, best.gflops, best.escalated, configs[alone.cheap], alone.top1, configs)

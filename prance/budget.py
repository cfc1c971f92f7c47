"""Compute budgets: one :class:`Budget` value (parsed once, where the user wrote it) and
calibrating a training-free strategy to one.

A budget has a *kind*: ``mean`` is met when the average GFLOPs per image over the images
evaluated is within it (how adaptive papers -- A-ViT, DynamicViT, DVT, CF-ViT -- report
their cost), ``cap`` when every image is within it. A static configuration costs the same
on every image, so it meets both.

Calibration finds the strategy's parameter (r or keep) whose GFLOPs meet the budget most
closely without exceeding it, by walking every distinct value with the analytic counter
(each evaluation is arithmetic on a few dozen integers, so exhaustive search is exact
and instant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from prance import flops
from prance.errors import PranceError
from prance.models.arch import ArchSpec
from prance.models.subnet import SubNet
from prance.tokens.state import TokenPlan
from prance.tokens.strategies import PARAM_OF, StrategyConfig, build_plan, check_strategy, r_range


def parse_budget(text: str | float, dense_gflops: float) -> float:
    """GFLOPs from ``"2.3"`` (GFLOPs) or ``"50%"`` (of the dense model). One rule for every
    command: a budget above the dense model's GFLOPs is refused (nothing to compress)."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 * dense_gflops if s.endswith("%") else float(s)
    except ValueError:
        raise PranceError(f"budget {text!r} is neither GFLOPs (e.g. 2.3) nor a percentage of dense (e.g. 50%)") from None
    if not (value > 0 and math.isfinite(value)):
        raise PranceError(f"budget must be a positive finite number, got {text!r}")
    if value > dense_gflops * (1 + 1e-9):
        raise PranceError(f"budget {str(text).strip()} ({value:.4g} GFLOPs) is above the dense model's {dense_gflops:.4g} GFLOPs: "
                          "nothing to compress (give at most 100% or the dense GFLOPs)")
    return value


BudgetKind = Literal["mean", "cap"]
BUDGET_KINDS: tuple[str, ...] = ("mean", "cap")
TOLERANCE = 1e-9  # relative: a configuration calibrated exactly to a budget is within it


def within(gflops: float, budget_gflops: float) -> bool:
    """``gflops`` is within ``budget_gflops`` (up to rounding)."""
    return gflops <= budget_gflops * (1 + TOLERANCE)


@dataclass(frozen=True)
class Budget:
    """A compute budget, parsed once at the entry point and passed on as this value."""

    gflops: float
    dense_gflops: float  # the full (sub-)network's GFLOPs: what "50%" is a share of
    kind: BudgetKind = "mean"
    text: str = ""  # as the user wrote it ("20%", "0.015")

    @classmethod
    def parse(cls, text: str | float, dense_gflops: float, kind: str = "mean") -> "Budget":
        if kind not in BUDGET_KINDS:
            raise PranceError(f"budget kind {kind!r}: choose from {', '.join(BUDGET_KINDS)}")
        return cls(parse_budget(text, dense_gflops), dense_gflops, kind, str(text).strip())  # type: ignore[arg-type]

    @classmethod
    def of(cls, text: str | float, arch: ArchSpec, kind: str = "mean") -> "Budget":
        """``text`` on a model of architecture ``arch`` (the dense reference: its full GFLOPs)."""
        return cls.parse(text, flops.gflops(arch), kind)

    @property
    def share(self) -> float:
        return self.gflops / self.dense_gflops

    def with_gflops(self, gflops: float) -> "Budget":
        return Budget(gflops, self.dense_gflops, self.kind, f"{gflops:.6g}")

    def met_by(self, mean_gflops: float, max_gflops: float) -> bool:
        """Whether a result whose per-image GFLOPs average ``mean_gflops`` and peak at
        ``max_gflops`` meets this budget."""
        return within(max_gflops if self.kind == "cap" else mean_gflops, self.gflops)

    def __str__(self) -> str:
        return f"{self.text or f'{self.gflops:.4g}'} ({self.gflops:.4g} GFLOPs, {self.kind})"


def spread(per_image_gflops: Sequence[float]) -> dict[str, float]:
    """The per-image GFLOPs of a result as its mean (``gflops``), 95th percentile and max."""
    import torch

    g = torch.as_tensor(list(per_image_gflops), dtype=torch.float64)
    if g.numel() == 0:
        raise PranceError("no images: no GFLOPs spread")
    return {"gflops": float(g.mean()), "gflops_p95": float(torch.quantile(g, 0.95)), "gflops_max": float(g.max())}


def meets(mean_gflops: float, max_gflops: float, budget_gflops: float) -> str:
    """Which budget kinds a result meets: ``cap`` (every image within; it meets ``mean``
    then too), ``mean`` (only the average), or ``none``."""
    if within(max_gflops, budget_gflops):
        return "cap"
    return "mean" if within(mean_gflops, budget_gflops) else "none"


def candidates(cfg: StrategyConfig, arch: ArchSpec) -> list[float | int]:
    """Every distinct parameter value of the strategy, least compression first."""
    param = PARAM_OF[check_strategy(cfg.name)]
    if param == "r":
        lo, hi = r_range(cfg.name, arch)
        return list(range(lo, hi + 1))
    if param == "keep":
        n = arch.num_patches
        return [k / n for k in range(n, 0, -1)]
    return []


def lowest_gflops(arch: ArchSpec, token_strategy: str, subnet: SubNet | None = None) -> float:
    """The least GFLOPs of ``token_strategy`` over all its parameter values (on ``subnet``)."""
    cfg = StrategyConfig(token_strategy)
    options = candidates(cfg, arch) or [None]
    return min(flops.gflops(arch, subnet, build_plan(cfg if v is None else cfg.with_param(v), arch)) for v in options)


@dataclass(frozen=True)
class Calibrated:
    config: StrategyConfig
    plan: TokenPlan
    report: flops.FlopsReport


def calibrate(cfg: StrategyConfig, arch: ArchSpec, budget_gflops: float, subnet: SubNet | None = None) -> Calibrated:
    """``cfg`` with its parameter set so that GFLOPs <= budget, as close as possible."""
    best: Calibrated | None = None
    lowest = None
    options = candidates(cfg, arch) or [None]
    for value in options:
        c = cfg if value is None else cfg.with_param(value)
        plan = build_plan(c, arch)
        report = flops.count(arch, subnet, plan)
        lowest = report.gflops if lowest is None else min(lowest, report.gflops)
        if report.gflops <= budget_gflops and (best is None or report.gflops > best.report.gflops):
            best = Calibrated(c, plan, report)
    if best is None:
        raise PranceError(
            f"budget {budget_gflops:.4g} GFLOPs is below the smallest reachable with strategy "
            f"{cfg.name!r} on this model ({lowest:.4g} GFLOPs)"
        )
    return best

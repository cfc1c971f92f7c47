"""Compute budgets: parsing them and calibrating a training-free strategy to one.

Calibration finds the strategy's parameter (r or keep) whose GFLOPs meet the budget most
closely without exceeding it, by walking every distinct value with the analytic counter
(each evaluation is arithmetic on a few dozen integers, so exhaustive search is exact
and instant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

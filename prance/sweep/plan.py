"""Everything a sweep checks before its first trial, and the trials it will run.

A budget is GFLOPs (``"0.04"``) or a share of the dense model (``"50%"``, of the full
meta-network). Reachability is decided with the analytic FLOPs counter, without running
anything: a training-free strategy reaches a budget when some value of its parameter
(r or keep) on the full network fits; a static one when some value fits on the smallest
sub-network; a selector strategy when its cheapest schedule (smallest sub-network,
strongest token reduction) fits. A budget above the dense model,
or below what every strategy of the sweep can reach, is an input error; a budget that only
some strategies reach leaves the others' rows marked unreachable.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prance import flops
from prance.budget import calibrate, candidates, parse_budget
from prance.sweep.config import SWEEP_STRATEGIES, SweepConfig
from prance.errors import PranceError
from prance.models.arch import ArchSpec
from prance.models.subnet import SubNet
from prance.tokens.strategies import StrategyConfig, build_plan

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DENSE = "dense"


@dataclass(frozen=True)
class BudgetStrategy:
    """One sweep strategy at one budget. ``SweepPlan.combos`` holds one per budget x
    strategy cell, reachable or not; ``SweepPlan.schedule`` holds one per *trial* (the dense
    trial first, a selector cell once per ``trials_per_combo``), so the same cell may stand
    there several times."""

    method: str  # dense | training_free | static | selector
    strategy: str  # the sweep's name: dense, free_prune, prune, ...
    token_strategy: str  # none, prune, merge, prune_merge, ppt
    budget: str  # as the user wrote it ("50%", "0.04"); "100%" for dense
    budget_gflops: float
    reachable: bool = True
    note: str = ""  # why not reachable
    param: str = ""  # the calibrated r / keep of a training-free strategy

    @property
    def label(self) -> str:
        return f"{self.strategy}@{self.budget}"

    def as_config(self) -> dict:
        """The constant part of a trial's config."""
        return {k: v for k, v in asdict(self).items() if k not in ("reachable", "note")}


@dataclass
class SweepPlan:
    checkpoint: str  # absolute, or timm:NAME
    dataset: str  # absolute path for image folders
    model: str
    dense_gflops: float
    budgets: dict[str, float]  # as written -> GFLOPs
    combos: list[BudgetStrategy]  # every budget x strategy, reachable or not (not dense)
    schedule: list[BudgetStrategy] = field(default_factory=list)  # trial number -> combo

    @property
    def unreachable(self) -> list[BudgetStrategy]:
        return [c for c in self.combos if not c.reachable]

    def counts(self) -> dict[str, int]:
        out = {"dense": 0, "training_free": 0, "static": 0, "selector": 0}
        for c in self.schedule:
            out[c.method] += 1
        return out


def resolve_path(path: str) -> Path:
    """A user path: as given when absolute or present from the working directory, else
    relative to the repository (so the shipped checkpoint is found from anywhere)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    alt = REPO_ROOT / p
    return alt.resolve() if alt.exists() else p.resolve()


def resolve_dataset(name: str) -> str:
    key = name.strip()
    if key.lower().startswith("imagefolder:"):
        return "imagefolder:" + str(resolve_path(key[len("imagefolder:"):].strip()))
    return key


def lowest_gflops(arch: ArchSpec, token_strategy: str, subnet: SubNet | None = None) -> float:
    """The least GFLOPs of ``token_strategy`` over all its parameter values."""
    cfg = StrategyConfig(token_strategy)
    options = candidates(cfg, arch) or [None]
    return min(flops.gflops(arch, subnet, build_plan(cfg if v is None else cfg.with_param(v), arch)) for v in options)


def _selector_lowest(model, token_strategy: str, cfg: SweepConfig) -> float:
    """The cheapest schedule of the PPO selector, from its own cost table."""
    from prance.selector.selector import Selector

    s = cfg.selector
    return Selector.for_config(model, s.model_copy(update={"strategy": token_strategy})).min_gflops()


def plan_sweep(cfg: SweepConfig) -> SweepPlan:
    """Check the inputs (PranceError with one line on the first problem) and lay out the
    trials: the dense reference, every reachable training-free and static combo once, then
    the selector combos round-robin, ``trials_per_combo`` times."""
    from prance.checkpoint import is_timm_source, load_checkpoint
    from prance.data import build_dataset, input_spec_for_model

    if is_timm_source(cfg.checkpoint):  # timm:NAME, timm's pretrained weights: no file to find
        checkpoint = cfg.checkpoint.strip()
    else:
        checkpoint = resolve_path(cfg.checkpoint)
        if not checkpoint.is_file():
            raise PranceError(f"checkpoint {cfg.checkpoint} not found (looked in {Path.cwd()} and {REPO_ROOT})")
    model, header = load_checkpoint(checkpoint)
    dataset = resolve_dataset(cfg.dataset)
    build_dataset(dataset, "test", input_spec_for_model(model.vit))  # missing / unknown dataset -> PranceError
    # the selector's own data split (too few images for val_limit / train_limit -> PranceError)
    from prance.selector.run import load_data

    load_data(model, cfg.selector.model_copy(update={"dataset": dataset, "checkpoint": str(checkpoint)}))

    dense = flops.gflops(model.arch)
    budgets: dict[str, float] = {}
    for text in cfg.budgets:
        g = parse_budget(text, dense)
        if g > dense * (1 + 1e-9):
            raise PranceError(f"budget {text} ({g:.4g} GFLOPs) is above the dense model's {dense:.4g} GFLOPs: nothing to compress")
        budgets[text.strip()] = g
    if len(set(round(g, 12) for g in budgets.values())) != len(budgets):
        raise PranceError(f"two budgets of {list(budgets)} are the same GFLOPs")

    lowest: dict[str, float] = {}
    for name in cfg.strategies:
        method, token = SWEEP_STRATEGIES[name]
        if method == "selector":
            lowest[name] = _selector_lowest(model, token, cfg)
        elif method == "static":  # the narrowest sub-network with the strategy's strongest setting
            lowest[name] = lowest_gflops(model.arch, token, model.space.smallest())
        else:
            lowest[name] = lowest_gflops(model.arch, token)
    floor = min(lowest.values())
    for text, g in budgets.items():
        if g < floor:
            best = min(lowest, key=lowest.get)
            raise PranceError(
                f"budget {text} ({g:.4g} GFLOPs, {100 * g / dense:.1f}% of dense) is below what any strategy of this sweep "
                f"reaches on {header.get('model', 'this model')}: the lowest is {floor:.4g} GFLOPs ({100 * floor / dense:.1f}%, {best})"
            )

    combos: list[BudgetStrategy] = []
    for text, g in budgets.items():
        for name in cfg.strategies:
            method, token = SWEEP_STRATEGIES[name]
            ok = g >= lowest[name]
            note = "" if ok else f"lowest reachable {lowest[name]:.4g} GFLOPs"
            param = ""
            if ok and method == "training_free":
                c = calibrate(StrategyConfig(token), model.arch, g)
                param = f"{'r' if c.config.r is not None else 'keep'}={c.config.param_value:.4g}"
            combos.append(BudgetStrategy(method, name, token, text, g, ok, note, param))

    plan = SweepPlan(str(checkpoint), dataset, header.get("model", ""), dense, budgets, combos)
    plan.schedule = [BudgetStrategy("dense", DENSE, "none", "100%", dense)]
    plan.schedule += [c for c in combos if c.reachable and c.method == "training_free"]
    plan.schedule += [c for c in combos if c.reachable and c.method == "static"]
    selector = [c for c in combos if c.reachable and c.method == "selector"]
    plan.schedule += selector * cfg.trials_per_combo
    return plan


def trial_threads(cpus_per_trial: int) -> int:
    return max(1, min(cpus_per_trial, os.cpu_count() or 1))

"""Everything a sweep checks before its first trial, and the trials it will run.

A budget is GFLOPs (``"0.04"``) or a share of the dense model (``"50%"``, of the full
meta-network), parsed once here into a :class:`prance.budget.Budget` of the sweep's
``budget_kind``. Reachability is decided with the analytic FLOPs counter, without running
anything, by each method's ``lowest`` (:mod:`prance.sweep.methods`): a training-free
strategy reaches a budget when some value of its parameter (r or keep) on the full network
fits; a static one when some value fits on the smallest sub-network; a selector strategy
when its cheapest schedule fits. A budget above the dense model, or below what every
strategy of the sweep can reach, is an input error; a budget that only some strategies
reach leaves the others' rows marked unreachable. The image split is checked by counting
(:func:`prance.splits.layout`): the driver decodes no image.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prance import flops
from prance.budget import Budget
from prance.sweep.config import SWEEP_STRATEGIES, SweepConfig
from prance.errors import PranceError
from prance.sweep.methods import METHODS


@dataclass(frozen=True)
class BudgetStrategy:
    """One sweep strategy at one budget. ``SweepPlan.combos`` holds one per budget x
    strategy cell, reachable or not; ``SweepPlan.trials`` holds one per *trial* (the dense
    trial first, a selector cell once per ``trials_per_combo``), so the same cell may stand
    there several times."""

    method: str  # a name of prance.sweep.methods.METHODS
    strategy: str  # the sweep's name: dense, free_prune, prune, ...
    token_strategy: str  # none, prune, merge, prune_merge, ppt
    budget: str  # as the user wrote it ("50%", "0.04"); "100%" for dense
    budget_gflops: float
    dense_gflops: float = 0.0
    budget_kind: str = "mean"
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
    checkpoint: str  # absolute, or timm:NAME (a shipped checkpoint is found by name on each node)
    dataset: str  # absolute path for image folders
    model: str
    dense_gflops: float
    budgets: dict[str, Budget]  # as written -> the parsed budget
    combos: list[BudgetStrategy]  # every budget x strategy, reachable or not (not dense)
    trials: list[BudgetStrategy] = field(default_factory=list)  # trial number -> combo
    image_spec: Any = None  # the meta-network's prance.data.InputSpec: how its split's images are shaped

    @property
    def unreachable(self) -> list[BudgetStrategy]:
        return [c for c in self.combos if not c.reachable]

    def counts(self) -> dict[str, int]:
        out = {name: 0 for name in METHODS}
        for c in self.trials:
            out[c.method] += 1
        return out


def resolve_path(path: str) -> Path:
    """A user path, absolute (a relative one is relative to the working folder). Shipped
    checkpoints are named, not looked up in the source tree: ``timm:prance_vit_fmnist``."""
    return Path(path).expanduser().resolve()


def resolve_dataset(name: str) -> str:
    key = name.strip()
    if key.lower().startswith("imagefolder:"):
        return "imagefolder:" + str(resolve_path(key[len("imagefolder:"):].strip()))
    return key


def plan_sweep(cfg: SweepConfig) -> SweepPlan:
    """Check the inputs (PranceError with one line on the first problem) and lay out the
    trials: the dense reference, every reachable training-free and static combo once, then
    the selector combos round-robin, ``trials_per_combo`` times."""
    from prance.data import input_spec_for_model

    checkpoint, model, header, dataset = _check_model_and_data(cfg)
    dense = flops.gflops(model.arch)
    budgets = _budgets(cfg, dense)
    lowest: dict[str, float] = {}
    for name in cfg.strategies:
        method, token = SWEEP_STRATEGIES[name]
        lowest[name] = METHODS[method].lowest(model, token, cfg)
    floor = min(lowest.values())
    for text, b in budgets.items():
        g = b.gflops
        if g < floor:
            best = min(lowest, key=lowest.get)
            raise PranceError(
                f"budget {text} ({g:.4g} GFLOPs, {100 * g / dense:.1f}% of dense) is below what any strategy of this sweep "
                f"reaches on {header.get('model', 'this model')}: the lowest is {floor:.4g} GFLOPs ({100 * floor / dense:.1f}%, {best})"
            )
    combos = _combos(cfg, model, budgets, lowest, dense)
    if combos and not any(c.reachable for c in combos):  # nothing but the dense reference would run
        c = combos[0]
        raise PranceError(f"no budget x strategy of this sweep can run ({c.strategy}@{c.budget}: {c.note}; "
                          f"budget_kind {cfg.budget_kind}, strategies {', '.join(cfg.strategies)})")
    plan = SweepPlan(str(checkpoint), dataset, header.get("model", ""), dense, budgets, combos,
                     image_spec=input_spec_for_model(model.vit))
    plan.trials = _trial_order(cfg, combos, dense)
    return plan


def _check_model_and_data(cfg: SweepConfig):
    """(checkpoint, meta-network, its header, dataset) of the sweep, its data split counted."""
    from prance import splits
    from prance.checkpoint import is_timm_source, load_checkpoint
    from prance.data import build_dataset, input_spec_for_model

    if is_timm_source(cfg.checkpoint):  # timm:NAME: shipped weights or timm's, found by name wherever a trial runs
        checkpoint = cfg.checkpoint.strip()
    else:
        checkpoint = resolve_path(cfg.checkpoint)
        if not checkpoint.is_file():
            raise PranceError(f"checkpoint {cfg.checkpoint} not found (looked in {Path.cwd()})")
    model, header = load_checkpoint(checkpoint)
    dataset = resolve_dataset(cfg.dataset)
    image_spec = input_spec_for_model(model.vit)
    build_dataset(dataset, "test", image_spec)  # missing / unknown dataset -> PranceError
    # the selector's own data split, counted (too few images for val_limit / train_limit -> PranceError)
    splits.layout(splits.SplitSpec.of(cfg.selector.model_copy(update={"dataset": dataset, "checkpoint": str(checkpoint)})), image_spec)
    return checkpoint, model, header, dataset


def _budgets(cfg: SweepConfig, dense: float) -> dict[str, Budget]:
    """The sweep's budgets as written -> parsed, each below the dense model's and distinct."""
    budgets: dict[str, Budget] = {}
    for text in cfg.budgets:
        b = Budget.parse(text, dense, cfg.budget_kind)
        if b.gflops > dense * (1 + 1e-9):
            raise PranceError(f"budget {text} ({b.gflops:.4g} GFLOPs) is above the dense model's {dense:.4g} GFLOPs: nothing to compress")
        budgets[text.strip()] = b
    if len(set(round(b.gflops, 12) for b in budgets.values())) != len(budgets):
        raise PranceError(f"two budgets of {list(budgets)} are the same GFLOPs")
    return budgets


def _combos(cfg: SweepConfig, model, budgets: dict[str, Budget], lowest: dict[str, float], dense: float) -> list[BudgetStrategy]:
    """Every budget x strategy cell, whether its method reaches the budget and meets its kind."""
    combos: list[BudgetStrategy] = []
    for text, b in budgets.items():
        for name in cfg.strategies:
            method, token = SWEEP_STRATEGIES[name]
            ok = b.gflops >= lowest[name]
            note = "" if ok else f"lowest reachable {lowest[name]:.4g} GFLOPs"
            if ok and b.kind not in METHODS[method].meets:
                ok, note = False, f"meets {'/'.join(METHODS[method].meets)} budgets only, not {b.kind}"
            setting = METHODS[method].setting
            param = setting(model, token, b.gflops) if ok and setting is not None else ""
            combos.append(BudgetStrategy(method, name, token, text, b.gflops, dense, b.kind, ok, note, param))
    return combos


def _trial_order(cfg: SweepConfig, combos: list[BudgetStrategy], dense: float) -> list[BudgetStrategy]:
    """The cell of each trial number: the dense reference; one trial per cell of the
    methods that search nothing, in report order; then the searching methods' cells
    round-robin, ``trials_per_combo`` times."""
    trials = [BudgetStrategy("dense", "dense", "none", "100%", dense, dense, cfg.budget_kind)]
    for m in sorted(METHODS.values(), key=lambda m: m.order):
        if not m.searches:
            trials += [c for c in combos if c.reachable and c.method == m.name]
    searching = [c for c in combos if c.reachable and METHODS[c.method].searches]
    return trials + searching * cfg.trials_per_combo


def trial_threads(cpus_per_trial: int) -> int:
    return max(1, min(cpus_per_trial, os.cpu_count() or 1))

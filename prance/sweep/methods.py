"""The sweep's methods: the ways a budget x strategy cell is filled, one registry.

A :class:`SweepMethod` carries everything the sweep needs to know about a method:
its sweep strategy names, whether it can reach a budget, how a trial runs it, where its
rows go in the report and its series on the plot, and whether it searches
hyper-parameters (Optuna suggestions, several trials per cell, ASHA on its
per-iteration reports). The planner, the search space, the Tune driver and the report
read these fields; none of them names a method.

Adding a method is one :func:`register` call here plus the module that runs its trial
(a function ``run(config, ctx, report, workdir, restored) -> final metrics``, free of
Ray, like those of :mod:`prance.sweep.trial`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from prance.budget import lowest_gflops
from prance.tokens.strategies import REGISTRY, SELECTOR_STRATEGIES, TRAINING_FREE_STRATEGIES
from prance.sweep import cascade_trial, controller_trial, trial


@dataclass(frozen=True)
class SweepMethod:
    name: str
    order: int  # rows and plot series in this order
    marker: str  # matplotlib marker of its series
    strategies: dict[str, str]  # the sweep's strategy names of this method -> token strategy
    run: Callable[..., dict]  # (config, ctx, report, workdir, restored) -> final metrics
    lowest: Callable[[Any, str, Any], float] | None = None  # (model, token strategy, SweepConfig) -> least GFLOPs
    setting: Callable[[Any, str, float], str] | None = None  # (model, token strategy, GFLOPs): what the plan fixes
    meets: tuple[str, ...] = ("mean", "cap")  # budget kinds its results meet by construction
    searches: bool = False  # suggests hyper-parameters, runs ``trials_per_combo`` times, reports per iteration (ASHA)
    parts: tuple[str, ...] = ("val",)  # the split's parts its trials read (prance.splits.PARTS): their runs' MLflow inputs


METHODS: dict[str, SweepMethod] = {}


def register(method: SweepMethod) -> SweepMethod:
    """Add ``method`` to the sweep (its strategy names must be new)."""
    taken = {s for m in METHODS.values() for s in m.strategies} & set(method.strategies)
    if method.name in METHODS or taken:
        raise ValueError(f"sweep method {method.name!r} or strategy {sorted(taken)} registered twice")
    METHODS[method.name] = method
    return method


def strategies() -> dict[str, tuple[str, str]]:
    """Every sweep strategy name -> (method, token strategy), in registration order."""
    return {s: (m.name, token) for m in METHODS.values() for s, token in m.strategies.items()}


def method_of(name: str) -> SweepMethod:
    return METHODS[name]


# ------------------------------------------------------------------ the built-in methods


def _static_lowest(model, token: str, cfg) -> float:
    """The narrowest sub-network with the strategy's strongest setting."""
    return lowest_gflops(model.arch, token, model.space.smallest())


def _selector_lowest(model, token: str, cfg) -> float:
    """The cheapest schedule of the PPO selector, from its own cost table."""
    from prance.selector.selector import Selector

    return Selector.for_config(model, cfg.selector.model_copy(update={"strategy": token})).min_gflops()


def _calibrated(model, token: str, gflops: float) -> str:
    from prance.budget import calibrate
    from prance.tokens.strategies import StrategyConfig

    c = calibrate(StrategyConfig(token), model.arch, gflops)
    return f"{'r' if c.config.r is not None else 'keep'}={c.config.param_value:.4g}"


DENSE = register(SweepMethod("dense", 0, "*", {}, trial.run_dense))
register(SweepMethod("training_free", 1, "s", {f"free_{n}": n for n in TRAINING_FREE_STRATEGIES},
                     trial.run_training_free, lambda model, token, cfg: lowest_gflops(model.arch, token), _calibrated))
register(SweepMethod("static", 2, "D",
                     {("static" if n == "none" else f"static_{n}"): n for n, s in REGISTRY.items() if s.static},
                     trial.run_static, _static_lowest))
def _cascade_lowest(model, token: str, cfg) -> float:
    """The cheapest static configuration of the ladder's strategies (never escalating)."""
    return min(_static_lowest(model, t, cfg) for t in cfg.cascade.strategies)


register(SweepMethod("cascade", 3, "^", {"cascade": "ladder"}, cascade_trial.run_cascade, _cascade_lowest,
                     meets=("mean",)))
register(SweepMethod("controller", 5, "P", {"controller": "ladder"}, controller_trial.run_controller, _cascade_lowest,
                     meets=("mean",), parts=("val", "train")))
register(SweepMethod("selector", 4, "o", {n: n for n in SELECTOR_STRATEGIES}, trial.run_selector_trial,
                     _selector_lowest, meets=("cap", "mean"), searches=True, parts=("val", "train")))


def run_trial(config: dict, ctx, report, workdir, restored: bool = False) -> dict:
    """Run the trial ``config`` describes (a cell plus its suggested parameters) by its
    method, calling ``report(metrics, checkpoint folder or None)``; returns the final metrics."""
    return METHODS[config["method"]].run(config, ctx, report, workdir, restored)

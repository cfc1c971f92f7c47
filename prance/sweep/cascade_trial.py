"""The ``cascade`` sweep method's trial: the best confidence cascade (:mod:`prance.cascade`)
at a mean budget, chosen on the sweep's validation images.

Each budget's ladder of static configurations is computed once per sweep and shared by
every trial that needs it (:func:`shared_ladder`, through :mod:`prance.sweep.shared`); the chain and its
thresholds are chosen from the ladder's logits, then the chosen cascade is run again on
the validation images, so its row carries measured Top-1, per-image GFLOPs (mean, p95,
max) and throughput like every other row.
"""

from __future__ import annotations

from pathlib import Path

from prance.halving import Halving
from prance.sweep.trial import Report, TrialContext, baseline_top1, begin, finish_fixed, model_of, validation_images

_LADDERS: dict = {}
LADDER_CALLS = {"computed": 0}  # how many ladders this process computed (the sharing is tested on it)


def ladder_key(ctx: TrialContext, budget_gflops: float) -> tuple:
    settings = {k: v for k, v in ctx.cascade.items() if k in ("rungs", "strategies", "uniform_only")}
    static = Halving.of(ctx.static)
    return (ctx.checkpoint, ctx.dataset, repr(sorted(ctx.selector.items())), repr(settings), repr(static), round(budget_gflops, 15))


def shared_ladder(ctx: TrialContext, budget_gflops: float) -> list:
    """The ladder of static configurations at ``budget_gflops`` (:func:`prance.cascade.ladder`),
    computed once per budget (in this process, and across the sweep's trials)."""
    from prance import cascade
    from prance.sweep import shared

    def compute() -> list:
        model = model_of(ctx.checkpoint)
        c = ctx.cascade
        rungs = sorted(set(list(c.get("rungs", cascade.RUNGS)) + [1.0]))
        LADDER_CALLS["computed"] += 1
        return cascade.ladder(model, budget_gflops, validation_images(ctx, model), rungs,
                              c.get("strategies", ["none", "merge", "prune_merge"]),
                              halving=Halving.of(ctx.static), uniform_only=c.get("uniform_only", True))

    key = ladder_key(ctx, budget_gflops)
    if key not in _LADDERS:
        _LADDERS[key] = shared.value(ctx.shared, shared.key_of("ladder", *key), compute)
    return _LADDERS[key]


def search(ctx: TrialContext, model, budget_gflops: float, val: tuple, ladder: list, logits=None):
    """The sweep's cascade choice on ``ladder`` (:func:`prance.cascade.search` with the
    sweep's ``cascade:`` settings), on the validation images ``val`` and, when the caller
    has them, the ladder's ``logits`` on them."""
    from prance import cascade

    c = ctx.cascade
    return cascade.search(model, budget_gflops, val, c.get("strategies", ["none", "merge", "prune_merge"]),
                          max_rungs=c.get("max_rungs", 3), configs=ladder, margin=c.get("margin", True), logits=logits)


def run_cascade(config: dict, ctx: TrialContext, report: Report, workdir: Path, restored: bool = False) -> dict:
    """The best cascade at the trial's (mean) budget, evaluated on the validation images."""
    from prance import cascade

    start = begin(ctx)
    budget = float(config["budget_gflops"])
    model = model_of(ctx.checkpoint)
    x, y = validation_images(ctx, model)
    found = search(ctx, model, budget, (x, y), shared_ladder(ctx, budget))
    m = cascade.evaluate(model, found.best, x, y, batch_size=max(ctx.selector.get("batch_size", 64), 256))
    m.pop("n_images", None)
    m.update({"param": found.best.describe(), "margin": found.margin, "ladder_rungs": len(found.ladder)})
    return finish_fixed(config, ctx, report, m, baseline_top1(ctx, budget), start)

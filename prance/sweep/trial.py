"""The bodies of sweep trials, one function per method of :mod:`prance.sweep.methods`,
free of Ray: the Tune trainable (prance.sweep.tune) only passes ``report`` in.

- ``dense``: the full meta-network, no token reduction (the reference point of the plot).
- ``training_free``: the full meta-network with the token strategy calibrated to the
  budget, evaluated once on the validation images.
- ``static``: the best static configuration of the meta-network (a width level per stage
  x the token strategy calibrated to the rest of the budget, ``prance.static_search``),
  chosen and reported on the validation images.
- ``selector``: ``prance.selector.pipeline.run_selector`` trains the PPO selector and reports
  validation metrics every ``eval_every`` iterations.

The score the search optimises makes budgets comparable: Top-1 gain over the best
training-free strategy at the same budget (the dense Top-1 when none reaches it), minus
``overshoot_penalty`` x the relative GFLOPs overshoot of the budget:

    score = top1 - baseline_top1(budget) - overshoot_penalty * max(0, gflops / budget - 1)

Baselines are evaluated once per budget (cached per worker process, and shared by all the
sweep's trials through :mod:`prance.sweep.shared`), on the same validation images as the
trial. So are the images themselves (one uint8 copy per node in Ray's object store) and a
selector's warm-start anchor search (once per strategy and budget). Ray is reached only
through :mod:`prance.sweep.shared`, and only when ``TrialContext.shared`` names a registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prance import tracking

FINAL = "final"  # set in a trial's last report when it ran to its end

Report = Callable[[dict, "Path | None"], None]  # (metrics, folder holding the selector checkpoint or None)


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares (plain data: it travels to Ray workers)."""

    checkpoint: str  # absolute path
    dataset: str
    selector: dict  # SelectorConfig fields shared by all trials (val_limit, batch_size, seed, ...)
    overshoot_penalty: float = 200.0
    threads: int = 1
    device: str = "cpu"
    progress: bool = False
    static: dict = field(default_factory=dict)  # StaticSearchSettings fields
    cascade: dict = field(default_factory=dict)  # CascadeSettings fields
    controller: dict = field(default_factory=dict)  # ControllerSettings fields
    shared: str = ""  # the name of the sweep's registry of shared work (prance.sweep.shared); "" in-process
    checkpoint_at: tuple = ()  # iterations a selector trial checkpoints at (prance.sweep.tune.checkpoint_iterations); (): every report


def score(top1: float, gflops: float, budget_gflops: float, baseline_top1: float, overshoot_penalty: float) -> float:
    over = max(0.0, gflops / budget_gflops - 1.0)
    return top1 - baseline_top1 - overshoot_penalty * over


# ------------------------------------------------------------------ per-process caches
_MODELS: dict = {}
_IMAGES: dict = {}
_TOP1: dict = {}


def model_of(checkpoint: str):
    if checkpoint not in _MODELS:
        from prance.checkpoint import load_checkpoint

        _MODELS.clear()
        _MODELS[checkpoint] = load_checkpoint(checkpoint)[0]
    return _MODELS[checkpoint]


def split_of(ctx: TrialContext):
    """The sweep's split (:class:`prance.splits.SplitSpec`) from its shared selector settings."""
    from prance.splits import SplitSpec

    return SplitSpec.of_settings(ctx.dataset, ctx.checkpoint, ctx.selector)


def split_images(model, spec, part: str, shared: str = ""):
    """A part of a split (``val``: what every trial is scored on; ``train``: the
    selector's rollout images) as (uint8 x, int64 y) tensors, loaded once per worker
    process and handed to every trial there that needs it; with ``shared`` (the sweep's
    registry) read from the node's one copy in Ray's object store."""
    from prance import splits
    from prance.data import input_spec_for_model

    key = (repr(spec), part)
    if key not in _IMAGES:
        if any(k[0] != key[0] for k in _IMAGES):
            _IMAGES.clear()  # another split: one split's images at a time
        if shared:
            from prance.sweep import shared as registry

            _IMAGES[key] = registry.images(shared, spec, input_spec_for_model(model.vit), part)
        else:
            _IMAGES[key] = splits.load(model, spec, parts=(part,))[part]
    return _IMAGES[key]


def validation_images(ctx: TrialContext, model):
    """The validation images every trial is scored on (:mod:`prance.splits`)."""
    return split_images(model, split_of(ctx), "val", ctx.shared)


def evaluate_fixed(ctx: TrialContext, token_strategy: str, budget_gflops: float | None) -> dict:
    """Top-1, GFLOPs, token ratios, throughput of the full meta-network with
    ``token_strategy`` calibrated to ``budget_gflops`` (dense when None)."""
    from prance.evaluate import evaluate, plan_for
    from prance.tokens.strategies import StrategyConfig

    model = model_of(ctx.checkpoint)
    plan = None
    param = ""
    if budget_gflops is not None and token_strategy != "none":
        cfg, plan = plan_for(model, StrategyConfig(token_strategy), budget_gflops)
        param = f"{'r' if cfg.r is not None else 'keep'}={cfg.param_value:.4g}"
    x, y = validation_images(ctx, model)
    size = ctx.selector.get("batch_size", 64)
    batches = [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]
    out = evaluate(model, batches, None, plan, device=ctx.device, progress=ctx.progress)
    out.pop("n_images", None)
    _TOP1[(ctx.checkpoint, ctx.dataset, token_strategy, budget_gflops)] = out[tracking.TOP1]
    return {**out, "param": param}


def evaluate_static(ctx: TrialContext, token_strategy: str, budget_gflops: float) -> dict:
    """The best static configuration with ``token_strategy`` at the budget, searched and
    evaluated on the validation images: Top-1, GFLOPs, token ratios, throughput, and the
    configuration found (``param``)."""
    from prance import static_search
    from prance.halving import Halving
    from prance.evaluate import evaluate

    model = model_of(ctx.checkpoint)
    x, y = validation_images(ctx, model)
    size = ctx.selector.get("batch_size", 64)
    found = static_search.search(model, budget_gflops, (x, y), [token_strategy],
                                 uniform_only=ctx.static.get("uniform_only", False), halving=Halving.of(ctx.static),
                                 batch_size=max(size, 256))
    batches = [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]
    out = evaluate(model, batches, found.best.subnet, found.best.plan, device=ctx.device, progress=ctx.progress)
    out.pop("n_images", None)
    return {**out, "param": found.best.describe(), "static_candidates": found.candidates, "static_forwards": found.forwards}


def _top1(ctx: TrialContext, token_strategy: str, budget_gflops: float | None) -> float:
    key = (ctx.checkpoint, ctx.dataset, token_strategy, budget_gflops)
    if key not in _TOP1:
        evaluate_fixed(ctx, token_strategy, budget_gflops)
    return _TOP1[key]


def baseline_top1(ctx: TrialContext, budget_gflops: float) -> float:
    """The best training-free Top-1 at the budget; the dense Top-1 when no training-free
    strategy reaches it."""
    from prance.errors import PranceError
    from prance.tokens.strategies import TRAINING_FREE_STRATEGIES

    from prance.sweep import shared

    def compute() -> float:
        best = None
        for token in TRAINING_FREE_STRATEGIES:
            try:
                t = _top1(ctx, token, budget_gflops)
            except PranceError:  # this strategy cannot reach the budget
                continue
            best = t if best is None else max(best, t)
        return best if best is not None else _top1(ctx, "none", None)

    key = ("baseline", ctx.checkpoint, ctx.dataset, repr(split_of(ctx)), ctx.selector.get("batch_size", 64), budget_gflops)
    if key not in _TOP1:
        _TOP1[key] = shared.value(ctx.shared, shared.key_of(*key), compute)
    return _TOP1[key]


def anchor_search(ctx: TrialContext, spec, images: int):
    """The warm-start anchor search of a selector trial (:func:`prance.static_search.search`
    as :func:`prance.selector.static.find_anchor` calls it), run once per set of its
    arguments across the sweep: the trials of one (strategy, budget) combo search the same
    configurations on the same first ``images`` rollout images, whatever their tuned
    hyper-parameters. A search that finds nothing is shared as such."""
    from prance import static_search
    from prance.errors import PranceError
    from prance.sweep import shared

    def search(meta, budget_gflops, val, strategies, **kw):
        key = ("anchor", ctx.checkpoint, repr(spec), images, list(strategies), budget_gflops, sorted(kw.items()))

        def compute():
            try:
                return "found", static_search.search(meta, budget_gflops, val, strategies, **kw)
            except PranceError as e:
                return "none", str(e)

        status, out = shared.value(ctx.shared, shared.key_of(*key), compute)
        if status == "none":
            raise PranceError(out)
        return out

    return search


def selector_config(config: dict, ctx: TrialContext):
    """The SelectorConfig of a selector trial: shared settings, the trial's suggested
    hyper-parameters, its strategy and budget (exact GFLOPs)."""
    from prance.selector.config import SelectorConfig

    data = dict(ctx.selector)
    data.update({k: v for k, v in config.items() if k in SelectorConfig.model_fields})
    data.update(checkpoint=ctx.checkpoint, dataset=ctx.dataset, strategy=config["token_strategy"],
                budget=repr(float(config["budget_gflops"])), budget_kind=config.get("budget_kind", "mean"), device=ctx.device)
    return SelectorConfig.model_validate(data)


def budget_of(config: dict):
    """The trial's budget as the plan parsed it (:class:`prance.budget.Budget`)."""
    from prance.budget import Budget

    return Budget(float(config["budget_gflops"]), float(config["dense_gflops"]), config.get("budget_kind", "mean"),
                  str(config.get("budget", "")))


def finish_fixed(config: dict, ctx: TrialContext, report: Report, m: dict, base: float, start: float) -> dict:
    """The final report of a trial that evaluates one configuration."""
    budget = float(config["budget_gflops"])
    found = m.pop("param")
    final = {**m, "budget_gflops": budget, "baseline_top1": base,
             "score": score(m[tracking.TOP1], m[tracking.GFLOPS], budget, base, ctx.overshoot_penalty), FINAL: 1}
    if found:
        final["configuration"] = found  # what the trial chose
    final["body_s"] = time.perf_counter() - start
    report(final, None)
    return final


def begin(ctx: TrialContext) -> float:
    """Start a trial: its torch threads set; returns the start time."""
    import torch

    torch.set_num_threads(ctx.threads)
    return time.perf_counter()


def run_dense(config: dict, ctx: TrialContext, report: Report, workdir: Path, restored: bool = False) -> dict:
    """The full meta-network, no token reduction: the reference point of the plot."""
    start = begin(ctx)
    m = evaluate_fixed(ctx, "none", None)
    m["param"] = ""
    return finish_fixed(config, ctx, report, m, m[tracking.TOP1], start)


def run_training_free(config: dict, ctx: TrialContext, report: Report, workdir: Path, restored: bool = False) -> dict:
    """The full meta-network with the token strategy calibrated to the budget."""
    start = begin(ctx)
    budget = float(config["budget_gflops"])
    m = evaluate_fixed(ctx, config["token_strategy"], budget)
    m["param"] = ""  # the plan's calibrated value is in the row already
    return finish_fixed(config, ctx, report, m, baseline_top1(ctx, budget), start)


def run_static(config: dict, ctx: TrialContext, report: Report, workdir: Path, restored: bool = False) -> dict:
    """The best static configuration of the token strategy at the budget."""
    start = begin(ctx)
    budget = float(config["budget_gflops"])
    m = evaluate_static(ctx, config["token_strategy"], budget)
    return finish_fixed(config, ctx, report, m, baseline_top1(ctx, budget), start)


def checkpoint_due(at: tuple, previous: int, iteration: int) -> bool:
    """Whether the report of ``iteration`` carries a checkpoint: it is the first report at or
    past one of ``at`` (after the report of ``previous``), or ``at`` is empty (every report)."""
    return not at or any(previous < m <= iteration for m in at)


def run_selector_trial(config: dict, ctx: TrialContext, report: Report, workdir: Path, restored: bool = False) -> dict:
    """Train the PPO selector (:func:`prance.selector.pipeline.run_selector`) on the sweep's
    split, reporting validation metrics every ``eval_every`` iterations. It keeps its
    checkpoint (the selector so far and its training state) in ``workdir``; ``restored``:
    ``workdir`` already holds one (a retried or resumed trial), training continues from it."""
    from prance.selector.pipeline import run_selector
    from prance.selector.static import anchor_searches
    from prance.selector.store import SELECTOR_FILE
    from prance.splits import SplitSpec

    start = begin(ctx)
    budget = float(config["budget_gflops"])
    penalty = ctx.overshoot_penalty
    cfg = selector_config(config, ctx)
    base = baseline_top1(ctx, budget)
    workdir.mkdir(parents=True, exist_ok=True)
    model = model_of(ctx.checkpoint)
    spec = SplitSpec.of(cfg.model_copy(update={"test_limit": None}))  # a trial's own suggestions may change its split
    data = {part: split_images(model, spec, part, ctx.shared) for part in ("val", "train")}

    def with_score(m: dict) -> dict:
        out = {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool))}
        out["budget_gflops"] = budget
        out["baseline_top1"] = base
        out["score"] = score(m[tracking.TOP1], m[tracking.GFLOPS], budget, base, penalty)
        out["body_s"] = time.perf_counter() - start
        return out

    def checkpoint_dir() -> Path | None:
        return workdir if (workdir / SELECTOR_FILE).is_file() else None

    last = [0]  # the iteration of the previous report

    def on_report(m: dict) -> None:
        # The last iteration is reported once, as the final result below: a scheduler
        # stopping the trial at that report would otherwise cut off the final metrics.
        it = int(m.get("iteration", 0))
        if it < cfg.iterations:
            due = checkpoint_due(ctx.checkpoint_at, last[0], it)
            last[0] = it
            report(with_score(m), checkpoint_dir() if due else None)

    with anchor_searches(anchor_search(ctx, spec, min(cfg.static_images, len(data["train"][1])))):
        final = with_score(run_selector(cfg, on_report, workdir, progress=ctx.progress, resume_from=workdir if restored else None,
                                        budget=budget_of(config), data=data))
    # The final metrics are those of the best validation iteration (the selector that is
    # kept), reported at the last iteration so that MLflow and Tune show them last.
    final["best_iteration"] = final.get("iteration", cfg.iterations)
    final["iteration"] = cfg.iterations
    final[FINAL] = 1
    report(final, checkpoint_dir())
    return final

"""The ``controller`` sweep method's trial: the PRANCE selector as the learned controller of
a multi-pass cascade (:mod:`prance.selector.passes`) at a mean budget.

It starts where the ``cascade`` method ends: the budget's shared ladder
(:func:`prance.sweep.cascade_trial.shared_ladder`) and the best cascade on it, chosen on the
validation images. The ladder's logits on the rollout images are the environment PPO
trains in; a trained policy replaces the cascade only if it beats it on the validation
images at no more mean GFLOPs. The controller is saved in the trial's checkpoint folder
(``controller.safetensors``), so its row runs again (``prance eval --sweep``) and becomes an
MLflow model like every other row; the row's Top-1 and per-image GFLOPs are measured by
running it on the validation images, one rung at a time.
"""

from __future__ import annotations

from pathlib import Path

from prance.sweep.cascade_trial import search, shared_ladder
from prance.sweep.trial import (Report, TrialContext, baseline_top1, begin, finish_fixed, model_of, split_images,
                                split_of, validation_images)


def run_controller(config: dict, ctx: TrialContext, report: Report, workdir: Path, restored: bool = False) -> dict:
    """Train the controller at the trial's (mean) budget; report it with its checkpoint."""
    from prance import cascade
    from prance.selector import passes
    from prance.selector.selector import meta_fingerprint

    start = begin(ctx)
    budget = float(config["budget_gflops"])
    model = model_of(ctx.checkpoint)
    x, y = validation_images(ctx, model)
    ladder = shared_ladder(ctx, budget)
    size = max(ctx.selector.get("batch_size", 64), 256)
    val = passes.Table.of(model, ladder, x, y, size)
    found = search(ctx, model, budget, (x, y), ladder, logits=val.logits)
    settings = dict(ctx.controller)
    max_passes = settings.pop("max_passes", cascade.MAX_RUNGS)
    xr, yr = split_images(model, split_of(ctx), "train", ctx.shared)
    rollouts = passes.Table.of(model, ladder, xr, yr, size)
    ctl = passes.train(ladder, found, rollouts, val, budget, passes.PassSettings(**settings), max_passes)
    folder = workdir / "controller"
    passes.save(ctl, folder / passes.CONTROLLER_FILE, meta_fingerprint(model))
    m = passes.evaluate(model, ctl, x, y, size)
    m.pop("n_images", None)
    m.update({"param": ctl.describe(), "margin": found.margin, "ladder_rungs": len(ladder),
              "cascade_top1": found.top1, "trained": float(ctl.policy is not None)})
    within = [h["val_top1"] for h in ctl.history if h["val_gflops"] <= ctl.target_gflops * (1 + 1e-9)]
    if within:  # how close PPO came, also when it did not beat the cascade
        m["policy_top1"] = max(within)
    final = finish_fixed(config, ctx, lambda metrics, _: None, m, baseline_top1(ctx, budget), start)
    report(final, folder)
    return final

"""One selector run end to end, as a sweep trial or the CLI calls it: load the
meta-network and the data, check the budget, train with PPO, report validation metrics
as it goes, save the selector, evaluate the best one on held-out test images.

Data (all disjoint): validation images (what a sweep optimises), rollout images and final
test images, as :mod:`prance.splits` lays them out; a caller that already holds them
(a sweep trial) hands them in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from prance import device, splits
from prance.budget import Budget
from prance.checkpoint import load_checkpoint
from prance.selector.config import SelectorConfig
from prance.selector.selector import Selector, evaluate_selector
from prance.checkpoint import load_state, save_state
from prance.selector.store import SELECTOR_FILE, STATE_FILE, save_selector
from prance.selector.train import batches, train_selector


def run_selector(
    cfg: SelectorConfig,
    report: Callable[[dict], None] | None = None,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    resume_from: str | Path | None = None,
    budget: Budget | None = None,
    data: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict:
    """Train a selector per ``cfg``; ``report(metrics)`` every ``cfg.eval_every``
    iterations, after saving ``out_dir/selector.safetensors`` (the selector kept so far)
    and ``out_dir/selector_state.pt`` (the training state) when ``out_dir`` is given.
    ``resume_from``: a folder holding such a training state, to continue from. Returns
    the best validation metrics, plus ``test_*`` ones when ``cfg.test_limit``.
    ``budget``: the budget already parsed (default: ``cfg.budget``); ``data``: the
    split's images already loaded (default: loaded here, :func:`prance.splits.load`)."""
    meta, _ = load_checkpoint(cfg.checkpoint)
    budget = (budget or Budget.of(cfg.budget, meta.arch)).gflops
    # input checks before any data is loaded
    selector = Selector.for_config(meta, cfg)
    selector.check_budget(budget)
    meta.to(device.resolve(cfg.device))
    resume = load_state(Path(resume_from) / STATE_FILE) if resume_from is not None else None
    data = dict(data or {})
    missing = [p for p in ("val", "train", "test") if p not in data and (p != "test" or cfg.test_limit is not None)]
    if missing:
        data.update(splits.load(meta, splits.SplitSpec.of(cfg), parts=missing))
    out = Path(out_dir) if out_dir is not None else None
    config = cfg.model_dump()

    def callback(metrics: dict, selector: Selector, state: dict) -> None:
        if out is not None:
            save_selector(out / SELECTOR_FILE, selector, config, {"budget_gflops": budget})
            save_state(out / STATE_FILE, state)
        if report is not None:
            report({**metrics, "budget_gflops": budget})

    result = train_selector(meta, cfg, budget, data["train"], data["val"], callback, progress=progress, selector=selector,
                            resume=resume)
    final = {**result.best, "budget_gflops": budget, "train_seconds": result.seconds}
    if result.start:  # what PPO had to beat: the warm start on the same validation images
        final["warm_start_top1"] = result.start["top1"]
        final["warm_start"] = result.start.get("warm_start", "")
    if out is not None:
        save_selector(out / SELECTOR_FILE, result.selector, config, {"budget_gflops": budget, "val": result.best})
    if "test" in data:
        test = evaluate_selector(meta, result.selector, batches(*data["test"], cfg.batch_size), budget, progress=False, amp=cfg.amp)
        final.update({f"test_{k}": v for k, v in test.items()})
    return final

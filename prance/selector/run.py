"""One selector run end to end, as a sweep trial or the CLI calls it: load the
meta-network and the data, check the budget, train with PPO, report validation metrics
as it goes, save the selector, evaluate the best one on held-out test images.

Data (all disjoint): validation images (what a sweep optimises), rollout images and final
test images, from a fixed permutation of the test split -- the meta-network never saw
them. Rolling out on the meta-network's own training images (``rollouts_from: train``)
teaches the selector how confident the meta-network is on data it memorised, which does
not transfer (docs/selector.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from prance import device, flops
from prance.budget import parse_budget
from prance.checkpoint import load_checkpoint, read_header
from prance.selector.config import SelectorConfig
from prance.data import build_dataset, input_spec_for_model, make_loader, pretrain_holdout
from prance.errors import PranceError
from prance.models.meta import MetaViT
from prance.selector.selector import Selector, evaluate_selector
from prance.checkpoint import load_state, save_state
from prance.selector.store import SELECTOR_FILE, STATE_FILE, save_selector
from prance.selector.train import batches, train_selector


# The fixed permutation of the test split into validation, rollout and test images: the same
# for every selector and sweep trial, so their numbers are on the same images.
TEST_SPLIT_SEED = 1234


def _tensors(dataset, indices: list[int]) -> tuple[Tensor, Tensor]:
    if hasattr(dataset, "batch"):
        return dataset.batch(indices)
    from torch.utils.data import Subset

    xs, ys = zip(*make_loader(Subset(dataset, indices), batch_size=256))
    return torch.cat(xs), torch.cat(ys)


def load_data(meta: MetaViT, cfg: SelectorConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """Rollout, validation and (with ``test_limit``) test images, disjoint. The test split
    is permuted once (fixed seed): the first ``val_limit`` images validate, with
    ``rollouts_from: holdout`` the next ``train_limit`` are the rollout images, the rest
    are test images. With ``rollouts_from: train_holdout`` (``auto``'s choice for a
    checkpoint that held out train images) validation and rollout images
    come from the train images the checkpoint's pretraining held out, and test images from
    the whole test split."""
    spec = input_spec_for_model(meta.vit)
    source = rollouts_source(cfg)  # reads the checkpoint's header for auto: once
    if source == "train_holdout":
        return _train_holdout_data(spec, cfg)
    test = build_dataset(cfg.dataset, "test", spec)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(TEST_SPLIT_SEED)).tolist()
    v_idx, rest = perm[: cfg.val_limit], perm[cfg.val_limit :]
    if source == "holdout":
        n = cfg.train_limit or len(rest) // 2
        r_idx, rest = rest[:n], rest[n:]
        rollouts = _tensors(test, r_idx)
    else:
        train = build_dataset(cfg.dataset, "train", spec)
        g = torch.Generator().manual_seed(cfg.seed)
        rollouts = _tensors(train, torch.randperm(len(train), generator=g)[: cfg.train_limit or len(train)].tolist())
    if not rest and cfg.test_limit is not None:
        raise PranceError(f"val_limit {cfg.val_limit} + train_limit {cfg.train_limit} leave no test images ({len(test)} in the test split)")
    if len(v_idx) == 0 or rollouts[0].shape[0] == 0:
        raise PranceError(f"the test split ({len(test)} images) is too small for val_limit {cfg.val_limit} and train_limit {cfg.train_limit}")
    out = {"train": rollouts, "val": _tensors(test, v_idx)}
    if cfg.test_limit is not None:
        out["test"] = _tensors(test, rest[: cfg.test_limit])
    return out


def _holdout_fraction(checkpoint: str) -> float:
    return float((read_header(checkpoint).get("info") or {}).get("config", {}).get("holdout_fraction") or 0.0)


def rollouts_source(cfg: SelectorConfig) -> str:
    """``cfg.rollouts_from`` with ``auto`` resolved: ``train_holdout`` when the checkpoint's
    pretraining held out train images, else ``holdout``."""
    if cfg.rollouts_from != "auto":
        return cfg.rollouts_from
    return "train_holdout" if _holdout_fraction(cfg.checkpoint) > 0 else "holdout"


def _train_holdout_data(spec, cfg: SelectorConfig) -> dict[str, tuple[Tensor, Tensor]]:
    fraction = _holdout_fraction(cfg.checkpoint)
    if not fraction:
        raise PranceError(f"rollouts_from: train_holdout needs a checkpoint pretrained with holdout_fraction > 0; "
                          f"{cfg.checkpoint} held out no train images (use rollouts_from: holdout)")
    held = pretrain_holdout(build_dataset(cfg.dataset, "train", spec), fraction)[1]
    idx = held.indices
    n_rollouts = cfg.train_limit or (len(idx) - cfg.val_limit)
    if cfg.val_limit + n_rollouts > len(idx):
        raise PranceError(f"val_limit {cfg.val_limit} + train_limit {n_rollouts} exceed the checkpoint's "
                          f"{len(idx)} held-out train images")
    out = {"val": _tensors(held.dataset, idx[: cfg.val_limit]),
           "train": _tensors(held.dataset, idx[cfg.val_limit : cfg.val_limit + n_rollouts])}
    if cfg.test_limit is not None:
        test = build_dataset(cfg.dataset, "test", spec)
        out["test"] = _tensors(test, list(range(min(cfg.test_limit, len(test)))))
    return out


def budget_of(meta: MetaViT, budget: str | float) -> float:
    """GFLOPs of a budget given as GFLOPs or as a share of the full sub-network."""
    return parse_budget(budget, flops.count(meta.arch).gflops)


def run_selector(
    cfg: SelectorConfig,
    report: Callable[[dict], None] | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    resume_from: str | Path | None = None,
) -> dict:
    """Train a selector per ``cfg``; ``report(metrics)`` every ``cfg.eval_every``
    iterations, after saving ``out_dir/selector.safetensors`` (the selector kept so far)
    and ``out_dir/selector_state.pt`` (the training state) when ``out_dir`` is given.
    ``resume_from``: a folder holding such a training state, to continue from. Returns
    the best validation metrics, plus ``test_*`` ones when ``cfg.test_limit``."""
    meta, _ = load_checkpoint(cfg.checkpoint)
    budget = budget_of(meta, cfg.budget)
    # input checks before any data is loaded
    selector = Selector.for_config(meta, cfg)
    selector.check_budget(budget)
    meta.to(device.resolve(cfg.device))
    resume = load_state(Path(resume_from) / STATE_FILE) if resume_from is not None else None
    data = load_data(meta, cfg)
    out = Path(out_dir) if out_dir is not None else None
    config = cfg.model_dump()

    def callback(metrics: dict, selector: Selector, state: dict) -> None:
        if out is not None:
            save_selector(out / SELECTOR_FILE, selector, config, {"budget_gflops": budget})
            save_state(out / STATE_FILE, state)
        if report is not None:
            report({**metrics, "budget_gflops": budget})

    result = train_selector(meta, cfg, budget, data["train"], data["val"], callback, progress, selector, resume)
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

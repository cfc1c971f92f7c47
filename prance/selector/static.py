"""The selector's warm start: the best *static* schedule of its own action space at the
budget -- the same decisions for every image -- found by successive halving
(:func:`prance.static_search.rank`) on held-out images.

A static schedule picks a width level per stage and one keep choice applied at every
stage after the first (for ``prune_merge``, one pair). Of those that fit the budget
(the selector's own cost included), only the *maximal* ones are ranked: a schedule that
could take one more width level in some stage, or the next keep choice everywhere, and
still fit is dominated by that richer schedule and left out (accuracy is taken to grow
with compute along each single step). PPO then starts from the winner -- the actor's
per-stage prior is set to it -- and a trained policy is kept only when it beats this
start on validation (:func:`prance.selector.train.train_selector`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from prance.models.meta import MetaViT
from prance.models.subnet import SubNet
from prance.selector.selector import Selector
from prance.static_search import SearchResult, rank
from prance.tokens.state import TokenPlan


MAX_WIDTH_SCHEDULES = 10_000  # per-stage width combinations enumerated at most


@dataclass(frozen=True)
class Schedule:
    """One static schedule: per stage, an index per action dimension."""

    indices: tuple[tuple[int, ...], ...]
    subnet: SubNet
    plan: TokenPlan
    macs: float  # per image, the selector's own cost included

    @property
    def gflops(self) -> float:
        return self.macs / 1e9

    def describe(self) -> str:
        return " | ".join(",".join(map(str, idx)) for idx in self.indices)

    def to_dict(self) -> dict:
        return {"indices": [list(i) for i in self.indices], "subnet": self.subnet.to_dict(), "gflops": self.gflops,
                "description": self.describe()}


def _cost(selector: Selector, indices: list[tuple[int, ...]]) -> float:
    table = selector.table
    n = selector.actions.arch.num_tokens
    total = float(selector.overhead_macs)
    flat = table.combo_index(torch.tensor(indices))
    for t, combo in enumerate(flat.tolist()):
        total += float(table.cost[t, n, combo])
        n = int(table.n_out[t, n, combo])
    return total


def schedules(selector: Selector, budget_gflops: float) -> list[Schedule]:
    """The maximal static schedules within the budget (see the module docstring)."""
    actions = selector.actions
    S = actions.num_stages
    w_dims = actions.num_width_dims
    width_sizes = actions.sizes[:w_dims]
    keep_sizes = actions.sizes[w_dims:]
    limit = budget_gflops * 1e9 + 1e-6
    per_stage_widths = list(itertools.product(*(range(n) for n in width_sizes)))

    def indices_of(widths: tuple[tuple[int, ...], ...], keep: tuple[int, ...]) -> list[tuple[int, ...]]:
        out = []
        for t in range(S):
            on = actions.active(t)
            out.append(tuple(widths[t]) + tuple(k if on[w_dims + d] else actions.fixed_index(w_dims + d) for d, k in enumerate(keep)))
        return out

    def fits(widths, keep) -> bool:
        return _cost(selector, indices_of(widths, keep)) <= limit

    def richer(widths, keep):
        for t in range(S):
            for d in range(w_dims):
                if widths[t][d] + 1 < width_sizes[d]:
                    w = list(widths)
                    w[t] = tuple(v + (1 if i == d else 0) for i, v in enumerate(widths[t]))
                    yield tuple(w), keep
        for d in range(len(keep_sizes)):
            if keep[d] + 1 < keep_sizes[d]:
                yield widths, tuple(v + (1 if i == d else 0) for i, v in enumerate(keep))

    if len(per_stage_widths) ** S > MAX_WIDTH_SCHEDULES:  # separate widths: the same choice in every stage
        width_schedules = [(w,) * S for w in per_stage_widths]
    else:
        width_schedules = list(itertools.product(per_stage_widths, repeat=S))
    out = []
    for widths in width_schedules:
        for keep in itertools.product(*(range(n) for n in keep_sizes)):
            if not fits(widths, keep) or any(fits(w, k) for w, k in richer(widths, keep)):
                continue
            idx = indices_of(widths, keep)
            sub, plan = actions.compose([actions.decision(i) for i in idx])
            out.append(Schedule(tuple(idx), sub, plan, _cost(selector, idx)))
    return out


def best_schedule(
    meta: MetaViT,
    selector: Selector,
    budget_gflops: float,
    images: tuple[Tensor, Tensor],
    first_images: int = 64,
    eta: int = 3,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
) -> SearchResult | None:
    """The best maximal static schedule by Top-1 on ``images``; None when none fits."""
    cands = schedules(selector, budget_gflops)
    if not cands:
        return None
    return rank(meta, cands, images, first_images, eta, batch_size, progress)


def warm_start(selector: Selector, schedule: Schedule, strength: float) -> None:
    """Set the actor's per-stage prior so that its initial choice in stage ``t`` is the
    schedule's (each chosen logit +``strength``); PPO explores deviations from there."""
    prior = selector.policy.actor.stage_prior
    with torch.no_grad():
        for t, idx in enumerate(schedule.indices):
            offset = 0
            for d, size in enumerate(selector.actions.sizes):
                prior[t, offset + idx[d]] += strength
                offset += size


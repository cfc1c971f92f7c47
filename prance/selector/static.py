"""The selector's warm start: the best *static* schedule of its action space at the
budget -- the same decisions for every image -- found by successive halving
(:func:`prance.static_search.rank`) on held-out images.

With ``SelectorConfig.static_anchor`` (the default) the action space is first given an
anchor: the best static configuration of the selector's own strategy
(:func:`prance.static_search.search`, at the budget less what the selector itself costs),
whose token plan becomes a per-stage choice; :func:`anchor_schedule` is that
configuration as a schedule, a candidate for the warm start beside the grid schedules
below. So the warm start is never worse (on the images it is ranked on) than the best
static configuration of the strategy the selector is for.

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

import contextlib
import contextvars
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from prance.models.meta import MetaViT
from prance.models.subnet import SubNet
from prance.selector.selector import Selector
from prance import flops
from prance.errors import PranceError
from prance.halving import Halving
from prance.static_search import SearchResult, StaticConfig, num_levels, rank, search
from prance.tokens.strategies import StrategyConfig
from prance.tokens.state import TokenPlan


MAX_WIDTH_SCHEDULES = 10_000  # per-stage width combinations enumerated at most

# How find_anchor runs its static search: prance.static_search.search, or what a caller
# puts in its place (a sweep trial shares the search of its (strategy, budget) combo).
_ANCHOR_SEARCH: contextvars.ContextVar[Callable] = contextvars.ContextVar("anchor_search", default=search)


@contextlib.contextmanager
def anchor_searches(fn: Callable) -> Iterator[None]:
    """Within the block, :func:`find_anchor` calls ``fn`` with
    :func:`prance.static_search.search`'s arguments instead of it (e.g. a search shared by
    the trials of a sweep that would run the very same one)."""
    token = _ANCHOR_SEARCH.set(fn)
    try:
        yield
    finally:
        _ANCHOR_SEARCH.reset(token)


@dataclass(frozen=True)
class Schedule:
    """One static schedule: per stage, an index per action dimension."""

    indices: tuple[tuple[int, ...], ...]
    subnet: SubNet
    plan: TokenPlan
    macs: float  # per image, the selector's own cost included
    label: str = ""  # what it is, where the indices do not say it (the anchor's static configuration)

    @property
    def gflops(self) -> float:
        return self.macs / 1e9

    def describe(self) -> str:
        return self.label or " | ".join(",".join(map(str, idx)) for idx in self.indices)

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


def anchor_schedule(selector: Selector, config: StaticConfig) -> Schedule | None:
    """The static configuration ``config`` as a schedule of ``selector``'s anchored action
    space (its width levels as width choices, the anchor's token operations in every
    stage); None when the action space cannot express it (other stages, another anchor)."""
    actions = selector.actions
    space = actions.space
    if actions.anchor_plan is None or actions.anchor.name != config.strategy.name:
        return None
    if [s for s, _ in actions.stages] != list(space.stage_starts):
        return None
    top = num_levels(space) - 1

    def at(n: int, level: int) -> int:
        return round(level * (n - 1) / top) if top else 0

    w_dims = actions.num_width_dims
    indices = []
    for level in config.levels:
        widths = (level,) if actions.joint else tuple(at(len(d.choices), level) for d in actions.dims[:w_dims])
        keeps = tuple(actions.fixed_index(d) for d in range(w_dims, w_dims + actions.num_keep_dims))
        indices.append((*widths, *keeps, 1))
    sub, plan = actions.compose([actions.decision(i) for i in indices])
    if sub != config.subnet or [op is None for op in plan.ops] != [op is None for op in config.plan.ops]:
        return None
    return Schedule(tuple(indices), sub, plan, _cost(selector, indices), f"static {config.describe()}")


def find_anchor(
    meta: MetaViT,
    make: Callable[[StrategyConfig | None], Selector],
    budget_gflops: float,
    images: tuple[Tensor, Tensor],
    *,
    halving: Halving = Halving(),
    batch_size: int = 256,
) -> tuple[Selector, Schedule, SearchResult] | None:
    """The best static configuration of the selector's strategy that the selector can run
    within ``budget_gflops`` -- its own cost included: its policy, and the patch embedding
    at the full width it reads before it picks one -- as (the selector ``make(anchor)``
    builds around it, its schedule, the search); None when no configuration fits or the
    action space cannot express it. ``make(None)`` is the selector without an anchor."""
    plain = make(None)
    arch, space = meta.arch, meta.space
    margin = plain.overhead_macs + flops.embed_macs(arch, arch.embed_dim) - flops.embed_macs(arch, min(space.embed))
    for _ in range(3):  # the anchor's own dimension makes the policy a little dearer: re-search if it no longer fits
        try:
            found = _ANCHOR_SEARCH.get()(meta, budget_gflops - margin / 1e9, images, [plain.actions.strategy],
                                         halving=halving, batch_size=batch_size)
        except PranceError:
            return None
        selector = make(found.best.strategy)
        sched = anchor_schedule(selector, found.best)
        if sched is None:
            return None
        if sched.macs <= budget_gflops * 1e9 + 1e-6:
            return selector, sched, found
        margin += sched.macs - budget_gflops * 1e9
    return None


def schedules(selector: Selector, budget_gflops: float) -> list[Schedule]:
    """The maximal static schedules within the budget (see the module docstring)."""
    actions = selector.actions
    S = actions.num_stages
    w_dims = actions.num_width_dims
    width_sizes = actions.sizes[:w_dims]
    keep_sizes = actions.sizes[w_dims : w_dims + actions.num_keep_dims]
    grid = (0,) if actions.anchor is not None else ()  # the keep grid, not the anchor's plan
    limit = budget_gflops * 1e9 + 1e-6
    per_stage_widths = list(itertools.product(*(range(n) for n in width_sizes)))

    def indices_of(widths: tuple[tuple[int, ...], ...], keep: tuple[int, ...]) -> list[tuple[int, ...]]:
        out = []
        for t in range(S):
            on = actions.active(t)
            out.append(tuple(widths[t]) + tuple(k if on[w_dims + d] else actions.fixed_index(w_dims + d) for d, k in enumerate(keep)) + grid)
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
    *,
    halving: Halving = Halving(),
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    extra: list[Schedule] = (),
) -> SearchResult | None:
    """The best of the maximal static schedules and ``extra`` ones by Top-1 on
    ``images``; None when none fits."""
    cands = [*extra, *schedules(selector, budget_gflops)]
    if not cands:
        return None
    return rank(meta, cands, images, halving=halving, batch_size=batch_size, progress=progress)


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


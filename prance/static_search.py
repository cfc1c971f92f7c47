"""The best *static* configuration of a meta-network at a budget: the baseline a user
would pick instead of an adaptive selector.

A static configuration is one sub-network (a width level per stage, the selector's
stages: heads, MLP width and embedding width move together, as the selector's
``joint_widths`` does) and one training-free token strategy with its parameter
calibrated (:func:`prance.budget.calibrate`) to the budget left by those widths. Every
image runs the same configuration.

The space is searched exhaustively as AutoFormer/OFA do over a cost table: every
width-level combination x every strategy is enumerated and calibrated analytically
(instant), then the candidates are ranked on validation images by *successive halving*
(Jamieson & Talwalkar 2016, settings :class:`Halving`): all of them on the first
``first_images`` images, the best ``1/eta`` on ``eta`` times as many, and so on until one
remains, which is then scored on every validation image. Images are evaluated incrementally (a survivor never re-runs an
image), so the cost is about ``candidates x first_images x log_eta(candidates)`` forwards
instead of ``candidates x images``. With ``first_images >= len(val)`` the search is
exhaustive: every candidate on every validation image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from prance import flops
from prance.budget import calibrate
from prance.errors import PranceError
from prance.halving import Halving, successive_halving
from prance.models.meta import MetaViT
from prance.models.subnet import SubNet, SubnetSpace
from prance.tokens.state import TokenPlan
from prance.tokens.strategies import PARAM_OF, STRATEGIES, StrategyConfig, build_plan, check_strategy
from prance.device import of as device_of


@dataclass(frozen=True)
class StaticConfig:
    """One static configuration: width level per stage, a calibrated token strategy."""

    levels: tuple[int, ...]  # width level per stage (0 = narrowest)
    strategy: StrategyConfig
    subnet: SubNet
    plan: TokenPlan
    report: flops.FlopsReport

    @property
    def gflops(self) -> float:
        return self.report.gflops

    def describe(self) -> str:
        """``widths=0,0,1,2 merge r=3`` -- short enough for a table cell."""
        text = f"widths={','.join(map(str, self.levels))} {self.strategy.name}"
        param = PARAM_OF[self.strategy.name]
        if param is not None:
            text += f" {param}={self.strategy.param_value:.4g}"
        return text

    def to_dict(self) -> dict:
        return {
            "levels": list(self.levels),
            "strategy": self.strategy.name,
            "params": dict(self.plan.params),
            "subnet": self.subnet.to_dict(),
            "gflops": self.gflops,
            "token_ratio": self.report.token_ratio,
            "final_token_ratio": self.report.final_token_ratio,
            "description": self.describe(),
        }


def parse(text: str, meta: MetaViT, base: StrategyConfig | None = None) -> StaticConfig:
    """The inverse of :meth:`StaticConfig.describe`: ``"widths=0,0,1,2 merge r=6"`` ->
    the configuration on ``meta`` (its sub-network, token plan and FLOPs report).

    ``base`` carries the strategy settings a description leaves out (reduction blocks,
    ToMe schedule, PPT threshold, fusion, proportional attention); the sweep uses the
    defaults. describe() prints ``keep`` to 4 significant digits: a value that reads
    exactly as one of the keep ratios calibration chooses from (k / patches) is that
    ratio, so a sweep row's configuration is rebuilt exactly. PranceError, one line,
    for anything that does not parse or does not fit ``meta``."""
    from prance.budget import candidates as param_candidates
    from prance.tokens.strategies import build_plan

    example = "e.g. 'widths=0,0,1,2 merge r=6'"
    words = str(text).split()
    if len(words) not in (2, 3) or not words[0].startswith("widths="):
        raise PranceError(f"configuration {text!r} is not 'widths=L,L,.. STRATEGY [PARAM=VALUE]' ({example})")
    stages, top = len(meta.space.stage_starts), num_levels(meta.space) - 1
    try:
        levels = tuple(int(v) for v in words[0][len("widths="):].split(","))
    except ValueError:
        raise PranceError(f"configuration {text!r}: widths must be comma-separated width levels ({example})") from None
    if len(levels) != stages or any(not 0 <= lv <= top for lv in levels):
        raise PranceError(f"configuration {text!r}: widths needs {stages} levels in 0..{top} (one per stage) on this meta-network")
    name = words[1]
    if name not in STRATEGIES:
        raise PranceError(f"configuration {text!r}: unknown token strategy {name!r}: choose from {', '.join(STRATEGIES)}")
    param = PARAM_OF[name]
    base = base or StrategyConfig()
    cfg = StrategyConfig(**{**base.__dict__, "name": name, "r": None, "keep": None})
    if len(words) == 3:
        key, _, raw = words[2].partition("=")
        if param is None or key != param:
            wanted = f"takes {param}=VALUE" if param else "takes no parameter"
            raise PranceError(f"configuration {text!r}: strategy {name!r} {wanted}")
        try:
            value: float = float(raw)
        except ValueError:
            raise PranceError(f"configuration {text!r}: {key} must be a number, got {raw!r}") from None
        if param == "r":
            if value != int(value):
                raise PranceError(f"configuration {text!r}: r must be an integer, got {raw!r}")
            value = int(value)
        else:  # undo describe()'s rounding when the text is one of calibration's keep ratios
            value = next((c for c in param_candidates(cfg, meta.arch) if f"{c:.4g}" == f"{value:.4g}"), value)
        cfg = cfg.with_param(value)
    sub = level_subnet(meta.space, levels)
    plan = build_plan(cfg, meta.arch)  # PranceError on a parameter out of range
    return StaticConfig(levels, cfg, sub, plan, flops.count(meta.arch, sub, plan))


def num_levels(space: SubnetSpace) -> int:
    return max(len(space.heads), len(space.mlp), len(space.embed))


def level_subnet(space: SubnetSpace, levels: tuple[int, ...]) -> SubNet:
    """The sub-network of one width level per stage. Level ``l`` of ``L`` picks, in each
    choice list, the entry at the same relative position (the l-th smallest when every
    list has ``L`` entries)."""
    top = num_levels(space) - 1

    def pick(choices: tuple[int, ...], level: int) -> int:
        return choices[round(level * (len(choices) - 1) / top) if top else 0]

    stage_of = [space.stage_of(i) for i in range(space.depth)]
    heads = [pick(space.heads, levels[stage_of[i]]) for i in range(space.depth)]
    mlp = [pick(space.mlp, levels[stage_of[i]]) for i in range(space.depth)]
    embed = [pick(space.embed, lv) for lv in levels]
    return space.make(heads, mlp, embed)


def full(meta: MetaViT) -> StaticConfig:
    """The full sub-network (the widest level in every stage), no token reduction."""
    levels = (num_levels(meta.space) - 1,) * len(meta.space.stage_starts)
    sub = level_subnet(meta.space, levels)
    cfg = StrategyConfig()
    plan = build_plan(cfg, meta.arch)
    return StaticConfig(levels, cfg, sub, plan, flops.count(meta.arch, sub, plan))


def width_grid(space: SubnetSpace, uniform_only: bool = False) -> list[tuple[int, ...]]:
    """Every width-level combination over the stages (only the uniform ones with
    ``uniform_only``), widest first."""
    levels = range(num_levels(space) - 1, -1, -1)
    stages = len(space.stage_starts)
    if uniform_only:
        return [(lv,) * stages for lv in levels]
    return list(itertools.product(levels, repeat=stages))


def candidates(
    meta: MetaViT,
    budget_gflops: float,
    strategies: Iterable[str] = STRATEGIES,
    uniform_only: bool = False,
    base: StrategyConfig | None = None,
) -> list[StaticConfig]:
    """Every static configuration within the budget: each width-level combination with
    each strategy calibrated to it (``none`` when the widths alone fit). Configurations
    that come out identical (same sub-network and token parameters) are listed once."""
    base = base or StrategyConfig()
    out: list[StaticConfig] = []
    seen: set = set()
    for levels in width_grid(meta.space, uniform_only):
        sub = level_subnet(meta.space, levels)
        for name in strategies:
            cfg = StrategyConfig(**{**base.__dict__, "name": check_strategy(name), "r": None, "keep": None})
            try:
                c = calibrate(cfg, meta.arch, budget_gflops, sub)
            except PranceError:  # this strategy cannot bring these widths into the budget
                continue
            key = (sub, c.config.name, tuple(sorted(c.plan.params.items())))
            if key in seen:
                continue
            seen.add(key)
            out.append(StaticConfig(levels, c.config, sub, c.plan, c.report))
    return out


@dataclass
class SearchResult:
    best: StaticConfig
    top1: float  # on every validation image
    ranked: list[tuple[StaticConfig, float, int]] = field(default_factory=list)  # (config, top1 %, images seen), best first
    forwards: int = 0  # images pushed through the meta-network
    candidates: int = 0

    def to_dict(self) -> dict:
        return {
            "best": self.best.to_dict(),
            "val_top1": self.top1,
            "candidates": self.candidates,
            "forwards": self.forwards,
            "ranked": [{**c.to_dict(), "top1": t, "images": n} for c, t, n in self.ranked[:10]],
        }


def search(
    meta: MetaViT,
    budget_gflops: float,
    val: tuple[Tensor, Tensor],
    strategies: Iterable[str] = STRATEGIES,
    uniform_only: bool = False,
    *,
    halving: Halving = Halving(),
    batch_size: int = 256,
    base: StrategyConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """The best static configuration at ``budget_gflops`` by Top-1 on ``val`` (x, y)."""
    strategies = list(strategies)
    cands = candidates(meta, budget_gflops, strategies, uniform_only, base)
    if not cands:
        raise PranceError(
            f"no static configuration of strategies {', '.join(strategies)} fits {budget_gflops:.4g} GFLOPs on this meta-network"
        )
    return rank(meta, cands, val, halving=halving, batch_size=batch_size, progress=progress)


@torch.inference_mode()
def rank(
    meta: MetaViT,
    cands: list,
    val: tuple[Tensor, Tensor],
    *,
    halving: Halving = Halving(),
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Successive halving over ``cands`` (anything with ``subnet``, ``plan`` and
    ``gflops``) on the images ``val``; ties go to the cheaper candidate."""
    meta.eval()
    x, y = val
    dev = device_of(meta)
    forwards = 0

    def correct_on(c: int, start: int, stop: int) -> int:
        nonlocal forwards
        cfg = cands[c]
        hits = 0
        for i in range(start, stop, batch_size):
            j = min(stop, i + batch_size)
            hits += int((meta(x[i:j].to(dev), cfg.subnet, cfg.plan).argmax(dim=-1).cpu() == y[i:j]).sum())
        forwards += stop - start
        return hits

    def on_round(alive: int, images: int) -> None:
        if progress is not None:
            progress(f"static search: {alive} candidate(s) on {images} image(s)")

    order, correct, seen = successive_halving(
        len(cands), x.shape[0], correct_on, halving, tie_break=lambda c: cands[c].gflops, on_round=on_round
    )
    ranked = [(cands[c], 100.0 * correct[c] / seen[c], seen[c]) for c in order]
    best, top1, _ = ranked[0]
    return SearchResult(best, top1, ranked, forwards, len(cands))

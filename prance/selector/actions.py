"""The selector's action space: what it decides at each decision point, and the exact
cost of every decision (a table built once with the analytic FLOPs counter).

A decision before stage ``t`` picks, for the blocks of that stage, the active heads and
MLP width (shared by the stage's blocks), the embedding width, and the token keep
ratio(s) of the strategy for the stage's first block (none for stage 0). Each choice is a
small categorical *dimension*; a decision is one index per dimension (a *combo*).
By default the widths move together (``joint_widths``: one "width level" picks the
l-th smallest heads, MLP width and embedding width): 3 levels instead of 27 width
combos per stage, so that greedy schedules repeat across images (grouped execution
needs few distinct schedules per batch) and PPO learns from far fewer episodes
(docs/selector.md has the measurements).

Because every token operation is count-deterministic, the MACs of a stage depend only on
the tokens entering it and the combo. :class:`CostTable` holds them for every token count,
plus the cheapest way to finish from any stage -- which is what lets the selector mask
decisions that would make the per-image budget unreachable.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from prance import flops
from prance.errors import PranceError
from prance.models.arch import ArchSpec
from prance.models.subnet import SubNet, SubnetSpace
from prance.tokens.merge import merge_keep_op
from prance.tokens.strategies import REGISTRY, SELECTOR_STRATEGIES, StrategyConfig, build_plan
from prance.tokens.prune import prune_op
from prance.tokens.state import TokenOp, TokenPlan, chain

@dataclass(frozen=True)
class Dim:
    name: str
    choices: tuple


def token_op(strategy: str, keeps: tuple[float, ...], num_prefix: int) -> TokenOp | None:
    if all(k >= 1.0 for k in keeps):
        return None
    return REGISTRY[strategy].selector_op(keeps, num_prefix)


@dataclass(frozen=True)
class StageDecision:
    heads: int
    mlp: int
    embed: int
    keeps: tuple[float, ...]
    static: bool = False  # the anchor plan's token operations instead of ``keeps``


class ActionSpace:
    """Stages, dimensions and their choices for one meta-network and strategy."""

    def __init__(
        self,
        arch: ArchSpec,
        space: SubnetSpace,
        strategy: str,
        decision_blocks: list[int] | tuple[int, ...],
        *,
        joint_widths: bool = True,
        merge_spread: bool = False,
        anchor: StrategyConfig | None = None,
    ):
        if strategy not in SELECTOR_STRATEGIES:
            raise PranceError(f"the selector supports strategies {', '.join(SELECTOR_STRATEGIES)}; got {strategy!r}")
        blocks = [int(b) for b in decision_blocks]
        if not blocks or any(not 0 < b < arch.depth for b in blocks) or sorted(set(blocks)) != blocks:
            raise PranceError(f"decision blocks {blocks} must be increasing, distinct and within 1..{arch.depth - 1}")
        if REGISTRY[strategy].needs_class_token and not arch.has_class_token:
            raise PranceError(f"strategy {strategy!r} ranks tokens by class-token attention; this model has no class token")
        self.arch, self.space, self.strategy = arch, space, strategy
        self.merge_spread = merge_spread and REGISTRY[strategy].spread_merge
        starts = [0] + blocks
        self.stages: list[tuple[int, int]] = list(zip(starts, starts[1:] + [arch.depth]))
        grids = REGISTRY[strategy].selector_grids  # one keep grid, or (prune, merge)
        keep_dims = [Dim("keep", grids[0])] if len(grids) == 1 else [Dim("keep_prune", grids[0]), Dim("keep_merge", grids[1])]
        self.joint = joint_widths and len(space.heads) == len(space.mlp) == len(space.embed)
        if self.joint:  # one width level: the l-th smallest heads, MLP and embedding together
            widths = (Dim("width", tuple(zip(space.heads, space.mlp, space.embed))),)
        else:
            widths = (Dim("heads", space.heads), Dim("mlp", space.mlp), Dim("embed", space.embed))
        self.num_width_dims = len(widths)
        self.dims: tuple[Dim, ...] = (*widths, *keep_dims)
        self.num_keep_dims = len(keep_dims)
        self.anchor = anchor
        self.anchor_plan = None
        if anchor is not None:
            if anchor.name != strategy:
                raise PranceError(f"the anchor of a {strategy!r} selector must be a {strategy!r} configuration, got {anchor.name!r}")
            self.anchor_plan = build_plan(anchor, arch)
            self.dims = (*self.dims, Dim("static", (False, True)))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(d.choices) for d in self.dims)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def active(self, stage: int) -> tuple[bool, ...]:
        """Which dimensions stage ``stage`` decides: stage 0 has no keep choice (PRANCE
        reduces tokens at the later stages' first blocks), except the merge keep with
        ``merge_spread``, whose merging may start in block 0 as ToMe's does."""

        def decided(d: Dim) -> bool:
            if stage > 0 or not d.name.startswith("keep"):
                return True
            return self.merge_spread and d.name in ("keep", "keep_merge")

        return tuple(decided(d) for d in self.dims)

    def fixed_index(self, dim: int) -> int:
        """The index an inactive dimension takes: keep 1.0 (the last choice)."""
        return len(self.dims[dim].choices) - 1

    def decision(self, idx: tuple[int, ...] | list[int]) -> StageDecision:
        vals = [d.choices[int(i)] for d, i in zip(self.dims, idx)]
        static = bool(vals.pop()) if self.anchor is not None else False
        if self.joint:
            vals = [*vals[0], *vals[1:]]
        return StageDecision(vals[0], vals[1], vals[2], tuple(vals[3:]), static)

    def stage_ops(self, stage: int, dec: StageDecision) -> list[TokenOp | None]:
        start, stop = self.stages[stage]
        ops: list[TokenOp | None] = [None] * (stop - start)
        p = self.arch.num_prefix_tokens
        if dec.static:
            return list(self.anchor_plan.ops[start:stop])
        if self.merge_spread:
            # the stage's merge keep is spread over its blocks: each merges to keep**(1/L)
            # of the patches entering it, so the stage leaves about `keep` of them (ToMe-like)
            merge_keep = dec.keeps[-1]
            if len(dec.keeps) > 1 and dec.keeps[0] < 1.0:  # a prune keep before the merge keep
                ops[0] = prune_op(dec.keeps[0], p)
            if merge_keep < 1.0:
                per_block = merge_keep ** (1.0 / (stop - start))
                for i in range(stop - start):
                    merge = merge_keep_op(per_block, p)
                    ops[i] = merge if ops[i] is None else chain("prune_merge", ops[i], merge)
            return ops
        if stage > 0:
            ops[0] = token_op(self.strategy, dec.keeps, p)
        return ops

    def compose(self, decisions: list[StageDecision]) -> tuple[SubNet, TokenPlan]:
        """The sub-network and token plan one image ran, from its per-stage decisions."""
        heads, mlp, embed, ops = [], [], [], []
        for t, dec in enumerate(decisions):
            start, stop = self.stages[t]
            heads += [dec.heads] * (stop - start)
            mlp += [dec.mlp] * (stop - start)
            embed += [dec.embed] * (stop - start)
            ops += self.stage_ops(t, dec)
        return SubNet(tuple(heads), tuple(mlp), tuple(embed)), TokenPlan(tuple(ops), name=self.strategy)

    def combos(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*(range(s) for s in self.sizes)))

    def signature(self) -> dict:
        return {
            "strategy": self.strategy,
            "joint_widths": self.joint,
            "merge_spread": self.merge_spread,
            "stages": [list(s) for s in self.stages],
            "dims": {d.name: [list(c) if isinstance(c, tuple) else c for c in d.choices] for d in self.dims},
            **({"anchor": anchor_dict(self.anchor)} if self.anchor is not None else {}),
        }


def anchor_dict(cfg: StrategyConfig) -> dict:
    """An anchor as plain JSON data (selector checkpoints store it; :func:`anchor_of` reads it)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}


def anchor_of(data: dict | None) -> StrategyConfig | None:
    if data is None:
        return None
    try:
        return StrategyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(data).items()})
    except (TypeError, ValueError):
        raise PranceError(f"not an anchor configuration: {data!r}") from None


class CostTable:
    """MACs per image of every (stage, tokens entering, combo), the tokens leaving, and
    the cheapest completion from each stage.

    Stage 0 counts the stem and the patch projection at the *full* width (the selector
    reads the full-width embedding before it picks a width), the last stage the
    classifier. ``cont_rest[t][n][combo]`` is the cost of finishing after stage ``t``
    with that combo's channels and no further token reduction (the Result-to-Go
    continuation, see :mod:`prance.selector.reward`).
    """

    def __init__(self, actions: ActionSpace):
        a = actions.arch
        self.actions = actions
        n0 = a.num_tokens
        combos = actions.combos()
        self.combos = torch.tensor(combos, dtype=torch.long)
        c = len(combos)
        S = actions.num_stages
        self.cost = torch.zeros(S, n0 + 1, c, dtype=torch.float64)
        self.n_out = torch.zeros(S, n0 + 1, c, dtype=torch.long)
        dense = TokenPlan.dense(a.depth)
        decisions = [actions.decision(k) for k in combos]
        for t, (start, stop) in enumerate(actions.stages):
            done: dict[tuple, int] = {}  # decisions that run the same operations (static ignores the keeps)
            for j, dec in enumerate(decisions):
                key = (dec.heads, dec.mlp, dec.embed, None if dec.static else dec.keeps, dec.static)
                if key in done:
                    self.cost[t, :, j] = self.cost[t, :, done[key]]
                    self.n_out[t, :, j] = self.n_out[t, :, done[key]]
                    continue
                done[key] = j
                sub = SubNet((dec.heads,) * a.depth, (dec.mlp,) * a.depth, (dec.embed,) * a.depth)
                ops = [None] * a.depth
                ops[start:stop] = actions.stage_ops(t, dec)
                plan = TokenPlan(tuple(ops))
                for n in range(a.num_prefix_tokens + 1, n0 + 1):
                    macs, counts = flops.span_macs(a, sub, plan, start, stop, n)
                    if t == 0:
                        macs += flops.embed_macs(a, a.embed_dim)
                    if t == S - 1:
                        macs += flops.head_macs(a, dec.embed)
                    self.cost[t, n, j] = macs
                    self.n_out[t, n, j] = counts[-1]
        # cheapest completion after stage t entered with n tokens (min over later combos)
        self.min_rest = torch.zeros(S + 1, n0 + 1, dtype=torch.float64)
        for t in range(S - 1, -1, -1):
            total = self.cost[t] + self.min_rest[t + 1].gather(0, self.n_out[t].clamp(min=0).flatten()).view(n0 + 1, c)
            self.min_rest[t] = total.min(dim=1).values
        # the Result-to-Go continuation after stage t: the stage's channels for every
        # later block, no further token reduction (indexed by the tokens *leaving* stage t)
        self.cont_rest = torch.zeros(S, n0 + 1, c, dtype=torch.float64)
        for t, (_, stop) in enumerate(actions.stages[:-1]):
            done = {}  # the continuation depends on the widths only
            for j, dec in enumerate(decisions):
                key = (dec.heads, dec.mlp, dec.embed)
                if key in done:
                    self.cont_rest[t, :, j] = self.cont_rest[t, :, done[key]]
                    continue
                done[key] = j
                sub = SubNet((dec.heads,) * a.depth, (dec.mlp,) * a.depth, (dec.embed,) * a.depth)
                for n in range(a.num_prefix_tokens + 1, n0 + 1):
                    macs, _ = flops.span_macs(a, sub, dense, stop, a.depth, n)
                    self.cont_rest[t, n, j] = macs + flops.head_macs(a, dec.embed)
        self.full_macs = float(flops.count(a).macs)
        self.min_macs = float(self.min_rest[0, n0])

    def combo_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Flat combo index of per-dimension indices (B, dims)."""
        flat = torch.zeros(idx.shape[0], dtype=torch.long)
        for d, s in enumerate(self.actions.sizes):
            flat = flat * s + idx[:, d]
        return flat

    def feasible(self, stage: int, n_in: int, spent: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        """(B, *sizes) bool: the combos after which each image's budget stays reachable,
        given the MACs it has ``spent`` (B,); where none is, the cheapest combo(s)."""
        rest = self.cost[stage, n_in] + self.min_rest[stage + 1].gather(0, self.n_out[stage, n_in])
        ok = (spent.double()[:, None] + rest[None, :]) <= budgets.double()[:, None] + 1e-6
        none = ~ok.any(dim=1)
        if none.any():
            ok[none] = (rest == rest.min())[None, :]
        return ok.view(-1, *self.actions.sizes)

"""Mid-network escalation with feature reuse: the probe of issue 35, part 3.

A cheap static configuration runs up to a stage boundary; there the head reads the class
token and gives a confidence (:func:`prance.cascade.confidence`). A sure image finishes
the cheap configuration; an unsure one continues *from the same tokens* at a wider
uniform width level, without any further token reduction (a *continuation*). Unlike a
re-run cascade (:mod:`prance.cascade`), the prefix is paid once.

An escalated image's path is itself one sub-network with one token plan (the cheap
configuration's widths and token operations before the boundary, the continuation's
widths and no token operation after it), :func:`continuation`. Its cost is exact and per
image: the prefix, the head at the boundary, and the suffix it ran (:func:`split_macs`,
from :mod:`prance.flops`'s per-block counter).

:func:`probe` records, for every boundary and continuation, the final logits of both
suffixes from one run of the prefix; :func:`choose` then picks boundary, continuation and
threshold on validation images by Top-1 with the mean GFLOPs within a budget (the rule of
:func:`prance.cascade.choose`), and :func:`apply` gives the choice's per-image answers
and costs on other images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prance import flops
from prance.budget import within
from prance.cascade import THRESHOLDS, confidence
from prance.device import of as device_of
from prance.errors import PranceError
from prance.models import engine
from prance.models.arch import ArchSpec
from prance.models.meta import MetaViT
from prance.models.subnet import SubNet
from prance.static_search import StaticConfig, level_subnet, num_levels
from prance.tokens.state import TokenPlan, TokenState

ALWAYS = float("inf")  # a threshold every image is below: escalate them all


@dataclass(frozen=True)
class Path:
    """The cheap configuration up to block ``boundary``, then width ``level`` in every
    later stage with no token operation: the sub-network and plan an escalated image runs."""

    boundary: int
    level: int
    subnet: SubNet
    plan: TokenPlan

    def describe(self) -> str:
        return f"after block {self.boundary}: widths={self.level} (no reduction)"


def boundaries(meta: MetaViT) -> tuple[int, ...]:
    """The stage boundaries inside the network (the space's stage starts but block 0)."""
    return tuple(b for b in meta.space.stage_starts if 0 < b < meta.arch.depth)


def continuation(meta: MetaViT, cheap: StaticConfig, boundary: int, level: int) -> Path:
    """``cheap`` before ``boundary`` (a stage start), uniform width ``level`` after it,
    the token operations after it dropped (merged tokens keep their sizes and the plan's
    proportional attention)."""
    starts = meta.space.stage_starts
    if boundary not in boundaries(meta):
        raise PranceError(f"escalation boundary {boundary} is not a stage boundary of this meta-network ({boundaries(meta)})")
    if not 0 <= level < num_levels(meta.space):
        raise PranceError(f"width level {level} outside 0..{num_levels(meta.space) - 1}")
    stage = starts.index(boundary)
    levels = tuple(cheap.levels[:stage]) + (level,) * (len(starts) - stage)
    depth = meta.arch.depth
    plan = TokenPlan(tuple(cheap.plan.ops[:boundary]) + (None,) * (depth - boundary), cheap.plan.prop_attn,
                     f"{cheap.plan.name}+escalate", dict(cheap.plan.params))
    return Path(boundary, level, level_subnet(meta.space, levels), plan)


def split_macs(arch: ArchSpec, subnet: SubNet, plan: TokenPlan, boundary: int) -> tuple[int, int]:
    """MACs per image of (embedding + blocks before ``boundary``, blocks from it + head):
    together :func:`prance.flops.count`'s total."""
    head, counts = flops.span_macs(arch, subnet, plan, 0, boundary, arch.num_tokens)
    tail, _ = flops.span_macs(arch, subnet, plan, boundary, arch.depth, counts[-1])
    return (flops.embed_macs(arch, subnet.embed[0]) + head, tail + flops.head_macs(arch, subnet.embed[-1]))


def decision_macs(arch: ArchSpec, subnet: SubNet, boundary: int) -> int:
    """The head's MACs at the boundary (on the residual stream's width there)."""
    return flops.head_macs(arch, subnet.embed[boundary - 1])


@dataclass(frozen=True)
class Costs:
    """GFLOPs per image of each way through, with the boundary's head counted."""

    cheap: Tensor  # (B,): prefix + head at boundary b + the cheap suffix
    wide: Tensor  # (B, K): prefix + head at boundary b + continuation k
    always: Tensor  # (B, K): prefix + continuation k, no decision (every image escalates)


def costs(meta: MetaViT, cheap: StaticConfig, paths: list[list[Path]]) -> Costs:
    """:class:`Costs` of ``paths[b][k]`` (boundary b, continuation k)."""
    arch = meta.arch
    cheap_rows, wide_rows, always_rows = [], [], []
    for row in paths:
        b = row[0].boundary
        prefix, cheap_tail = split_macs(arch, cheap.subnet, cheap.plan, b)
        decide = decision_macs(arch, cheap.subnet, b)
        cheap_rows.append((prefix + decide + cheap_tail) / 1e9)
        tails = [split_macs(arch, p.subnet, p.plan, b)[1] for p in row]
        wide_rows.append([(prefix + decide + t) / 1e9 for t in tails])
        always_rows.append([(prefix + t) / 1e9 for t in tails])
    return Costs(*(torch.tensor(v, dtype=torch.float64) for v in (cheap_rows, wide_rows, always_rows)))


@dataclass(frozen=True)
class Probe:
    """Logits of every way through, on the same images."""

    cheap: Tensor  # (n, classes): the cheap configuration's own answer
    boundary: Tensor  # (n, B, classes): the head on the class token at each boundary
    wide: Tensor  # (n, B, K, classes): prefix to boundary b, continuation k

    def confidence(self) -> Tensor:
        """(n, B) top-1 softmax probability at each boundary."""
        return confidence(self.boundary)


@torch.inference_mode()
def probe(meta: MetaViT, cheap: StaticConfig, paths: list[list[Path]], x: Tensor, batch_size: int = 256) -> Probe:
    """:class:`Probe` of ``paths[b][k]`` on the images ``x``: the cheap prefix runs once per
    batch, boundary to boundary; every continuation starts from its boundary's tokens."""
    meta.eval()
    dev = device_of(meta)
    parts = [_probe_batch(meta, cheap, paths, x[i : i + batch_size].to(dev)) for i in range(0, x.shape[0], batch_size)]
    return Probe(*(torch.cat([p[j] for p in parts]) for j in range(3)))


def _probe_batch(meta: MetaViT, cheap: StaticConfig, paths: list[list[Path]], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    vit, done = meta.vit, 0
    state = TokenState(engine.embed(vit, x, cheap.subnet.embed[0]), None, meta.arch.num_prefix_tokens)
    at, wide = [], []
    for row in paths:
        b = row[0].boundary
        state = engine.run_blocks(vit, state, cheap.subnet, cheap.plan, done, b)
        done = b
        at.append(engine.head(vit, state).float().cpu())
        wide.append(torch.stack([_finish(vit, state, p.subnet, p.plan, b) for p in row], dim=1))
    return _finish(vit, state, cheap.subnet, cheap.plan, done), torch.stack(at, dim=1), torch.stack(wide, dim=1)


def _finish(vit, state: TokenState, subnet: SubNet, plan: TokenPlan, start: int) -> Tensor:
    return engine.head(vit, engine.run_blocks(vit, state, subnet, plan, start, len(vit.blocks))).float().cpu()


@dataclass(frozen=True)
class Choice:
    boundary: int  # index into the probed boundaries
    level: int  # index into the probed continuations
    threshold: float  # escalate when the boundary's confidence is below (0: never, inf: always)
    top1: float  # % on the images it was chosen on
    gflops: float  # mean per image there
    escalated: float  # share of those images


def apply(p: Probe, c: Costs, b: int, k: int, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, GFLOPs, escalated) per image of escalating at boundary ``b`` to
    continuation ``k`` below ``threshold``; with ``ALWAYS`` no head is run at the boundary."""
    if threshold == ALWAYS:
        n = p.cheap.shape[0]
        return p.wide[:, b, k], c.always[b, k].expand(n).clone(), torch.ones(n, dtype=torch.bool)
    up = p.confidence()[:, b] < threshold
    logits = torch.where(up[:, None], p.wide[:, b, k], p.cheap)
    return logits, torch.where(up, c.wide[b, k], c.cheap[b]), up


def choose(p: Probe, c: Costs, y: Tensor, budget_gflops: float, thresholds=THRESHOLDS) -> Choice | None:
    """The boundary, continuation and threshold with the best Top-1 on ``y`` whose mean
    GFLOPs are within ``budget_gflops``; ties go to the cheaper mean. Never (threshold 0)
    and always escalating (:data:`ALWAYS`) are choices too. None when nothing fits."""
    ts = torch.tensor(sorted({0.0, *map(float, thresholds)}), dtype=torch.float64)
    right_cheap = (p.cheap.argmax(-1) == y).double()
    right_wide = (p.wide.argmax(-1) == y[:, None, None]).double()  # (n, B, K)
    conf = p.confidence()
    best, key = None, None
    for b in range(p.wide.shape[1]):
        up = conf[:, b, None] < ts[None, :]  # (n, T)
        share = up.double().mean(0)
        for k in range(p.wide.shape[2]):
            top1 = torch.where(up, right_wide[:, b, k, None], right_cheap[:, None]).mean(0)
            mean = c.cheap[b] + share * (c.wide[b, k] - c.cheap[b])
            cands = [(float(top1[i]), float(mean[i]), float(ts[i]), float(share[i])) for i in range(len(ts))]
            cands.append((float(right_wide[:, b, k].mean()), float(c.always[b, k]), ALWAYS, 1.0))
            for top, g, t, s in cands:
                if within(g, budget_gflops) and (key is None or (top, -g) > key):
                    best, key = Choice(b, k, t, 100.0 * top, g, s), (top, -g)
    return best

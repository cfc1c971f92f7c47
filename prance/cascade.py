"""A confidence cascade of a meta-network's static configurations: per-image adaptivity
without training, the baseline to beat for a selector that spends more on hard images.

Every image first runs the cheapest *rung* (a static configuration,
:mod:`prance.static_search`); while the answer's top softmax probability is below the
rung's threshold, the image runs the next rung too, whose answer is taken. An image costs
the GFLOPs of every rung it ran, so a cascade meets its budget on average over images (a
*mean* budget), not on every image. With two rungs this is the big/little scheme of Park
et al. (2015, "Big/little deep neural network for ultra low power inference"); with
more it is the confidence cascade of Jitkrittum et al. (NeurIPS 2023, "When does
confidence-based cascade deferral suffice?"), on the configurations of one
weight-sharing meta-network. Each pass starts from the image again (no features are
reused: the probes in docs/benchmarks.md found that continuing a narrow prefix wider
does not help this supernet).

:func:`search` picks the cascade for a budget on validation images: a ladder of static
configurations (the best static configuration at several multiples of the budget, and the
full sub-network), every rung's logits on the validation images, then every chain of up to
``max_rungs`` rungs in GFLOPs order and its thresholds (:func:`choose`, exhaustive and
cheap once the logits exist) by Top-1 with the mean GFLOPs within the budget. Never
escalating is one of the choices, so on validation the cascade is never below the best
static configuration at the budget.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from prance import flops, static_search
from prance.budget import spread, within
from prance.device import of as device_of, synchronize
from prance.errors import PranceError
from prance.halving import Halving
from prance.models.meta import MetaViT
from prance.static_search import StaticConfig
from prance.tokens.strategies import STRATEGIES

RUNGS = (0.5, 0.65, 0.8, 1.0, 1.6, 2.5, 4.0)  # ladder budgets as multiples of the cascade's budget
THRESHOLDS = tuple(round(0.3 + 0.01 * i, 2) for i in range(71))  # top-1 softmax probability, 0.30 .. 1.00
MAX_RUNGS = 3


def ladder_problem(rungs: Sequence[float], strategies: Sequence[str], max_rungs: int) -> str | None:
    """What is wrong with a ladder's settings, or None: one rule for ``search-cascade``'s
    flags and the sweep's ``cascade:`` settings. A rung or strategy listed twice, or more
    rungs per chain than :func:`choose` searches, would otherwise be accepted and do the
    same as without it."""
    from prance.tokens.strategies import STRATEGIES

    rungs = [float(r) for r in rungs]
    if not rungs:
        return "the ladder needs at least one rung (a multiple of the budget)"
    if min(rungs) <= 0:
        return f"rungs are positive multiples of the budget, got {rungs}"
    if len(set(rungs)) != len(rungs):
        return f"a rung is listed twice in {rungs}"
    if not strategies:
        return "the ladder needs at least one token strategy"
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        return f"unknown token strategy {unknown[0]!r}: choose from {', '.join(STRATEGIES)}"
    if len(set(strategies)) != len(strategies):
        return f"a strategy is listed twice in {list(strategies)}"
    if not 1 <= max_rungs <= MAX_RUNGS:
        return f"max_rungs must be in 1..{MAX_RUNGS} (a chain runs at most {MAX_RUNGS} configurations), got {max_rungs}"
    return None


@dataclass(frozen=True)
class Cascade:
    rungs: tuple[StaticConfig, ...]  # cheapest first
    thresholds: tuple[float, ...]  # one per rung but the last: go on past rung i when its top-1 probability is below

    def __post_init__(self):
        if len(self.thresholds) != len(self.rungs) - 1 or not self.rungs:
            raise ValueError(f"{len(self.rungs)} rungs need {len(self.rungs) - 1} thresholds, got {len(self.thresholds)}")

    @classmethod
    def pair(cls, cheap: StaticConfig, expensive: StaticConfig, threshold: float) -> "Cascade":
        return cls((cheap, expensive), (threshold,))

    @property
    def cheap(self) -> StaticConfig:
        return self.rungs[0]

    def costs(self) -> list[float]:
        """GFLOPs of an image that stops after rung i (the rungs it ran, summed)."""
        return list(itertools.accumulate(c.gflops for c in self.rungs))

    def describe(self) -> str:
        used = self.used()
        if len(used.rungs) == 1:
            return f"{used.cheap.describe()} {NEVER}"
        return ARROW.join([used.rungs[0].describe()] + [f"[p<{threshold_text(t)}] {c.describe()}" for c, t in zip(used.rungs[1:], used.thresholds)])

    def used(self) -> "Cascade":
        """The rungs an image can reach: a threshold of 0 ends the chain there."""
        k = next((i for i, t in enumerate(self.thresholds) if t <= 0), len(self.thresholds))
        return Cascade(self.rungs[: k + 1], self.thresholds[:k])

    def to_dict(self) -> dict:
        return {"rungs": [c.to_dict() for c in self.rungs], "thresholds": list(self.thresholds), "description": self.describe()}


NEVER = "(never escalates)"
ARROW = " -> "


def threshold_text(t: float) -> str:
    """A threshold as ``describe`` prints it: two decimals (the search's grid), or in full
    where two decimals would change it, so that :func:`parse` gives the same cascade back."""
    short = f"{t:.2f}"
    return short if float(short) == t else repr(float(t))


def is_cascade(text: str) -> bool:
    """Whether ``text`` describes a cascade (:meth:`Cascade.describe`) rather than one static configuration."""
    s = str(text).strip()
    return ARROW.strip() in s or "[p<" in s or s.endswith(NEVER)  # a half-typed chain is read (and refused) as a cascade


def parse(text: str, meta: MetaViT, base=None) -> Cascade:
    """The inverse of :meth:`Cascade.describe` (exact, thresholds included): ``"<rung 1> -> [p<0.71] <rung 2> -> [p<0.50] <rung 3>"``
    or ``"<rung 1> (never escalates)"``; each rung as :func:`prance.static_search.parse` reads it."""
    import re

    s = str(text).strip()
    if s.endswith(NEVER):
        return Cascade((static_search.parse(s[: -len(NEVER)].strip(), meta, base),), ())
    parts = [p.strip() for p in s.split(ARROW.strip())]
    shape = (f"cascade {text!r} is not '<configuration> -> [p<threshold] <configuration> ...' "
             "(as search-cascade and the sweep print it)")
    rungs, thresholds = [static_search.parse(parts[0], meta, base)], []
    for part in parts[1:]:
        m = re.fullmatch(r"\[p<([^\]]+)\]\s+(.+)", part.strip())
        if m is None:
            raise PranceError(shape)
        try:
            t = float(m.group(1))
        except ValueError:
            raise PranceError(f"cascade {text!r}: threshold {m.group(1)!r} is not a number") from None
        if not 0 < t <= 1:
            raise PranceError(f"cascade {text!r}: a threshold must be in (0, 1], got {t}")
        thresholds.append(t)
        rungs.append(static_search.parse(m.group(2), meta, base))
    if len(rungs) < 2:
        raise PranceError(shape)
    return Cascade(tuple(rungs), tuple(thresholds))


def confidence(logits: Tensor) -> Tensor:
    """Each image's top-1 softmax probability (float64: thresholds compare the same way
    wherever they are applied)."""
    return logits.float().softmax(-1).amax(-1).double()


def escalates(logits: Tensor, threshold: float) -> Tensor:
    """Which images go on to the next rung: top-1 probability < ``threshold``."""
    return confidence(logits) < threshold


@torch.inference_mode()
def logits_of(meta: MetaViT, config: StaticConfig, x: Tensor, batch_size: int = 256) -> Tensor:
    """``config``'s logits on the images ``x`` (float32, on the CPU)."""
    meta.eval()
    dev = device_of(meta)
    return torch.cat([meta(x[i : i + batch_size].to(dev), config.subnet, config.plan).float().cpu()
                      for i in range(0, x.shape[0], batch_size)])


@torch.inference_mode()
def chain(rungs: Sequence[Callable[[Tensor], Tensor]], thresholds: Sequence[float], x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, passes) of a cascade whose rungs are functions images -> logits (a
    meta-network's configurations, exported modules): every image runs the first rung;
    while an image's answer is unsure (:func:`escalates`) it runs the next rung too, whose
    logits are taken. ``passes`` is how many rungs each image ran."""
    logits = rungs[0](x).float()
    passes = torch.ones(x.shape[0], dtype=torch.long)
    active = torch.ones(x.shape[0], dtype=torch.bool)
    for rung, t in zip(rungs[1:], thresholds):
        active = active & escalates(logits, t)
        if not bool(active.any()):
            break
        logits[active] = rung(x[active]).float()
        passes[active] += 1
    return logits, passes


def forward(meta: MetaViT, cascade: Cascade, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(logits, passes) of ``cascade`` on the meta-network, for the images ``x``: each rung
    runs only on the images still unsure after the one before."""
    fns = [lambda xs, c=c: logits_of(meta, c, xs, batch_size) for c in cascade.rungs]
    return chain(fns, cascade.thresholds, x)


def evaluate(meta: MetaViT, cascade: Cascade, x: Tensor, y: Tensor, batch_size: int = 256) -> dict:
    """Top-1 (%), GFLOPs per image (mean, p95, max), the share of images that went past the
    first rung, the token ratios of the rung that answered (mean over images) and images/s
    of the cascade run batch by batch (each rung on the images of the batch that reach it)."""
    dev = device_of(meta)
    correct = 0
    seconds = 0.0
    passes = []
    for i in range(0, x.shape[0], batch_size):
        synchronize(dev)
        t0 = time.perf_counter()
        logits, p = forward(meta, cascade, x[i : i + batch_size], batch_size)
        synchronize(dev)
        seconds += time.perf_counter() - t0
        correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
        passes.append(p)
    n = x.shape[0]
    if n == 0:
        raise PranceError("no images to evaluate the cascade on")
    p = torch.cat(passes)
    cost = torch.tensor(cascade.costs(), dtype=torch.float64)[p - 1]
    answered = [cascade.rungs[int(k) - 1].report for k in p]  # the rung whose answer an image got
    out = {"top1": 100.0 * correct / n, **spread(cost.tolist()), "escalated": float((p > 1).double().mean()),
           "token_ratio": sum(r.token_ratio for r in answered) / n, "final_token_ratio": sum(r.final_token_ratio for r in answered) / n,
           "throughput_img_s": n / seconds, "n_images": n}
    out.update({f"reached_rung_{k + 1}": float((p > k).double().mean()) for k in range(1, len(cascade.rungs))})
    return out


@dataclass(frozen=True)
class Choice:
    rungs: tuple[int, ...]  # ladder indices, cheapest first
    thresholds: tuple[float, ...]
    top1: float  # %
    gflops: float  # mean per image
    escalated: float  # share of the images that went past the first rung

    @property
    def cheap(self) -> int:
        return self.rungs[0]


def choose(logits: Tensor, y: Tensor, costs: Sequence[float], budget_gflops: float,
           thresholds: Iterable[float] = THRESHOLDS, max_rungs: int = MAX_RUNGS) -> Choice | None:
    """The best chain of up to ``max_rungs`` ladder rungs (GFLOPs increasing) and its
    thresholds, by Top-1 on ``y`` with the mean GFLOPs <= ``budget_gflops``; ties go to the
    cheaper mean. ``logits`` is (images, rungs, classes), ``costs`` each rung's GFLOPs. A
    rung alone (never escalating) is a choice too. Three-rung chains search every second
    threshold (the grid squared is large). ``None`` when no rung fits."""
    n, k, _ = logits.shape
    if len(costs) != k:
        raise ValueError(f"{k} rungs of logits but {len(costs)} costs")
    right = (logits.argmax(-1) == y[:, None]).double()  # (n, k)
    conf = confidence(logits)  # (n, k)
    c = [float(v) for v in costs]
    ts = torch.tensor(sorted(set(float(t) for t in thresholds)), dtype=torch.float64)
    best: Choice | None = None

    def consider(rungs: tuple, ths: Tensor, top1: Tensor, gflops: Tensor, share: Tensor) -> None:
        """Candidates of one chain of rungs, one per row of ``ths`` (their thresholds)."""
        nonlocal best
        ok = gflops <= budget_gflops * (1 + 1e-9)
        if not bool(ok.any()):
            return
        top = torch.where(ok, top1, torch.tensor(-1.0, dtype=torch.float64)).max()  # best Top-1, then the cheaper mean
        i = int(torch.where(ok & (top1 == top), gflops, torch.tensor(float("inf"), dtype=torch.float64)).argmin())
        cand = Choice(rungs, tuple(float(t) for t in ths[i]), 100.0 * float(top1[i]), float(gflops[i]), float(share[i]))
        if best is None or (cand.top1, -cand.gflops) > (best.top1, -best.gflops):
            best = cand

    one = torch.zeros(1, 0, dtype=torch.float64)
    for i in range(k):
        consider((i,), one, right[:, i].mean().view(1), torch.tensor([c[i]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    if max_rungs < 2 or len(ts) == 0:
        return best
    for i, j in itertools.combinations(range(k), 2):
        if c[j] <= c[i]:
            continue
        up = conf[:, i, None] < ts[None, :]  # (n, T)
        top1 = torch.where(up, right[:, j, None], right[:, i, None]).mean(0)
        share = up.double().mean(0)
        consider((i, j), ts[:, None], top1, c[i] + share * c[j], share)
    if max_rungs < 3:
        return best
    ts3 = ts[::2]
    t0, t1 = torch.meshgrid(ts3, ts3, indexing="ij")
    grid = torch.stack([t0.reshape(-1), t1.reshape(-1)], dim=1)  # (T*T, 2)
    for i, j, l in itertools.combinations(range(k), 3):
        if not c[i] < c[j] < c[l]:
            continue
        up0 = conf[:, i, None] < ts3[None, :]  # (n, T): past rung i
        past_j = conf[:, j, None] < ts3[None, :]  # (n, T): rung j unsure
        up1 = up0[:, :, None] & past_j[:, None, :]  # (n, T, T): past rung j
        mid = torch.where(up0, right[:, j, None], right[:, i, None])  # (n, T)
        top1 = torch.where(up1, right[:, l, None, None], mid[:, :, None]).mean(0).reshape(-1)
        s0 = up0.double().mean(0)[:, None].expand(-1, len(ts3)).reshape(-1)
        s1 = up1.double().mean(0).reshape(-1)
        consider((i, j, l), grid, top1, c[i] + s0 * c[j] + s1 * c[l], s0)
    return best


def ladder(meta: MetaViT, budget_gflops: float, val: tuple[Tensor, Tensor], rungs: Iterable[float] = RUNGS,
           strategies: Iterable[str] = STRATEGIES, *, halving: Halving = Halving(), batch_size: int = 256,
           progress: Callable[[str], None] | None = None, full: bool = True, uniform_only: bool = False) -> list[StaticConfig]:
    """The best static configuration at each ``rung x budget_gflops`` (capped at the full
    sub-network's GFLOPs; rungs below the cheapest configuration skipped) and, with
    ``full``, the full sub-network itself; duplicates dropped, cheapest first.
    ``uniform_only``: each rung searches the same width level in every stage only."""
    dense = flops.gflops(meta.arch)
    strategies = list(strategies)
    out: dict[str, StaticConfig] = {}
    if full:
        widest = static_search.full(meta)
        out[widest.describe()] = widest
    for rung in sorted(set(float(r) for r in rungs)):
        if rung <= 0:
            raise PranceError(f"cascade rungs are positive multiples of the budget, got {rung:g}")
        target = min(rung * budget_gflops, dense)
        try:
            found = static_search.search(meta, target, val, strategies, uniform_only, halving=halving,
                                         batch_size=batch_size, progress=progress)  # a line per halving round
        except PranceError:  # nothing fits this rung
            continue
        out.setdefault(found.best.describe(), found.best)
        if progress is not None:
            progress(f"cascade ladder: {rung:g} x budget -> {found.best.describe()} ({found.top1:.2f}%)")
    return sorted(out.values(), key=lambda c: c.gflops)


@dataclass
class CascadeResult:
    best: Cascade
    top1: float  # on every validation image
    gflops: float  # mean per validation image
    escalated: float  # share of the validation images
    static: StaticConfig  # the best single rung within the budget (never escalating)
    static_top1: float
    ladder: list[StaticConfig] = field(default_factory=list)
    margin: float = 0.0  # the share of the budget held back so the mean holds on unseen images

    def to_dict(self) -> dict:
        return {"best": self.best.to_dict(), "val_top1": self.top1, "val_gflops": self.gflops,
                "val_escalated": self.escalated, "static": self.static.to_dict(), "static_val_top1": self.static_top1,
                "ladder": [c.describe() for c in self.ladder], "margin": self.margin}


MARGINS = tuple(round(0.02 * i, 2) for i in range(11))  # shares of the budget held back, 0 .. 20%


def fit_margin(logits: Tensor, y: Tensor, costs: Sequence[float], budget_gflops: float,
               thresholds: Iterable[float] = THRESHOLDS, max_rungs: int = MAX_RUNGS) -> float:
    """The least share of the budget to hold back so that a cascade chosen on one half of
    the validation images keeps its mean GFLOPs within the budget on the other half (and
    the other way round): the thresholds are fitted on images, and on new images the
    share that escalates drifts."""
    n = logits.shape[0]
    halves = (torch.arange(n) % 2 == 0, torch.arange(n) % 2 == 1)
    thresholds = list(thresholds)
    for m in MARGINS:
        ok = True
        for fit, check in (halves, halves[::-1]):
            c = choose(logits[fit], y[fit], costs, budget_gflops * (1 - m), thresholds, max_rungs)
            if c is None:
                return m
            if not within(_mean_cost(logits[check], costs, c), budget_gflops):
                ok = False
                break
        if ok:
            return m
    return MARGINS[-1]


def _mean_cost(logits: Tensor, costs: Sequence[float], c: Choice) -> float:
    """Mean GFLOPs per image of the chain ``c`` on images whose ladder logits are ``logits``."""
    conf = confidence(logits)
    active = torch.ones(logits.shape[0], dtype=torch.bool)
    total = torch.full((logits.shape[0],), float(costs[c.rungs[0]]), dtype=torch.float64)
    for prev, nxt, t in zip(c.rungs[:-1], c.rungs[1:], c.thresholds):
        active = active & (conf[:, prev] < t)
        total += active.double() * float(costs[nxt])
    return float(total.mean())


def search(meta: MetaViT, budget_gflops: float, val: tuple[Tensor, Tensor], strategies: Iterable[str] = STRATEGIES,
           rungs: Iterable[float] = RUNGS, thresholds: Iterable[float] = THRESHOLDS, *, halving: Halving = Halving(),
           batch_size: int = 256, progress: Callable[[str], None] | None = None, max_rungs: int = MAX_RUNGS,
           configs: list[StaticConfig] | None = None, margin: bool = True, logits: Tensor | None = None) -> CascadeResult:
    """The best cascade at ``budget_gflops`` (mean GFLOPs per image) by Top-1 on ``val``.
    ``configs``: a ladder already computed (:func:`ladder`), shared by callers that need
    the same one; ``logits``: that ladder's logits on ``val`` (n, rungs, classes), when the
    caller has them; ``margin``: hold back the share of the budget :func:`fit_margin` finds."""
    x, y = val
    strategies, rungs = list(strategies), list(rungs)  # both used twice below
    if 1.0 not in rungs:
        rungs.append(1.0)  # the best static configuration at the budget is always a rung
    if configs is None:
        configs = ladder(meta, budget_gflops, val, rungs, strategies, halving=halving, batch_size=batch_size, progress=progress)
    if not any(within(c.gflops, budget_gflops) for c in configs):
        raise PranceError(f"no static configuration of strategies {', '.join(strategies)} fits "
                          f"{budget_gflops:.4g} GFLOPs on this meta-network: no cascade either")
    if logits is None:
        logits = torch.stack([logits_of(meta, c, x, batch_size) for c in configs], dim=1)
    costs = [c.gflops for c in configs]
    thresholds = list(thresholds)
    alone = choose(logits, y, costs, budget_gflops, thresholds=(), max_rungs=1)
    if progress is not None:
        progress(f"cascade: choosing among chains of up to {max_rungs} of the {len(configs)} ladder rungs"
                 + (", with a margin fitted on halves of the validation images" if margin else ""))
    held = fit_margin(logits, y, costs, budget_gflops, thresholds, max_rungs) if margin else 0.0
    best = choose(logits, y, costs, budget_gflops * (1 - held), thresholds, max_rungs) or alone
    if best.top1 < alone.top1:  # the margin cost more than escalating gains: the best rung alone
        best, held = alone, 0.0
    cascade = Cascade(tuple(configs[i] for i in best.rungs), best.thresholds)
    return CascadeResult(cascade, best.top1, best.gflops, best.escalated, configs[alone.cheap], alone.top1, configs, held)

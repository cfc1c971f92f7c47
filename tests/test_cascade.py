"""The confidence cascade (``prance.cascade``): the pair-and-threshold choice against brute
force, the execution against its two configurations run alone, and the search against the
best static configuration, on a micro meta-network and real Fashion-MNIST images."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from prance import cascade, flops, static_search
from prance.halving import Halving
from prance.data import FASHION_MNIST_SPEC, fashion_mnist

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not installed in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def micro(decisive_micro):
    return decisive_micro


@pytest.fixture(scope="module")
def images():
    return fashion_mnist("test", FASHION_MNIST_SPEC).batch(list(range(90)))


def test_choose_is_the_brute_force_optimum_within_the_budget():
    g = torch.Generator().manual_seed(0)
    n, k, classes = 50, 3, 4
    logits = torch.randn(n, k, classes, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    costs, budget, thresholds = [1.0, 2.0, 4.0], 2.2, [0.3, 0.5, 0.7, 0.9]
    best = None  # image by image, every rung alone and every (cheap, expensive, threshold)
    for i, j, t in [(i, i, 0.0) for i in range(k)] + list(itertools.product(range(k), range(k), thresholds)):
        if j != i and costs[j] <= costs[i]:
            continue
        right = cost = 0.0
        for m in range(n):
            p = logits[m, i].softmax(-1).max()
            up = j != i and bool(p < t)
            right += float(logits[m, j if up else i].argmax() == y[m])
            cost += costs[i] + (costs[j] if up else 0.0)
        top1, mean = 100.0 * right / n, cost / n
        if mean <= budget and (best is None or (top1, -mean) > (best[0], -best[1])):
            best = (top1, mean)
    got = cascade.choose(logits, y, costs, budget, thresholds, max_rungs=2)
    assert got is not None and (got.top1, got.gflops) == pytest.approx(best)
    assert got.gflops <= budget and got.gflops == pytest.approx(costs[got.cheap] + got.escalated * costs[got.rungs[-1]] * (len(got.rungs) > 1))
    alone = cascade.choose(logits, y, costs, budget, thresholds=())  # no escalation: the best rung that fits
    assert len(alone.rungs) == 1 and costs[alone.cheap] <= budget and got.top1 >= alone.top1
    assert cascade.choose(logits, y, costs, 0.5, thresholds) is None  # nothing fits


def _brute_chain(logits, y, costs, rungs, ths):
    """Top-1 (%) and mean GFLOPs of a chain, image by image."""
    right = cost = 0.0
    for m in range(len(y)):
        k = 0
        cost_m = costs[rungs[0]]
        while k < len(ths) and bool(logits[m, rungs[k]].softmax(-1).max() < ths[k]):
            k += 1
            cost_m += costs[rungs[k]]
        right += float(logits[m, rungs[k]].argmax() == y[m])
        cost += cost_m
    return 100.0 * right / len(y), cost / len(y)


def test_three_rung_choice_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(1)
    n, k, classes = 40, 4, 3
    logits = torch.randn(n, k, classes, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    costs, budget = [1.0, 1.5, 2.5, 4.0], 2.0
    thresholds = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # three-rung chains use every second one: 0.4, 0.6, 0.8
    best = None
    chains = [((i,), ()) for i in range(k)]
    chains += [((i, j), (t,)) for i, j in itertools.combinations(range(k), 2) for t in thresholds]
    chains += [((i, j, l), (t0, t1)) for i, j, l in itertools.combinations(range(k), 3)
               for t0 in thresholds[::2] for t1 in thresholds[::2]]
    for rungs, ths in chains:
        top1, mean = _brute_chain(logits, y, costs, rungs, ths)
        if mean <= budget * (1 + 1e-9) and (best is None or (top1, -mean) > (best[0], -best[1])):
            best = (top1, mean)
    got = cascade.choose(logits, y, costs, budget, thresholds, max_rungs=3)
    assert (got.top1, got.gflops) == pytest.approx(best)
    assert _brute_chain(logits, y, costs, got.rungs, got.thresholds) == pytest.approx((got.top1, got.gflops))


def test_the_margin_keeps_the_mean_within_the_budget_on_the_other_half():
    g = torch.Generator().manual_seed(2)
    n, classes = 400, 5
    logits = torch.randn(n, 3, classes, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    costs, budget = [1.0, 2.0, 6.0], 1.6
    m = cascade.fit_margin(logits, y, costs, budget)
    halves = (torch.arange(n) % 2 == 0, torch.arange(n) % 2 == 1)
    for fit, check in (halves, halves[::-1]):
        c = cascade.choose(logits[fit], y[fit], costs, budget * (1 - m))
        assert cascade._mean_cost(logits[check], costs, c) <= budget * (1 + 1e-9)


@needs_fmnist
def test_run_answers_with_the_expensive_configuration_exactly_where_the_cheap_one_is_unsure(micro, images):
    x, y = images
    dense = flops.gflops(micro.arch)
    cands = static_search.candidates(micro, dense, ["none", "merge"])
    cheap, expensive = min(cands, key=lambda c: c.gflops), max(cands, key=lambda c: c.gflops)
    lo, hi = cascade.logits_of(micro, cheap, x), cascade.logits_of(micro, expensive, x)
    t = float(lo.softmax(-1).amax(-1).median())  # about half the images escalate
    c = cascade.Cascade.pair(cheap, expensive, t)
    out, passes = cascade.forward(micro, c, x, batch_size=32)
    up = passes > 1
    assert 0 < int(up.sum()) < len(y) and torch.equal(up, cascade.escalates(lo, t))
    assert torch.allclose(out[~up], lo[~up], atol=1e-5) and torch.allclose(out[up], hi[up], atol=1e-5)
    m = cascade.evaluate(micro, c, x, y, batch_size=32)
    assert m["escalated"] == pytest.approx(float(up.float().mean()))
    assert m["gflops"] == pytest.approx(cheap.gflops + m["escalated"] * expensive.gflops)
    assert m["gflops_max"] == pytest.approx(cheap.gflops + expensive.gflops) and m["gflops_p95"] <= m["gflops_max"]
    assert m["top1"] == pytest.approx(100.0 * float((out.argmax(-1) == y).float().mean())) and m["n_images"] == len(y)
    never, p0 = cascade.forward(micro, cascade.Cascade.pair(cheap, expensive, 0.0), x)
    assert not bool((p0 > 1).any()) and torch.allclose(never, lo, atol=1e-5)


@needs_fmnist
def test_search_is_never_below_the_best_static_configuration_on_validation(micro, images):
    x, _ = images
    widest = max(static_search.candidates(micro, flops.gflops(micro.arch), ["none"]), key=lambda c: c.gflops)
    y = cascade.logits_of(micro, widest, x).argmax(-1)  # labels only the widest gets all right: escalating pays
    budget = 0.5 * flops.gflops(micro.arch)
    found = cascade.search(micro, budget, (x, y), ["none", "merge"], rungs=(0.6, 2.0), halving=Halving(first_images=30), margin=False)
    static = static_search.search(micro, budget, (x, y), ["none", "merge"], halving=Halving(first_images=30))
    assert found.static.describe() == static.best.describe() and found.static_top1 == pytest.approx(static.top1)
    assert found.top1 >= found.static_top1 and found.gflops <= budget * (1 + 1e-9)
    assert [c.gflops for c in found.ladder] == sorted(c.gflops for c in found.ladder) and len(found.ladder) >= 2
    m = cascade.evaluate(micro, found.best, x, y)  # the chosen cascade, re-run, gives what the search saw
    assert m["top1"] == pytest.approx(found.top1) and m["gflops"] == pytest.approx(found.gflops)

"""Mid-network escalation (``prance.escalation``): the prefix + cheap suffix is the cheap
configuration itself (its logits and its GFLOPs), prefix + continuation is the escalated
path's own sub-network run from the image, and the choice is the brute-force optimum."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from prance import cascade, escalation, flops, static_search
from prance.checkpoint import load_checkpoint
from prance.data import fashion_mnist, input_spec_for_model

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not installed in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
CHEAP = "widths=0,0,0,0 merge r=5"  # the cheap configuration (14.8% of dense)


@pytest.fixture(scope="module")
def supernet():
    meta, _ = load_checkpoint("timm:prance_vit_fmnist.supernet")
    return meta.eval()


@pytest.fixture(scope="module")
def setup(supernet):
    cheap = static_search.parse(CHEAP, supernet)
    paths = [[escalation.continuation(supernet, cheap, b, k) for k in (0, 3)] for b in escalation.boundaries(supernet)]
    return cheap, paths


def test_boundaries_are_the_inner_stage_starts(supernet):
    assert escalation.boundaries(supernet) == (3, 6, 9)


@needs_fmnist
def test_prefix_and_cheap_suffix_reproduce_the_cheap_configuration(supernet, setup):
    cheap, paths = setup
    x, _ = fashion_mnist("test", input_spec_for_model(supernet.vit)).batch(list(range(12)))
    p = escalation.probe(supernet, cheap, paths, x, batch_size=5)  # batches of 5: the pieces are put back in order
    torch.testing.assert_close(p.cheap, cascade.logits_of(supernet, cheap, x), atol=1e-4, rtol=0)
    for row in paths:  # every continuation from the boundary's tokens = its whole path run from the image
        for path in row:
            own = supernet(x, path.subnet, path.plan).float()
            torch.testing.assert_close(p.wide[:, paths.index(row), row.index(path)], own, atol=1e-4, rtol=0)
    assert p.boundary.shape == (12, 3, 10) and not torch.allclose(p.boundary[:, 0], p.cheap, atol=1e-2)


def test_counted_costs_add_up_to_the_configurations_gflops(supernet, setup):
    cheap, paths = setup
    arch = supernet.arch
    for b in escalation.boundaries(supernet):
        prefix, suffix = escalation.split_macs(arch, cheap.subnet, cheap.plan, b)
        assert prefix + suffix == flops.count(arch, cheap.subnet, cheap.plan).macs
        assert (prefix + suffix) / 1e9 == pytest.approx(flops.gflops(arch, cheap.subnet, cheap.plan), rel=1e-12)
    c = escalation.costs(supernet, cheap, paths)
    for i, row in enumerate(paths):
        head = escalation.decision_macs(arch, cheap.subnet, row[0].boundary) / 1e9
        assert head > 0 and float(c.cheap[i]) == pytest.approx(cheap.gflops + head, rel=1e-12)
        for k, path in enumerate(row):
            assert float(c.always[i, k]) == pytest.approx(flops.gflops(arch, path.subnet, path.plan), rel=1e-12)
            assert float(c.wide[i, k]) == pytest.approx(float(c.always[i, k]) + head, rel=1e-12)
    # after the boundary the full level runs on the merged tokens: dearer than the cheap rest, cheaper than dense
    assert bool((c.always[:, -1] > c.cheap).all()) and bool((c.always[:, -1] < flops.gflops(arch)).all())


def test_choose_is_the_brute_force_optimum_within_the_budget():
    g = torch.Generator().manual_seed(0)
    n, nb, nk, classes = 40, 2, 2, 4
    p = escalation.Probe(torch.randn(n, classes, generator=g) * 2, torch.randn(n, nb, classes, generator=g) * 2,
                         torch.randn(n, nb, nk, classes, generator=g) * 2)
    c = escalation.Costs(torch.tensor([1.1, 1.2], dtype=torch.float64), torch.tensor([[2.1, 3.1], [1.7, 2.2]], dtype=torch.float64),
                         torch.tensor([[2.0, 3.0], [1.6, 2.1]], dtype=torch.float64))
    y = torch.randint(0, classes, (n,), generator=g)
    thresholds, budget = [0.4, 0.6, 0.8], 1.6
    best = None  # image by image
    for b, k, t in itertools.product(range(nb), range(nk), [0.0, *thresholds, escalation.ALWAYS]):
        right = cost = 0.0
        for m in range(n):
            up = t == escalation.ALWAYS or bool(p.boundary[m, b].softmax(-1).max() < t)
            right += float((p.wide[m, b, k] if up else p.cheap[m]).argmax() == y[m])
            cost += float(c.always[b, k] if t == escalation.ALWAYS else (c.wide[b, k] if up else c.cheap[b]))
        if cost / n <= budget and (best is None or (right / n, -cost / n) > (best[0], -best[1])):
            best = (right / n, cost / n, b, k, t)
    got = escalation.choose(p, c, y, budget, thresholds)
    assert got is not None and (got.top1, got.gflops) == pytest.approx((100 * best[0], best[1]))
    logits, cost, up = escalation.apply(p, c, got.boundary, got.level, got.threshold)  # the choice, image by image
    assert 100 * float((logits.argmax(-1) == y).double().mean()) == pytest.approx(got.top1)
    assert float(cost.mean()) == pytest.approx(got.gflops) and float(up.double().mean()) == pytest.approx(got.escalated)
    assert escalation.choose(p, c, y, 1.0, thresholds) is None  # below every path's cost

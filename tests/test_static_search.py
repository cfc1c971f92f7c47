"""The static baselines: successive halving, the search over sub-network widths x
calibrated token strategies against brute force, and the selector's warm start from the
best static schedule of its own action space, anchored at the best static configuration."""

from __future__ import annotations

import pytest
import torch

from prance import flops, static_search
from prance.halving import Halving, successive_halving
from prance.selector.config import SelectorConfig
from prance.selector import static
from prance.selector.selector import Selector
from prance.selector.train import train_selector


@pytest.fixture(scope="module")
def micro(decisive_micro):
    return decisive_micro


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(60, 1, 28, 28, generator=g), torch.randint(0, 10, (60,), generator=g)


def test_successive_halving_keeps_the_best_and_never_reruns_an_image():
    rates = [0.3, 0.9, 0.5, 0.7, 0.1, 0.8, 0.6]
    calls = []

    def correct_on(c, start, stop):
        calls.append((c, start, stop))
        return sum(1 for i in range(start, stop) if (i * 0.618) % 1 < rates[c])

    order, correct, seen = successive_halving(len(rates), 300, correct_on, Halving(first_images=20, eta=3))
    assert order[0] == 1 and seen[1] == 300
    for c in range(len(rates)):  # each candidate's calls cover disjoint, consecutive image ranges
        ranges = [(a, b) for k, a, b in calls if k == c]
        assert ranges[0][0] == 0 and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    assert sum(seen) < len(rates) * 300  # the losers stopped early


def test_every_successive_halving_default_comes_from_halving():
    """The CLI, the selector's warm start and the sweep's static section default to the
    one Halving value (they were written separately, and successive_halving said 128)."""
    from prance.cli import build_parser
    from prance.sweep.config import StaticSearchSettings

    halving = Halving(first_images=7, eta=5)
    assert Halving.of({"first_images": 7, "eta": 5, "uniform_only": True}) == halving
    assert Halving.of({}) == Halving() == SelectorConfig().static_halving
    assert Halving.of(StaticSearchSettings().model_dump()) == Halving()
    for command in ("search-static", "search-cascade"):
        args = build_parser().parse_args([command, "--budget", "50%"])
        assert Halving(args.first_images, args.eta) == Halving()


def test_search_finds_the_brute_force_optimum_on_a_tiny_space(micro, images):
    dense = flops.gflops(micro.arch)
    budget = 0.6 * dense
    cands = static_search.candidates(micro, budget, ["none", "prune", "merge"])
    assert cands and all(c.gflops <= budget for c in cands)
    assert {c.strategy.name for c in cands} >= {"prune", "merge"}
    x, y = images
    with torch.no_grad():
        acc = [float((micro(x, c.subnet, c.plan).argmax(-1) == y).float().mean()) for c in cands]
    top = max(acc)
    # exhaustive (every candidate on every image): the optimum, the cheapest among ties
    found = static_search.search(micro, budget, images, ["none", "prune", "merge"], halving=Halving(first_images=len(y)))
    assert found.top1 == pytest.approx(100 * top)
    assert found.best.gflops == min(c.gflops for c, a in zip(cands, acc) if a == top)
    assert found.forwards == len(cands) * len(y)
    # successive halving sees far fewer images and still returns a fitting configuration
    fast = static_search.search(micro, budget, images, ["none", "prune", "merge"], halving=Halving(first_images=8))
    assert fast.forwards < found.forwards and fast.best.gflops <= budget


def test_level_subnets_span_the_space(micro):
    space = micro.space
    stages = len(space.stage_starts)
    assert static_search.level_subnet(space, (0,) * stages) == space.smallest()
    top = static_search.num_levels(space) - 1
    assert static_search.level_subnet(space, (top,) * stages) == space.largest()
    assert len(static_search.width_grid(space)) == (top + 1) ** stages


@pytest.mark.parametrize("strategy", ["prune", "merge", "prune_merge"])
def test_static_schedules_are_maximal_and_fit(micro, strategy):
    sel = Selector.create(micro, strategy, [1, 2, 3], hidden=16)
    budget = 0.6 * sel.full_gflops()
    cands = static.schedules(sel, budget)
    assert cands
    keys = {c.indices for c in cands}
    for c in cands:
        assert c.gflops <= budget + 1e-12
        # the selector runs exactly this schedule when its actions are forced to it
        assert len(c.indices) == sel.actions.num_stages
    assert len(keys) == len(cands)


def test_warm_started_selector_runs_the_static_schedule_on_every_image(micro, images):
    sel = Selector.create(micro, "prune", [1, 2, 3], hidden=16, seed=2)
    budget = 0.6 * sel.full_gflops()
    found = static.best_schedule(micro, sel, budget, images, halving=Halving(first_images=len(images[1])))
    static.warm_start(sel, found.best, 6.0)
    ep = sel.run_episode(micro, images[0], budget)
    expected = torch.tensor(found.best.indices)
    for i in range(images[0].shape[0]):
        assert torch.equal(ep.actions[i], expected), i
    with torch.no_grad():
        ref = micro(images[0], found.best.subnet, found.best.plan)
    assert torch.allclose(ep.logits, ref, atol=1e-4)


@pytest.mark.parametrize("strategy", ["prune", "merge", "prune_merge"])
def test_anchored_selector_runs_the_best_static_configuration_exactly(micro, images, strategy):
    """The anchor is the best static configuration of the selector's strategy at the
    budget less the selector's own cost; warm started at it, the selector runs exactly
    that configuration on every image (same logits), within the budget."""
    make = lambda anchor: Selector.create(micro, strategy, [1, 2, 3], hidden=16, seed=2, anchor=anchor)  # noqa: E731
    plain = make(None)
    budget = 0.6 * plain.full_gflops()
    sel, sched, found = static.find_anchor(micro, make, budget, images, halving=Halving(first_images=len(images[1])))
    assert sel.actions.anchor == found.best.strategy and sched.label == f"static {found.best.describe()}"
    margin = plain.overhead_macs + flops.embed_macs(micro.arch, micro.arch.embed_dim) - flops.embed_macs(micro.arch, min(micro.space.embed))
    exhaustive = static_search.search(micro, budget - margin / 1e9, images, [strategy], halving=Halving(first_images=len(images[1])))
    assert found.best.describe() == exhaustive.best.describe() and found.top1 == exhaustive.top1
    assert sched.subnet == found.best.subnet and sched.macs <= budget * 1e9
    static.warm_start(sel, sched, 8.0)
    ep = sel.run_episode(micro, images[0], budget)
    assert torch.equal(ep.actions, torch.tensor(sched.indices).expand_as(ep.actions))
    with torch.no_grad():
        ref = micro(images[0], found.best.subnet, found.best.plan)
    assert torch.allclose(ep.logits, ref, atol=1e-4)
    assert torch.allclose(ep.macs, torch.full_like(ep.macs, sched.macs))
    # the grid schedules of the anchored space are still there, with the grid's choice
    assert all(idx[-1] == 0 for c in static.schedules(sel, budget) for idx in c.indices)


def test_anchored_selector_survives_save_and_load(micro, images, tmp_path):
    from prance.selector.store import load_selector, save_selector

    make = lambda anchor: Selector.create(micro, "merge", [1, 2, 3], hidden=16, anchor=anchor)  # noqa: E731
    sel, sched, _ = static.find_anchor(micro, make, 0.6 * make(None).full_gflops(), images, halving=Halving(first_images=16))
    static.warm_start(sel, sched, 8.0)
    save_selector(tmp_path / "s.safetensors", sel)
    back, header = load_selector(tmp_path / "s.safetensors", micro)
    assert back.actions.anchor == sel.actions.anchor and header["actions"]["anchor"]["name"] == "merge"
    budget = sched.gflops
    assert torch.equal(back.run_episode(micro, images[0], budget).logits, sel.run_episode(micro, images[0], budget).logits)


def test_training_that_does_not_beat_the_anchored_warm_start_returns_it(micro, images):
    """As below, with the default anchored warm start: the kept selector is the warm
    start, which is the static configuration when that ranks best."""
    cfg = SelectorConfig(strategy="merge", decision_blocks=[1, 2, 3], hidden=16, iterations=2, rollout_images=32,
                         minibatch=16, ppo_epochs=2, eval_every=1, actor_lr=0.05, warm_start=6.0, static_first_images=60)
    plain = Selector.for_config(micro, cfg)
    budget = 0.6 * plain.full_gflops()
    sel, sched, _ = static.find_anchor(micro, lambda a: Selector.for_config(micro, cfg, a), budget, images, halving=Halving(first_images=60))
    found = static.best_schedule(micro, sel, budget, images, halving=Halving(first_images=60), extra=[sched])
    x, _ = images
    with torch.no_grad():
        y_val = micro(x, found.best.subnet, found.best.plan).argmax(-1)
    result = train_selector(micro, cfg, budget, images, (x, y_val), progress=False, selector=plain)
    assert result.selector.actions.anchor == sel.actions.anchor
    assert result.best["iteration"] == 0 and result.best["top1"] == 100.0
    assert result.best["warm_start"] == found.best.describe()
    ep = result.selector.run_episode(micro, x, budget)
    assert torch.equal(ep.actions, torch.tensor(found.best.indices).expand_as(ep.actions))


def test_training_that_does_not_beat_the_warm_start_returns_it(micro, images):
    """Validation labels are the warm start's own predictions: it scores 100%, so no
    trained policy can beat it and the warm start must come back unchanged."""
    cfg = SelectorConfig(strategy="merge", decision_blocks=[1, 2, 3], hidden=16, iterations=2, rollout_images=32,
                         minibatch=16, ppo_epochs=2, eval_every=1, actor_lr=0.05, warm_start=6.0, static_first_images=60,
                         static_anchor=False)
    sel = Selector.for_config(micro, cfg)
    budget = 0.6 * sel.full_gflops()
    found = static.best_schedule(micro, Selector.for_config(micro, cfg), budget, images, halving=Halving(first_images=60))
    x, _ = images
    with torch.no_grad():
        y_val = micro(x, found.best.subnet, found.best.plan).argmax(-1)
    result = train_selector(micro, cfg, budget, images, (x, y_val), progress=False, selector=sel)
    assert result.best["iteration"] == 0 and result.best["top1"] == 100.0
    assert result.best["warm_start"] == found.best.describe()
    ep = result.selector.run_episode(micro, x, budget)
    assert torch.equal(ep.actions, torch.tensor(found.best.indices).expand_as(ep.actions))

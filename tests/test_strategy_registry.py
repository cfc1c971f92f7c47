"""Every strategy the registry knows runs through the FLOPs counter, evaluation, the
selector (where it has one) and the sweep plan: forgetting a place fails here."""

import pytest
import torch

from prance import flops
from prance.budget import calibrate
from prance.selector.config import SelectorConfig
from prance.sweep.config import SWEEP_STRATEGIES, SweepConfig
from prance.train.config import PretrainConfig
from prance.evaluate import evaluate
from prance.models import create_meta
from prance.selector.actions import ActionSpace
from prance.sweep.plan import plan_sweep
from prance.tokens.strategies import REGISTRY, STRATEGIES, StrategyConfig, build_plan, default_param

REDUCING = [n for n in STRATEGIES if n != "none"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_counts_flops_and_evaluates(name, random_images):
    torch.manual_seed(0)
    meta = create_meta("prance_vit_micro")
    arch = meta.arch
    plan = build_plan(StrategyConfig(name), arch)
    assert plan.name == name
    spec = REGISTRY[name]
    if spec.param:
        assert plan.params == {spec.param: default_param(name, arch)}
    report = flops.count(arch, plan=plan)
    assert (report.gflops < flops.gflops(arch)) == (name != "none")
    x = random_images(meta, n=8)
    result = evaluate(meta, [(x, torch.zeros(8, dtype=torch.long))], plan=plan, progress=False)
    assert result["n_images"] == 8 and result["gflops"] == pytest.approx(report.gflops, rel=1e-6)
    if name != "none":  # calibration finds the strength for a budget
        c = calibrate(StrategyConfig(name), arch, 0.9 * flops.gflops(arch))
        assert c.plan.name == name and c.report.gflops <= 0.9 * flops.gflops(arch) + 1e-9


@pytest.mark.parametrize("name", [n for n, s in REGISTRY.items() if s.selector_grids])
def test_every_selector_strategy_builds_actions_that_reduce_tokens(name, random_images):
    meta = create_meta("prance_vit_micro")
    assert SelectorConfig(strategy=name).strategy == name  # the config accepts it
    actions = ActionSpace(meta.arch, meta.space, name, decision_blocks=(1, 2, 3))
    cheapest = actions.decision([0] * len(actions.sizes))  # index 0: the smallest width and keep
    subnet, plan = actions.compose([cheapest] * actions.num_stages)
    full_width = flops.count(meta.arch, subnet=subnet)
    reduced = flops.count(meta.arch, subnet=subnet, plan=plan)
    assert reduced.token_ratio < 1.0 and reduced.gflops < full_width.gflops
    x = random_images(meta, n=4)
    out = meta(x, subnet, plan)
    assert out.shape == (4, meta.vit.num_classes) and torch.isfinite(out).all()


def test_configs_and_the_sweep_plan_know_every_strategy(micro_checkpoint):
    PretrainConfig(token_strategies=REDUCING)
    for name, spec in REGISTRY.items():
        if spec.training_free:
            assert SWEEP_STRATEGIES[f"free_{name}"] == ("training_free", name)
        if spec.static:
            assert SWEEP_STRATEGIES["static" if name == "none" else f"static_{name}"] == ("static", name)
        if spec.selector_grids:
            assert SWEEP_STRATEGIES[name] == ("selector", name)
    cfg = SweepConfig(checkpoint=str(micro_checkpoint), budgets=["75%"], strategies=list(SWEEP_STRATEGIES),
                      selector={"decision_blocks": [1, 2, 3]})
    plan = plan_sweep(cfg)
    assert {c.strategy for c in plan.combos} == set(SWEEP_STRATEGIES)

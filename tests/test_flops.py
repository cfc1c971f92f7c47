"""The analytic FLOPs counter against FlopCounterMode on real forwards, and the DeiT
reference numbers."""

import pytest
import torch

from prance import flops
from prance.models import create_meta
from prance.tokens import STRATEGIES, StrategyConfig, build_plan


@pytest.fixture(scope="module")
def models():
    return {
        "prance_vit_fmnist": create_meta("prance_vit_fmnist"),
        "deit_tiny_64": create_meta("deit_tiny_patch16_224", img_size=64, num_classes=10),
    }


def test_reference_counts_fused_attention_on_this_torch():
    """torch 2.14 runs scaled_dot_product_attention on CPU as a kernel FlopCounterMode has
    no formula for; the reference must count its two matmuls all the same."""
    b, h, n, d = 2, 3, 17, 8
    q, k, v = (torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with torch.no_grad(), flops.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * b * h * n * n * d)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("model_key", ["prance_vit_fmnist", "deit_tiny_64"])
def test_analytic_counter_agrees_with_flop_counter_mode(models, model_key, name, random_images):
    m = models[model_key]
    plan = build_plan(StrategyConfig(name), m.arch)
    g = torch.Generator().manual_seed(7)
    subnets = [None, m.space.smallest()] + [m.space.sample(g) for _ in range(3)]
    for sub in subnets:
        analytic = flops.gflops(m.arch, sub, plan)
        measured = flops.measured_gflops(m, random_images(m), subnet=sub, plan=plan)
        assert analytic == pytest.approx(measured, rel=0.01), (sub, analytic, measured)


def test_decreasing_tome_schedule_and_fused_prune_are_counted(models, random_images):
    m = models["prance_vit_fmnist"]
    for cfg in [StrategyConfig("merge", r=3, schedule="decreasing"), StrategyConfig("prune", keep=0.5, fuse=True),
                StrategyConfig("merge", r=4, prop_attn=False)]:
        plan = build_plan(cfg, m.arch)
        assert flops.gflops(m.arch, None, plan) == pytest.approx(flops.measured_gflops(m, random_images(m), plan=plan), rel=0.01)


@pytest.mark.parametrize("name,expected", [("deit_tiny_patch16_224", 1.3), ("deit_small_patch16_224", 4.6), ("deit_base_patch16_224", 17.6)])
def test_dense_deit_gflops_match_the_published_tables(name, expected):
    m = create_meta(name)
    assert round(flops.gflops(m.arch), 1) == expected


def test_token_ratios():
    m = create_meta("prance_vit_micro")  # 4 blocks, 16 patches + CLS; reduction blocks 1, 2, 3
    plan = build_plan(StrategyConfig("prune", keep=0.5), m.arch)
    report = flops.count(m.arch, None, plan)
    entering = [17, 17, 9, 5]
    assert report.token_ratio == pytest.approx(sum(entering) / (4 * 17))
    assert report.final_token_ratio == pytest.approx(5 / 17)
    dense = flops.count(m.arch)
    assert dense.token_ratio == 1 and dense.final_token_ratio == 1

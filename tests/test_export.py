"""From a sweep row to a model a user runs (issue 32): configuration strings, sweep rows,
MLflow URIs, exported static modules, ONNX graphs and cascades."""

from __future__ import annotations

import pytest
import torch

from prance import flops, static_search
from prance.errors import PranceError


@pytest.fixture(scope="module")
def micro():
    from prance.models import create_meta

    torch.manual_seed(0)
    return create_meta("prance_vit_micro").eval()


def test_parse_is_the_inverse_of_describe(micro):
    budget = 0.45 * flops.gflops(micro.arch)
    cands = static_search.candidates(micro, budget)
    assert {c.strategy.name for c in cands} >= {"prune", "merge", "prune_merge", "ppt"}
    for c in cands:
        back = static_search.parse(c.describe(), micro)
        assert back.describe() == c.describe()
        assert back.subnet == c.subnet and back.levels == c.levels
        assert back.strategy.param_value == c.strategy.param_value  # exact, not describe's 4 digits
        assert back.plan.token_counts(micro.arch.num_tokens) == c.plan.token_counts(micro.arch.num_tokens)
        assert back.gflops == pytest.approx(c.gflops, rel=1e-12)


@pytest.mark.parametrize("text, words", [
    ("widths=0,0 merge r=2", "levels"),
    ("widths=0,0,1,9 merge r=2", "levels"),
    ("widths=0,0,1,1 tome r=2", "unknown token strategy"),
    ("widths=0,0,1,1 merge keep=0.5", "takes r=VALUE"),
    ("widths=0,0,1,1 none r=3", "takes no parameter"),
    ("widths=0,0,1,1 merge r=99", "r must be an integer in"),
    ("merge r=2", "is not"),
    ("widths=a,b merge", "comma-separated"),
])
def test_bad_configuration_strings_say_what_is_wrong(micro, text, words):
    with pytest.raises(PranceError, match=words) as e:
        static_search.parse(text, micro)
    assert "\n" not in str(e.value)


def test_parse_restores_keep_ratios_that_describe_rounds():
    """49 patches: calibration's keep 22/49 prints as 0.449, and ceil(0.449 * 49) = 23 != 22."""
    from prance.models import create_meta

    meta = create_meta("prance_vit_micro", img_size=49).eval()
    assert meta.arch.num_patches == 49
    cands = [c for c in static_search.candidates(meta, 0.5 * flops.gflops(meta.arch), ["prune"])]
    rounded = [c for c in cands if f"{c.strategy.keep:.4g}" != repr(c.strategy.keep)]
    assert rounded, "no keep ratio that describe() rounds"
    for c in rounded:
        assert static_search.parse(c.describe(), meta).strategy.keep == c.strategy.keep

"""Token strategies: ToMe matching against a brute-force reference, size bookkeeping,
pruning by class attention, PPT's per-image rule, token counts in real forwards, batch
independence, and budget calibration."""

import math

import pytest
import torch

from prance import flops
from prance.budget import calibrate, candidates, parse_budget
from prance.errors import PranceError
from prance.models import create_meta
from prance.tokens import STRATEGIES, StrategyConfig, TokenState, build_plan
from prance.tokens.merge import bipartite_soft_matching, merge_rows, merge_tokens, tome_schedule
from prance.tokens.ppt import ppt_tokens, significance
from prance.tokens.prune import keep_top, prune_rows, prune_tokens


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _state(b=3, n=11, c=5, d=4, h=2, seed=0, size=False):
    g = _gen(seed)
    x = torch.randn(b, n, c, generator=g)
    s = torch.randint(1, 4, (b, n, 1), generator=g).float() if size else None
    cls_attn = torch.rand(b, h, n, generator=g).softmax(-1)
    return TokenState(x, s, 1, cls_attn=cls_attn, metric=torch.randn(b, n, d, generator=g),
                      v_norm=torch.rand(b, n, generator=g) + 0.5)


def _reference_tome(x, size, metric, r):
    """ToMe's bipartite soft matching written out with loops, one image at a time."""
    n = x.shape[0]
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    m = metric / metric.norm(dim=-1, keepdim=True)
    best = []
    for i, ai in enumerate(a_idx):
        if ai == 0:  # class token: never merged
            best.append((-math.inf, i, None))
            continue
        sims = [float(m[ai] @ m[bj]) for bj in b_idx]
        j = max(range(len(b_idx)), key=lambda k: sims[k])
        best.append((sims[j], i, j))
    order = sorted(best, key=lambda t: -t[0])
    merged, kept = order[:r], sorted(t[1] for t in order[r:])
    dst_x = {j: x[b_idx[j]] * size[b_idx[j]] for j in range(len(b_idx))}
    dst_s = {j: size[b_idx[j]].clone() for j in range(len(b_idx))}
    for _, i, j in merged:
        dst_x[j] = dst_x[j] + x[a_idx[i]] * size[a_idx[i]]
        dst_s[j] = dst_s[j] + size[a_idx[i]]
    out_x = [x[a_idx[i]] for i in kept] + [dst_x[j] / dst_s[j] for j in range(len(b_idx))]
    out_s = [size[a_idx[i]] for i in kept] + [dst_s[j] for j in range(len(b_idx))]
    return torch.stack(out_x), torch.stack(out_s)


@pytest.mark.parametrize("n,r", [(11, 3), (12, 5), (9, 4), (50, 13)])
def test_tome_matches_bruteforce_reference(n, r):
    st = _state(b=3, n=n, seed=n + r, size=True)
    out = merge_tokens(st, r)
    assert out.x.shape[1] == n - r
    for i in range(3):
        rx, rs = _reference_tome(st.x[i], st.size[i], st.metric[i], r)
        torch.testing.assert_close(out.x[i], rx)
        torch.testing.assert_close(out.size[i], rs)


def test_merge_preserves_size_weighted_sum_and_class_token():
    st = _state(b=4, n=20, seed=5, size=True)
    out = merge_tokens(st, 7)
    torch.testing.assert_close((out.x * out.size).sum(1), (st.x * st.size).sum(1))
    torch.testing.assert_close(out.size.sum(1), st.size.sum(1))
    torch.testing.assert_close(out.x[:, 0], st.x[:, 0])  # CLS first and untouched
    assert torch.equal(out.size[:, 0], st.size[:, 0])


def test_merge_is_capped_at_half_the_patches():
    st = _state(b=2, n=11, seed=1)
    assert merge_tokens(st, 100).x.shape[1] == 11 - 5
    merge = bipartite_soft_matching(st.metric, 0, 1)
    assert torch.equal(merge(st.x, "sum"), st.x)


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_per_row_merge_and_prune_of_a_padded_batch_equal_each_row_alone(num_prefix):
    """Adaptive execution batches images of different token counts with padding of size
    0: each row's merge (or prune) gives what the row gives alone, then padding."""
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([17, 12, 9, 17])
    r = torch.tensor([5, 0, 4, 8])
    k = torch.tensor([9, 11, 3, 1])  # patches kept by pruning
    bsz, tokens, c = len(n), int(n.max()), 6
    x = torch.randn(bsz, tokens, c, generator=g)
    metric = torch.randn(bsz, tokens, 4, generator=g)
    size = (torch.rand(bsz, tokens, 1, generator=g) * 3 + 1).round()
    cls_attn = torch.rand(bsz, 2, tokens, generator=g).softmax(-1)
    for i, m in enumerate(n.tolist()):
        size[i, m:] = 0
        x[i, m:] = 5.0  # junk in the padding
    padded = TokenState(x, size, num_prefix, metric=metric, cls_attn=cls_attn)
    merged = merge_rows(padded, n, r)
    for i, m in enumerate(n.tolist()):
        alone = merge_tokens(TokenState(x[i : i + 1, :m], size[i : i + 1, :m], num_prefix, metric=metric[i : i + 1, :m]), int(r[i]))
        out = alone.x.shape[1]
        assert out == m - int(r[i])
        torch.testing.assert_close(merged.x[i, :out], alone.x[0])
        torch.testing.assert_close(merged.size[i, :out], alone.size[0])
        assert (merged.size[i, out:] == 0).all() and (merged.x[i, out:] == 0).all()
    if num_prefix:
        pruned = prune_rows(padded, n, k)
        for i, m in enumerate(n.tolist()):
            row = TokenState(x[i : i + 1, :m], size[i : i + 1, :m], 1)
            alone = keep_top(row, cls_attn[i : i + 1, :, 1:m].mean(dim=1), int(k[i]))
            out = alone.x.shape[1]
            torch.testing.assert_close(pruned.x[i, :out], alone.x[0])
            assert (pruned.size[i, out:] == 0).all()


def test_tome_schedules():
    assert tome_schedule(4, 5) == [4] * 5
    dec = tome_schedule(4, 5, "decreasing")
    assert dec[0] == 8 and dec[-1] == 0 and all(a >= b for a, b in zip(dec, dec[1:]))
    assert abs(sum(dec) - 4 * 5) <= 5


def test_prune_keeps_top_k_by_class_attention_in_order():
    st = _state(b=3, n=17, seed=2)
    out = prune_tokens(st, keep=0.5)
    k = math.ceil(0.5 * 16)
    assert out.x.shape[1] == 1 + k
    scores = st.cls_attn.mean(1)[:, 1:]
    for i in range(3):
        top = set((scores[i].topk(k).indices + 1).tolist())
        rows = [int((st.x[i] == out.x[i, j]).all(-1).nonzero()[0]) for j in range(out.x.shape[1])]
        assert rows[0] == 0  # CLS kept, first
        assert set(rows[1:]) == top
        assert rows[1:] == sorted(rows[1:])  # original order kept


def test_prune_fuse_appends_attention_weighted_token():
    st = _state(b=2, n=9, seed=3)
    out = prune_tokens(st, keep=0.5, fuse=True)
    k = 4
    assert out.x.shape[1] == 1 + k + 1
    scores = st.cls_attn.mean(1)[:, 1:]
    drop = scores.argsort(1, descending=True)[:, k:]
    for i in range(2):
        expected = (st.x[i, 1:][drop[i]] * scores[i, drop[i]][:, None]).sum(0)
        torch.testing.assert_close(out.x[i, -1], expected)


def _ppt_state():
    """Images 0 and 2 have flat significance (pool), 1 and 3 peaked (prune)."""
    st = _state(b=4, n=21, seed=4)
    st.v_norm = torch.ones_like(st.v_norm)
    flat = torch.full((st.cls_attn.shape[1], 21), 1 / 21)
    peaked = torch.softmax(torch.linspace(0, 8, 21), 0).expand(st.cls_attn.shape[1], 21)
    st.cls_attn = torch.stack([flat, peaked, flat, peaked])
    return st


def test_ppt_chooses_pool_or_prune_per_image_by_its_rule():
    st = _ppt_state()
    st.stats = {}
    var = significance(st).var(-1)
    threshold = float(var[[0, 2]].max() + var[[1, 3]].min()) / 2
    r = 6
    out = ppt_tokens(st, r, threshold)
    pool = st.stats["ppt_pool"][0]
    assert pool.tolist() == [True, False, True, False]
    assert out.x.shape[1] == 21 - r
    scores = significance(st)
    for i in (1, 3):  # pruned: the r lowest-score patches are gone, the rest kept exactly,
        # in descending score order as PPT's reference code leaves them
        keep = (scores[i].argsort(descending=True)[: 20 - r] + 1).tolist()
        torch.testing.assert_close(out.x[i], st.x[i, [0] + keep])
        assert torch.all(out.size[i] == 1)
    for i in (0, 2):  # pooled: ToMe merge, sizes and weighted sums conserved
        torch.testing.assert_close(out.size[i].sum(), torch.tensor(21.0))
        torch.testing.assert_close((out.x[i] * out.size[i]).sum(0), st.x[i].sum(0))
        assert out.size[i].max() > 1
    # batched == one image at a time
    for i in range(4):
        one = TokenState(st.x[i : i + 1], None, 1, cls_attn=st.cls_attn[i : i + 1], metric=st.metric[i : i + 1],
                         v_norm=st.v_norm[i : i + 1])
        single = ppt_tokens(one, r, threshold)
        torch.testing.assert_close(single.x[0], out.x[i])


@pytest.fixture(scope="module")
def fmnist_model():
    model = create_meta("prance_vit_fmnist")
    g = _gen(0)
    with torch.no_grad():
        for p in model.vit.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategies_remove_the_planned_tokens_in_real_forwards(fmnist_model, name):
    m = fmnist_model
    plan = build_plan(StrategyConfig(name), m.arch)
    x = torch.randn(5, 1, 28, 28, generator=_gen(1))
    stats = {}
    with torch.no_grad():
        logits = m(x, None, plan, stats=stats)
    expected = [n for n, _ in plan.token_counts(m.arch.num_tokens)]
    assert stats["tokens"] == expected
    assert expected[0] == 50
    if name != "none":
        assert expected[-1] < 50
    assert torch.isfinite(logits).all()
    # each image's prediction does not depend on the rest of the batch
    with torch.no_grad():
        alone = torch.cat([m(x[i : i + 1], None, plan) for i in range(5)])
    torch.testing.assert_close(alone, logits, atol=1e-5, rtol=1e-4)


def test_strategies_run_on_a_plain_timm_vit_and_subnets():
    m = create_meta("deit_tiny_patch16_224", img_size=64)  # 16 patches + CLS
    sub = m.space.smallest()
    x = torch.randn(2, 3, 64, 64, generator=_gen(2))
    for name in STRATEGIES:
        plan = build_plan(StrategyConfig(name), m.arch)
        stats = {}
        with torch.no_grad():
            out = m(x, sub, plan, stats=stats)
        assert out.shape == (2, 1000)
        assert stats["tokens"] == [n for n, _ in plan.token_counts(17)]


def test_ppt_defaults_match_the_paper():
    m = create_meta("deit_small_patch16_224")
    plan = build_plan(StrategyConfig("ppt"), m.arch)
    assert plan.params == {"r": 50}
    assert [n for n, _ in plan.token_counts(197)][3:11:3] == [197, 147, 97]
    assert [after for _, after in plan.token_counts(197)][9] == 49  # r capped at (97 - 1) // 2 = 48
    assert abs(flops.gflops(m.arch, None, plan) - 2.944) < 0.01  # PPT README: 2.944 GFLOPs


@pytest.mark.parametrize("name", ["prune", "merge", "prune_merge", "ppt"])
def test_calibration_meets_budget_most_closely(fmnist_model, name):
    arch = fmnist_model.arch
    dense = flops.gflops(arch)
    budget = 0.7 * dense
    cal = calibrate(StrategyConfig(name), arch, budget)
    assert cal.report.gflops <= budget
    costs = [flops.gflops(arch, None, build_plan(StrategyConfig(name).with_param(v), arch)) for v in candidates(StrategyConfig(name), arch)]
    assert max(c for c in costs if c <= budget) == cal.report.gflops
    with pytest.raises(PranceError, match="below the smallest reachable"):
        calibrate(StrategyConfig(name), arch, min(costs) * 0.99)


def test_bad_parameters_and_budgets():
    m = create_meta("prance_vit_micro")
    for cfg, message in [(StrategyConfig("merge", r=100), "r must be an integer in 0..8"),
                         (StrategyConfig("prune", keep=1.5), r"keep must be in \(0, 1\]"),
                         (StrategyConfig("prune", keep=0.0), r"keep must be in \(0, 1\]"),
                         (StrategyConfig("prune", r=3), "takes --keep, not --r"),
                         (StrategyConfig("ppt", locs=(9,)), r"reduction blocks \[9\] outside"),
                         (StrategyConfig("nope"), "unknown token strategy 'nope'")]:
        with pytest.raises(PranceError, match=message):
            build_plan(cfg, m.arch)
    assert parse_budget("50%", 2.0) == pytest.approx(1.0)
    assert parse_budget("1.5", 2.0) == 1.5
    for bad, message in [("abc", "is neither GFLOPs"), ("-1", "positive finite"), ("0%", "positive finite")]:
        with pytest.raises(PranceError, match=message):
            parse_budget(bad, 2.0)


def test_ppt_significance_is_the_reference_formula_on_a_real_forward():
    """PPT/ATS: score = (CLS attention summed over heads) x ||v|| of the token's whole value
    vector (heads concatenated), normalised over patches, computed here straight from the
    q, k, v of block 0 of a random-init DeiT-S-shaped model and compared with the engine's."""
    from prance.models import engine
    from prance.tokens.state import CLS_ATTN, V_NORM

    m = create_meta("deit_small_patch16_224", img_size=64, depth=1)  # DeiT-S's block 0 is all it needs
    x = torch.randn(2, 3, 64, 64, generator=_gen(5))
    blk = m.vit.blocks[0]
    with torch.no_grad():
        h = blk.norm1(engine.embed(m.vit, x, m.arch.embed_dim))
        _, facts = engine.attention(blk.attn, h, m.arch.num_heads, None, frozenset({CLS_ATTN, V_NORM}))
        b, n, c = h.shape
        qkv = blk.attn.qkv(h).reshape(b, n, 3, m.arch.num_heads, c // m.arch.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(-1)
        v_whole = v.transpose(1, 2).reshape(b, n, c).norm(dim=-1)
        ref = (attn[:, :, 0].sum(dim=1) * v_whole)[:, 1:]
        ref = ref / ref.sum(dim=1, keepdim=True)
        ours = significance(TokenState(h, None, 1, **facts))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    # the per-head form sum_h a_h ||v_h|| (what prance used before) ranks tokens differently
    per_head = (attn[:, :, 0] * v.norm(dim=-1)).sum(dim=1)[:, 1:]
    per_head = per_head / per_head.sum(dim=1, keepdim=True)
    assert (per_head - ref).abs().max() / ref.abs().max() > 1e-3

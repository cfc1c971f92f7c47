"""The PRANCE selector as the controller of a multi-pass cascade (prance.selector.passes),
on the decisive micro meta-network and real Fashion-MNIST images. Labels are the full
sub-network's answers, so that cheap rungs are wrong where they disagree with it."""

from __future__ import annotations

import math

import pytest
import torch

from prance import cascade as casc
from prance import flops, static_search
from prance.selector import passes


@pytest.fixture(scope="module")
def setup(decisive_micro):
    from prance.data import build_dataset, input_spec_for_model, make_loader, seeded_subset

    meta = decisive_micro
    ds = seeded_subset(build_dataset("fashion-mnist", "test", input_spec_for_model(meta.vit)), 900, 0)
    x = next(iter(make_loader(ds, batch_size=900)))[0]
    y = casc.logits_of(meta, static_search.full(meta), x).argmax(-1)
    budget = 0.5 * flops.gflops(meta.arch)
    ladder = [static_search.parse(t, meta) for t in ("widths=0,0,0,0 merge r=4", "widths=1,1,1,1 merge r=2", "widths=2,2,2,2 none")]
    ladder.append(static_search.full(meta))
    ladder.sort(key=lambda c: c.gflops)
    parts = {"rollouts": (x[:500], y[:500]), "val": (x[500:700], y[500:700]), "test": (x[700:], y[700:])}
    return meta, ladder, budget, parts


def test_features_are_the_passes_outputs(setup):
    meta, ladder, budget, parts = setup
    logits = casc.logits_of(meta, ladder[0], parts["val"][0][:8])
    prev = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6])
    rung, n_pass = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([1, 2, 3, 1, 2, 3, 1, 2])
    spent = torch.linspace(0.001, 0.01, 8, dtype=torch.float64)
    f = passes.features(logits, prev, rung, n_pass, spent, budget, len(ladder), 3)
    assert f.shape == (8, passes.feature_dim(10, len(ladder), 3))
    for i in range(8):
        p = sorted(torch.softmax(logits[i].double(), -1).tolist(), reverse=True)
        entropy = -sum(q * math.log(q) for q in p if q > 0) / math.log(10)
        agree = float(prev[i] >= 0 and int(prev[i]) == int(logits[i].argmax()))
        onehot_rung = [float(j == int(rung[i])) for j in range(len(ladder))]
        onehot_pass = [float(j == int(n_pass[i]) - 1) for j in range(3)]
        want = p + [p[0] - p[1], entropy, agree] + onehot_rung + onehot_pass + [float(spent[i]) / budget]
        assert f[i].tolist() == pytest.approx(want, abs=1e-5)


def _random_controller(meta, ladder, budget, seed=0):
    torch.manual_seed(seed)
    policy = passes.ActorCritic(passes.feature_dim(10, len(ladder), 3), (len(ladder) + 1,), 16)
    with torch.no_grad():  # a decisive random policy: different images take different paths
        for p in policy.actor.parameters():
            p.normal_(0, 3.0) if p.dim() > 1 else p.zero_()
    cascade = casc.Cascade((ladder[0],), ())
    return passes.Controller(ladder, 0, 3, budget, cascade, budget, policy)


def test_a_multi_pass_result_equals_each_images_passes_alone_and_counts_every_pass(setup):
    meta, ladder, budget, parts = setup
    x = parts["test"][0][:60]
    for seed in range(10):  # the first random policy whose images take different numbers of passes
        ctl = _random_controller(meta, ladder, budget, seed)
        logits, n_pass, spent = passes.run(meta, ctl, x)
        if len(set(n_pass.tolist())) > 1:
            break
    assert len(set(n_pass.tolist())) > 1  # some images stopped, some went on
    for i in range(x.shape[0]):
        alone, n1, s1 = passes.run(meta, ctl, x[i : i + 1])
        assert torch.allclose(alone[0], logits[i], atol=1e-5) and int(n1) == int(n_pass[i]) and float(s1) == pytest.approx(float(spent[i]))
    # the table episode (training's environment) is the same controller
    table = passes.Table.of(meta, ladder, x, parts["test"][1][:60])
    ep = passes.table_episode(ctl.policy, table, torch.arange(60), 0, budget, 3, ctl.decision_gflops)
    t_logits, t_spent = passes.final(ep)
    assert torch.allclose(t_logits, logits, atol=1e-5) and torch.equal(ep.passes, n_pass)
    # each pass's cost: the rungs an image ran plus one decision per step it was still deciding
    decisions = torch.stack(ep.active, 1).sum(1).double()
    assert torch.all(spent >= table.costs[0] + decisions * ctl.decision_gflops - 1e-12)
    one_pass = n_pass == 1
    assert torch.allclose(spent[one_pass], table.costs[0] + decisions[one_pass] * ctl.decision_gflops)


def test_a_controller_that_does_not_beat_its_cascade_is_the_cascade(setup):
    meta, ladder, budget, parts = setup
    val = passes.Table.of(meta, ladder, *parts["val"])
    rollouts = passes.Table.of(meta, ladder, *parts["rollouts"])
    found = casc.search(meta, budget, parts["val"], configs=ladder, margin=False)
    frozen = passes.PassSettings(iterations=4, images_per_iteration=128, lr=0.0, imitation_epochs=0, eval_every=2)
    ctl = passes.train(ladder, found, rollouts, val, budget, frozen)
    kept = [h for h in ctl.history if h["val_top1"] > found.top1 and h["val_gflops"] <= budget]
    assert (ctl.policy is None) == (not kept)
    if ctl.policy is None:
        x, y = parts["test"]
        logits, n_pass, spent = passes.run(meta, ctl, x)
        ref, ref_passes = casc.forward(meta, found.best, x)
        assert torch.equal(logits, ref) and torch.equal(n_pass, ref_passes)


def test_training_keeps_a_policy_only_when_it_beats_the_cascade_within_the_mean(setup):
    meta, ladder, budget, parts = setup
    val = passes.Table.of(meta, ladder, *parts["val"])
    rollouts = passes.Table.of(meta, ladder, *parts["rollouts"])
    found = casc.search(meta, budget, parts["val"], configs=ladder, margin=False)
    ctl = passes.train(ladder, found, rollouts, val, budget, passes.PassSettings(iterations=20, images_per_iteration=256, eval_every=5))
    assert [h["iteration"] for h in ctl.history] == [5, 10, 15, 20]
    if ctl.policy is not None:
        s = passes.score(ctl.policy, val, ctl.start, ctl.target_gflops, ctl.max_passes, ctl.decision_gflops)
        assert s["top1"] > found.top1 and s["gflops"] <= budget * (1 + 1e-9)
    res = passes.evaluate(meta, ctl, *parts["test"])
    assert res["n_images"] == 200 and res["gflops"] <= res["gflops_p95"] * (1 + 1e-9) <= res["gflops_max"] * (1 + 1e-9)


def test_imitation_reproduces_the_cascades_rule(setup):
    """The warm start: fitted to the cascade's decisions, the policy takes them on most images."""
    meta, ladder, budget, parts = setup
    rollouts = passes.Table.of(meta, ladder, *parts["rollouts"])
    p = casc.logits_of(meta, ladder[0], parts["rollouts"][0]).softmax(-1).amax(-1)
    cascade = casc.Cascade((ladder[0], ladder[-1]), (round(float(p.median()), 2),))
    torch.manual_seed(0)
    policy = passes.ActorCritic(passes.feature_dim(10, len(ladder), 2), (len(ladder) + 1,), 64)
    passes.imitate(policy, cascade, ladder, rollouts, 0, budget, 2, epochs=300, lr=3e-3)
    ep = passes.table_episode(policy, rollouts, torch.arange(500), 0, budget, 2, 0.0)
    rule = passes.cascade_actions(cascade, ladder, rollouts.logits[:, 0], torch.zeros(500, dtype=torch.long), torch.ones(500, dtype=torch.bool))
    assert float((ep.actions[0] == rule).double().mean()) >= 0.95


def test_a_saved_controller_loads_and_runs_the_same(setup, tmp_path):
    """Both kinds a trial saves: a trained policy, and the cascade it fell back to."""
    from prance.selector.selector import meta_fingerprint

    meta, ladder, budget, parts = setup
    x = parts["test"][0][:40]
    found = casc.search(meta, budget, parts["val"], configs=ladder, margin=False)
    fallback = passes.Controller(ladder, 0, 3, budget, found.best, budget)
    for ctl in (_random_controller(meta, ladder, budget), fallback):
        passes.save(ctl, tmp_path / "c.safetensors", meta_fingerprint(meta))
        got = passes.load(tmp_path / "c.safetensors", meta)
        assert got.describe() == ctl.describe() and [c.describe() for c in got.ladder] == [c.describe() for c in ctl.ladder]
        want, got_out = passes.run(meta, ctl, x), passes.run(meta, got, x)
        assert all(torch.equal(a, b) for a, b in zip(want, got_out))


def test_bad_controller_files_are_one_line_errors(setup, tmp_path):
    from prance.errors import PranceError

    meta = setup[0]
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    for path, words in ((tmp_path / "none.safetensors", "not found"), (tmp_path / "junk.safetensors", "is not a controller checkpoint")):
        with pytest.raises(PranceError, match=words):
            passes.load(path, meta)

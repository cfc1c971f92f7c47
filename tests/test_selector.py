"""The PRANCE selector: PPO and GAE on problems with known answers, grouped adaptive
execution against one-image-at-a-time runs, exact FLOPs, per-image budgets, checkpoints,
a short real training on the shipped meta-network, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prance import flops
from prance.selector.config import SelectorConfig
from prance.errors import PranceError
from prance.models import create_meta
from prance.selector import execute, ppo, reward
from prance.selector.actions import ActionSpace, CostTable
from prance.selector.policy import ActorCritic
from prance.selector.selector import Selector
from prance.selector.store import load_selector, save_selector

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "checkpoints" / "prance_vit_fmnist.safetensors"


def test_gae_matches_hand_computation_across_episode_boundaries():
    # two episodes: [r=1, r=2 | done] and [r=3 | done]; gamma .5, lambda .5
    rewards = torch.tensor([1.0, 2.0, 3.0])
    values = torch.tensor([0.5, 1.0, 2.0])
    dones = torch.tensor([False, True, True])
    adv, ret = ppo.gae(rewards, values, dones, gamma=0.5, lam=0.5, last_value=100.0)
    d1 = 2.0 - 1.0  # terminal: no bootstrap
    d0 = 1.0 + 0.5 * 1.0 - 0.5
    expected = torch.tensor([d0 + 0.25 * d1, d1, 3.0 - 2.0])  # nothing flows across the boundary, last_value unused
    assert torch.allclose(adv, expected)
    assert torch.allclose(ret, expected + values)


def test_vectorised_gae_equals_sequential():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    adv, ret = ppo.gae_episodes(r, v, 0.9, 0.8)
    dones = torch.zeros(5, 4, dtype=torch.bool)
    dones[:, -1] = True
    a2, r2 = ppo.gae(r.flatten(), v.flatten(), dones.flatten(), 0.9, 0.8)
    assert torch.allclose(adv.flatten(), a2, atol=1e-6) and torch.allclose(ret.flatten(), r2, atol=1e-6)


def test_rtg_rewards_telescope_to_final_minus_full():
    results = torch.tensor([[0.2, 0.5, 0.9]])
    r = reward.rtg_rewards(results, torch.tensor([1.0]))
    assert torch.allclose(r, torch.tensor([[-0.8, 0.3, 0.4]]))
    assert torch.isclose(r.sum(), results[0, -1] - 1.0)


def test_ppo_learns_a_contextual_bandit_with_masks():
    """Context c in {0,1,2}; the best arm of 4 is (c + 1) % 4 but arm 3 is masked out
    for context 2, where arm 0 is then best. PPO must learn all three."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    policy = ActorCritic(3, (4,), hidden=32)
    actor = torch.optim.Adam(policy.actor.parameters(), lr=3e-3)
    critic = torch.optim.Adam(policy.critic.parameters(), lr=3e-3)
    buf = ppo.RolloutBuffer()
    settings = ppo.PPOSettings(epochs=4, minibatch=64, entropy_coef=0.0)

    def feasible(ctx):
        f = torch.ones(ctx.shape[0], 4, dtype=torch.bool)
        f[ctx == 2, 3] = False
        return f

    def payoff(ctx, a):
        best = torch.where(ctx == 2, torch.zeros_like(ctx), (ctx + 1) % 4)
        return (a == best).float() + 0.1 * (a == 3).float() * (ctx != 2).float()

    for _ in range(60):
        ctx = torch.randint(0, 3, (256,), generator=g)
        obs = torch.nn.functional.one_hot(ctx, 3).float()
        with torch.no_grad():
            dec = policy.act(obs, feasible(ctx), (True,), (0,), greedy=False, generator=g)
            r = payoff(ctx, dec.actions[:, 0])
            v = policy.value(obs)
        adv, ret = ppo.gae(r, v, torch.ones(256, dtype=torch.bool), 1.0, 1.0)
        buf.add(obs, dec.actions, dec.masks, torch.ones(256, 1, dtype=torch.bool), dec.logp, adv, ret)
        ppo.update(policy, actor, critic, buf, settings, g)
        assert len(buf) == 0  # cleared after every update
    ctx = torch.arange(3)
    dec = policy.act(torch.eye(3), feasible(ctx), (True,), (0,), greedy=True)
    assert dec.actions[:, 0].tolist() == [1, 2, 0]


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_meta("prance_vit_micro").eval()


@pytest.mark.parametrize("strategy,spread", [("prune", False), ("merge", False), ("prune_merge", False), ("merge", True), ("prune_merge", True)])
@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("call_macs", [0, None], ids=["split", "padded"])
def test_grouped_execution_equals_each_image_alone(micro, strategy, spread, joint, call_macs):
    """Split: one sub-batch per schedule; padded: one per width, tokens padded with size 0."""
    torch.manual_seed(1)
    actions = ActionSpace(micro.arch, micro.space, strategy, [1, 2, 3], joint_widths=joint, merge_spread=spread)
    if spread:  # merging starts in stage 0 and runs in every block
        assert actions.active(0)[-1] and not (strategy == "prune_merge" and actions.active(0)[-2])
    table = CostTable(actions)
    from prance.selector.features import obs_dim

    policy = ActorCritic(obs_dim(micro.arch.embed_dim, actions.num_stages), actions.sizes, 16)
    for p in policy.actor.parameters():  # a decisive random policy: many different schedules
        torch.nn.init.normal_(p, std=1.0)
    x = torch.randn(24, 1, 28, 28)
    budgets = torch.linspace(0.55, 1.0, 24, dtype=torch.float64) * table.full_macs
    ep = execute.run_episode(micro, actions, table, policy, x, budgets, greedy=False, generator=torch.Generator().manual_seed(0), rtg=True, call_macs=call_macs)
    assert 1 < ep.groups <= 24
    widths = [len(torch.unique(ep.actions[:, t, : actions.num_width_dims], dim=0)) for t in range(actions.num_stages)]
    if call_macs is None:  # one sub-batch per width in each stage and each completion
        assert ep.sub_batches == sum(widths) + sum(widths[:-1])
    overhead = policy.actor_macs() * actions.num_stages
    for i in range(24):
        decs = [actions.decision(ep.actions[i, t].tolist()) for t in range(actions.num_stages)]  # what image i ran
        sub, plan = actions.compose(decs)
        with torch.no_grad():
            alone = micro(x[i : i + 1], sub, plan)[0]
        assert torch.allclose(alone, ep.logits[i], atol=1e-4), i
        report = flops.count(micro.arch, sub, plan)
        wide_embed = micro.arch.num_patches * (micro.arch.embed_dim - decs[0].embed) * micro.arch.patch_dim
        assert ep.macs[i].item() == pytest.approx(report.macs + wide_embed + overhead)
        assert ep.macs[i] <= budgets[i] + 1e-6  # the per-image budget holds
        assert ep.token_ratio[i].item() == pytest.approx(report.token_ratio, abs=1e-6)
        assert ep.final_token_ratio[i].item() == pytest.approx(report.final_token_ratio, abs=1e-6)
    # the episode's own result is the last Result-to-Go entry
    assert torch.equal(ep.cont_logits[:, -1], ep.logits)


def test_batch_mates_do_not_change_an_images_result(micro):
    sel = Selector.create(micro, "prune", [1, 2, 3], hidden=16)
    x = torch.randn(16, 1, 28, 28)
    budget = 0.7 * sel.full_gflops()
    whole = sel.run_episode(micro, x, budget)
    part = sel.run_episode(micro, x[5:9], budget)
    assert torch.allclose(whole.logits[5:9], part.logits, atol=1e-5)
    assert torch.equal(whole.actions[5:9], part.actions)


def test_a_mean_budget_masks_no_image_below_the_full_sub_network(micro):
    """cap: every image within the budget; mean: the same policy may spend more on some
    images (the mean is held by the reward, not by the mask)."""
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    runs = {}
    for kind in ("cap", "mean"):
        sel = Selector.create(micro, "prune", [1, 2, 3], hidden=16, seed=3, budget_kind=kind)
        budget = 1.15 * sel.min_gflops()
        runs[kind] = sel.run_episode(micro, x, budget, greedy=False, generator=torch.Generator().manual_seed(1))
    assert (runs["cap"].macs <= budget * 1e9 + 1e-3).all()
    assert (runs["mean"].macs > budget * 1e9).any() and (runs["mean"].macs <= sel.table.full_macs + sel.overhead_macs + 1e-3).all()


def test_a_mean_budget_selector_keeps_the_mean_and_never_falls_below_its_start(micro_checkpoint, tmp_path):
    from prance.selector.pipeline import run_selector
    from prance.selector.store import SELECTOR_FILE

    cfg = SelectorConfig(checkpoint=str(micro_checkpoint), strategy="prune", budget="55%", budget_kind="mean",
                         reward_form="constrained", flops_weight=0.05, decision_blocks=[1, 2, 3], hidden=16, iterations=3,
                         eval_every=1, rollout_images=32, minibatch=16, ppo_epochs=2, train_limit=128, val_limit=64,
                         static_images=64, static_first_images=32, rollouts_from="holdout")
    seen = []
    final = run_selector(cfg, seen.append, tmp_path, progress=False)
    for m in seen + [final]:  # what is kept: its mean GFLOPs within the budget on validation, never below the start
        assert m["gflops"] <= m["budget_gflops"] * (1 + 1e-9) and m["top1"] >= final["warm_start_top1"]
    selector, header = load_selector(tmp_path / SELECTOR_FILE, load_checkpoint_meta(micro_checkpoint))
    assert selector.budget_kind == "mean" and header["config"]["budget_kind"] == "mean"


def load_checkpoint_meta(path):
    from prance.checkpoint import load_checkpoint

    return load_checkpoint(path)[0]


def test_selector_config_takes_device_names():
    assert SelectorConfig(device="cuda:1").device == "cuda:1"  # availability is checked where it runs
    assert SelectorConfig(device="auto").device == "auto"
    with pytest.raises(ValueError, match="not a device name"):
        SelectorConfig(device="gpu0")


def test_amp_runs_the_meta_network_in_lower_precision_with_the_same_decisions(micro):
    """On the CPU, amp means bfloat16 autocast (on CUDA float16): the same code path a GPU
    trial takes. Decisions and logits agree with float32 up to that precision."""
    sel = Selector.create(micro, "prune", [1, 2, 3], hidden=16)
    x = torch.randn(32, 1, 28, 28)
    budget = 0.7 * sel.full_gflops()
    fp32 = sel.run_episode(micro, x, budget, rtg=True)
    low = sel.run_episode(micro, x, budget, rtg=True, amp=True)
    assert low.logits.dtype == torch.float32 and low.cont_logits.dtype == torch.float32  # back in float32 on the CPU
    assert not torch.equal(fp32.logits, low.logits)  # it really ran in bfloat16
    same = low.actions.flatten(1).eq(fp32.actions.flatten(1)).all(dim=1)
    assert same.float().mean() >= 0.75
    scale = fp32.logits.abs().max()
    assert (low.logits[same] - fp32.logits[same]).abs().max() <= 0.1 * scale  # bfloat16 keeps ~3 significant digits
    assert torch.equal(low.macs[same], fp32.macs[same])  # costs are analytic, not measured


def test_checkpoint_round_trip_and_refusal_of_another_meta_network(micro, tmp_path):
    sel = Selector.create(micro, "merge", [1, 2, 3], hidden=16, seed=3)
    path = tmp_path / "s.safetensors"
    save_selector(path, sel, {"strategy": "merge"})
    back, header = load_selector(path, micro)
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(sel.run_episode(micro, x, 0.8 * sel.full_gflops()).actions, back.run_episode(micro, x, 0.8 * sel.full_gflops()).actions)
    other = create_meta("prance_vit_micro")
    with pytest.raises(PranceError, match="another meta-network"):
        load_selector(path, other)
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(PranceError, match="is not a safetensors selector checkpoint"):
        load_selector(bogus, micro)


def test_budget_below_reach_is_refused(micro):
    sel = Selector.create(micro, "prune", [1, 2, 3], hidden=16)
    with pytest.raises(PranceError, match="below the smallest"):
        sel.check_budget(0.5 * sel.min_gflops())


@pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped checkpoint missing")
def test_short_training_on_the_shipped_meta_network_keeps_budget_and_accuracy(tmp_path):
    from prance.selector.pipeline import run_selector
    from prance.selector.store import SELECTOR_FILE

    cfg = SelectorConfig(
        checkpoint=str(SHIPPED), strategy="prune", budget="45%", budget_kind="cap", iterations=4, rollout_images=96,
        minibatch=48, ppo_epochs=2, eval_every=2, train_limit=2000, val_limit=300, test_limit=300,
    )
    seen = []
    final = run_selector(cfg, seen.append, tmp_path, progress=False)
    assert [m["iteration"] for m in seen] == [2, 4]
    for m in seen:
        assert m["gflops"] <= m["budget_gflops"] * (1 + 1e-9)
        assert set(m) >= {"top1", "gflops", "token_ratio", "final_token_ratio", "throughput_img_s", "reward"}
    assert final["top1"] > 60 and final["test_top1"] > 60  # chance is 10%
    assert final["top1"] >= final["warm_start_top1"] and final["warm_start"]  # never worse than its static start
    kept = [m["top1"] for m in seen]  # each report is the selector that would be kept: never below the start, never falling
    assert kept == sorted(kept) and kept[0] >= final["warm_start_top1"] and kept[-1] == final["top1"]
    assert final["test_gflops"] <= final["budget_gflops"] * (1 + 1e-9)
    # a cap result: not one image over the budget (its most expensive image), on validation and test
    assert final["gflops_p95"] <= final["gflops_max"] <= final["budget_gflops"] * (1 + 1e-9)
    assert final["test_gflops_max"] <= final["budget_gflops"] * (1 + 1e-9)
    assert (tmp_path / SELECTOR_FILE).is_file()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "prance", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["train-selector", "--strategy", "ppt"], "strategy"),
        (["train-selector", "--budget", "5%"], "below the smallest"),
        (["train-selector", "--checkpoint", "nope.safetensors"], "not found"),
        (["train-selector", "--set", "actor_lr=-1"], "actor_lr"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, message):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prance: error:") and message in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped checkpoint missing")
def test_cli_refuses_a_selector_of_another_meta_network(micro, tmp_path):
    from prance.checkpoint import save_checkpoint

    other = tmp_path / "other.safetensors"
    save_checkpoint(other, create_meta("prance_vit_fmnist"), "prance_vit_fmnist")
    sel_path = tmp_path / "sel.safetensors"
    from prance.checkpoint import load_checkpoint

    meta, _ = load_checkpoint(other)
    save_selector(sel_path, Selector.create(meta, "prune", [3, 6, 9]), SelectorConfig(checkpoint=str(other)).model_dump())
    r = _cli("eval", "--selector", str(sel_path), "--checkpoint", str(SHIPPED), "--limit", "64", "--json")
    assert r.returncode == 2 and "another meta-network" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("eval", "--selector", str(sel_path), "--limit", "64", "--json")  # the checkpoint it names
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"top1", "gflops", "token_ratio", "final_token_ratio", "throughput_img_s", "reward"}


class _Killed(Exception):
    pass


def test_interrupted_training_resumes_where_it_stopped(micro_checkpoint, tmp_path):
    """A run cut off after its iteration-2 checkpoint, resumed from the folder, ends exactly
    where the uninterrupted run ends: same reports after the cut, same kept selector."""
    from safetensors.torch import load_file

    from prance.selector.pipeline import run_selector
    from prance.selector.store import SELECTOR_FILE, STATE_FILE

    cfg = SelectorConfig(checkpoint=str(micro_checkpoint), strategy="merge", budget="60%", decision_blocks=[1, 2, 3],
                         hidden=16, iterations=4, eval_every=1, rollout_images=32, minibatch=16, ppo_epochs=2,
                         train_limit=128, val_limit=64, static_images=64, static_first_images=32)
    keys = ("iteration", "top1", "gflops", "reward", "train_reward", "train_top1", "best_iteration", "current_top1", "lagrange")
    whole = []
    final = run_selector(cfg, lambda m: whole.append({k: m[k] for k in keys}), tmp_path / "whole", progress=False)

    cut = []

    def report(m):
        cut.append({k: m[k] for k in keys})
        if m["iteration"] == 2:
            raise _Killed  # the process dies right after its iteration-2 checkpoint

    with pytest.raises(_Killed):
        run_selector(cfg, report, tmp_path / "cut", progress=False)
    rest = []
    resumed = run_selector(cfg, lambda m: rest.append({k: m[k] for k in keys}), tmp_path / "cut", progress=False,
                           resume_from=tmp_path / "cut")
    assert [m["iteration"] for m in rest] == [3, 4]  # no iteration repeated or skipped
    assert cut + rest == whole
    final_keys = ("iteration", "top1", "gflops", "reward", "token_ratio", "test_top1")
    assert {k: resumed.get(k) for k in final_keys} == {k: final.get(k) for k in final_keys}
    a, b = load_file(str(tmp_path / "whole" / SELECTOR_FILE)), load_file(str(tmp_path / "cut" / SELECTOR_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from prance.selector.store import read_selector_header

    # the run's action space was anchored at a static configuration, and resuming rebuilt it
    assert read_selector_header(tmp_path / "cut" / SELECTOR_FILE)["actions"]["anchor"]["name"] == "merge"

    # a truncated training state is refused in one line, never unpickled into garbage
    state = tmp_path / "cut" / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(PranceError, match="corrupt or truncated"):
        run_selector(cfg, None, tmp_path / "cut", progress=False, resume_from=tmp_path / "cut")
    # a state of another configuration is refused too
    with pytest.raises(PranceError, match="another configuration"):
        run_selector(cfg.model_copy(update={"actor_lr": 0.5}), None, tmp_path / "x", progress=False, resume_from=tmp_path / "whole")


def test_train_holdout_data_comes_from_the_images_pretraining_held_out(tmp_path):
    from prance.checkpoint import save_checkpoint
    from prance.data import FASHION_MNIST_SPEC, fashion_mnist, preprocess, pretrain_holdout
    from prance.splits import SplitSpec, load

    def load_data(meta, cfg):
        return load(meta, SplitSpec.of(cfg))

    meta = create_meta("prance_vit_micro")
    held_ckpt = save_checkpoint(tmp_path / "h.safetensors", meta, "prance_vit_micro", info={"config": {"holdout_fraction": 0.05}})
    cfg = SelectorConfig(checkpoint=str(held_ckpt), rollouts_from="train_holdout", val_limit=1000, train_limit=1500, test_limit=10000)
    data = load_data(meta, cfg)
    train = fashion_mnist("train", FASHION_MNIST_SPEC)
    seen, held = pretrain_holdout(train, 0.05)
    assert not set(seen.indices) & set(held.indices) and len(held.indices) == 3000
    x_held = train.batch(held.indices)[0]
    assert [data[k][0].shape[0] for k in ("val", "train", "test")] == [1000, 1500, 10000]
    held_float = [preprocess(data[k][0], FASHION_MNIST_SPEC) for k in ("val", "train")]  # split images are held as uint8
    assert torch.equal(held_float[0], x_held[:1000]) and torch.equal(held_float[1], x_held[1000:2500])
    with pytest.raises(PranceError, match="exceed the checkpoint's 3000 held-out"):
        load_data(meta, cfg.model_copy(update={"train_limit": 2500}))
    plain = save_checkpoint(tmp_path / "n.safetensors", meta, "prance_vit_micro")
    with pytest.raises(PranceError, match="held out no train images"):
        load_data(meta, cfg.model_copy(update={"checkpoint": str(plain)}))
    # auto (the default): the held-out train images when the checkpoint has them, else the test split's holdout
    def rollouts_source(cfg):
        return SplitSpec.of(cfg).source()

    auto = cfg.model_copy(update={"rollouts_from": "auto"})
    assert rollouts_source(auto) == "train_holdout" and torch.equal(load_data(meta, auto)["val"][0], data["val"][0])
    plain_auto = auto.model_copy(update={"checkpoint": str(plain), "train_limit": 1500, "test_limit": 100})
    assert rollouts_source(plain_auto) == "holdout"
    by_holdout = load_data(meta, plain_auto.model_copy(update={"rollouts_from": "holdout"}))
    assert torch.equal(load_data(meta, plain_auto)["val"][0], by_holdout["val"][0])
    assert SelectorConfig().rollouts_from == "auto" and rollouts_source(SelectorConfig()) == "train_holdout"  # the shipped supernet

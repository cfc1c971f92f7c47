"""Training the selector with PPO on the stage MDP (Result-to-Go rewards), budget-
conditioned: every episode draws its own budget around the target, and the budget is
part of the state, so one selector serves a range of budgets."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from prance.config import SelectorConfig
from prance.models.meta import MetaViT
from prance.selector import ppo, reward, static
from prance.selector.selector import Selector, evaluate_selector


def result_of(cfg: SelectorConfig, lam: float, correct: Tensor, macs: Tensor, budget: Tensor, tokens: Tensor) -> Tensor:
    """:func:`prance.selector.reward.result` with ``cfg``'s reward settings."""
    return reward.result(correct, macs, budget, tokens, cfg.reward_form, cfg.flops_weight, cfg.over_weight, cfg.token_weight, lam)


def reward_fn(meta: MetaViT, cfg: SelectorConfig, budget_gflops: float, lam: float) -> Callable:
    """``f(x, y, episode)``: the result of each greedy schedule at the target budget."""

    def f(x: Tensor, y: Tensor, ep) -> Tensor:
        full = meta(x).argmax(dim=-1)
        c = reward.correctness(ep.logits.argmax(dim=-1), y, full, cfg.correctness, ep.logits)
        return result_of(cfg, lam, c, ep.macs, torch.full_like(ep.macs, budget_gflops * 1e9), ep.token_ratio)

    return f


@dataclass
class TrainResult:
    selector: Selector  # the best one by validation Top-1 (budget is guaranteed by masking)
    best: dict  # its validation metrics (iteration 0: the warm start, when PPO never beat it)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    start: dict = field(default_factory=dict)  # the warm start's validation metrics and schedule (empty without one)


def batches(x: Tensor, y: Tensor, size: int):
    """Consecutive ``(x, y)`` batches of ``size`` from in-memory tensors."""
    for i in range(0, x.shape[0], size):
        yield x[i : i + size], y[i : i + size]


def sample_budgets(n: int, target: float, spread: float, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    """Per-episode budgets (GFLOPs) uniform in target*(1 +- spread), within [lo, hi]."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    b = target * (1 - spread + 2 * spread * u)
    return b.clamp(min=lo, max=hi)


def train_selector(
    meta: MetaViT,
    cfg: SelectorConfig,
    budget_gflops: float,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    callback: Callable[[dict, Selector], None] | None = None,
    progress: bool = True,
    selector: Selector | None = None,
) -> TrainResult:
    """PPO for ``cfg.iterations`` updates; every ``cfg.eval_every`` (and at the end) the
    greedy selector is evaluated on ``val`` at ``budget_gflops`` and ``callback(metrics,
    selector)`` is called with the best selector so far (its validation metrics, this
    iteration's training statistics, ``current_top1`` of the latest policy). ``selector``: a fresh one made from ``cfg`` by the caller
    (default: made here)."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    meta.eval()
    selector = selector or Selector.for_config(meta, cfg)
    selector.check_budget(budget_gflops)
    start_schedule = None
    if cfg.warm_start > 0:
        images = (train[0][: cfg.static_images], train[1][: cfg.static_images])
        found = static.best_schedule(meta, selector, budget_gflops, images, cfg.static_first_images, cfg.static_eta,
                                     max(cfg.batch_size, 256))
        if found is not None:
            start_schedule = found.best
            static.warm_start(selector, start_schedule, cfg.warm_start)
    policy = selector.policy
    actor_opt = torch.optim.Adam(policy.actor.parameters(), lr=cfg.actor_lr)
    critic_opt = torch.optim.Adam(policy.critic.parameters(), lr=cfg.critic_lr)
    settings = ppo.PPOSettings(cfg.clip, cfg.ppo_epochs, cfg.minibatch, cfg.entropy_coef, cfg.grad_clip)
    buffer = ppo.RolloutBuffer()
    S = selector.actions.num_stages
    active = torch.tensor([selector.actions.active(t) for t in range(S)], dtype=torch.bool)
    lo, hi = selector.min_gflops(), selector.full_gflops()
    lam = cfg.flops_weight
    xs, ys = train
    history: list[dict] = []
    best: dict | None = None
    best_state = None

    if cfg.warm_start > 0:
        # the starting (warm) policy is a candidate too: PPO must beat it on validation
        start = evaluate_selector(meta, selector, batches(*val, cfg.batch_size), budget_gflops, False, reward_fn(meta, cfg, budget_gflops, lam))
        if start_schedule is not None:
            start["warm_start"] = start_schedule.describe()
        best, best_state = {**start, "iteration": 0}, copy.deepcopy(policy.state_dict())
    else:
        start = {}

    bar = tqdm(range(1, cfg.iterations + 1), desc=f"selector {cfg.strategy}", unit="it", disable=not progress, leave=False)
    for it in bar:
        idx = torch.randperm(xs.shape[0], generator=gen)[: cfg.rollout_images]
        x, y = xs[idx], ys[idx]
        b = x.shape[0]
        budgets = sample_budgets(b, budget_gflops, cfg.budget_spread, lo, hi, gen)
        with torch.no_grad():
            full_logits = meta(x)
            full_pred = full_logits.argmax(dim=-1)
            ep = selector.run(meta, x, budgets, greedy=False, generator=gen, rtg=True)
            preds = ep.cont_logits.argmax(dim=-1)  # (B, S)
            correct = reward.correctness(preds, y[:, None], full_pred[:, None], cfg.correctness, ep.cont_logits)
            bmacs = budgets[:, None] * 1e9
            results = result_of(cfg, lam, correct, ep.cont_macs, bmacs, ep.cont_token_ratio)
            baseline = result_of(
                cfg,
                lam,
                reward.correctness(full_pred, y, full_pred, cfg.correctness, full_logits),
                torch.full((b,), selector.table.full_macs, dtype=torch.float64),
                budgets * 1e9,
                torch.ones(b),
            )
            rewards = reward.rtg_rewards(results, baseline)
            values = policy.value(ep.obs.view(b * S, -1)).view(b, S)
            adv, ret = ppo.gae_episodes(rewards, values, cfg.gamma, cfg.gae_lambda)
        buffer.add(
            ep.obs.view(b * S, -1),
            ep.actions.view(b * S, -1),
            [m.view(b * S, -1) for m in ep.masks],
            active[None].expand(b, S, -1).reshape(b * S, -1),
            ep.logp.view(b * S),
            adv.view(b * S),
            ret.view(b * S),
        )
        stats = ppo.update(policy, actor_opt, critic_opt, buffer, settings, gen)
        use = float((ep.macs / (budgets * 1e9)).mean())
        if cfg.reward_form == "constrained":
            lam = reward.update_multiplier(lam, use, cfg.lagrange_lr)
        train_row = {
            "iteration": it,
            "train_reward": float(results[:, -1].mean()),
            "train_top1": 100.0 * float((preds[:, -1] == y).float().mean()),
            "train_budget_use": use,
            "schedules": ep.groups,
            "lagrange": lam,
            **stats,
        }
        bar.set_postfix(reward=f"{train_row['train_reward']:.3f}", use=f"{use:.2f}")
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            val_reward = reward_fn(meta, cfg, budget_gflops, lam)
            metrics = evaluate_selector(meta, selector, batches(*val, cfg.batch_size), budget_gflops, False, val_reward)
            metrics.update(train_row)
            metrics["elapsed_s"] = time.perf_counter() - t_start
            metrics["lagrange"] = lam
            history.append(metrics)
            if best is None or metrics["top1"] > best["top1"]:
                best, best_state = dict(metrics), copy.deepcopy(policy.state_dict())
            if callback is not None:
                # report the selector that would be kept (best so far, the warm start
                # included) with this iteration's training statistics: a trial stopped
                # early by a scheduler ends with the policy it would keep, not its latest
                kept = {**best, **train_row, "iteration": it, "best_iteration": best["iteration"],
                        "current_top1": metrics["top1"], "elapsed_s": metrics["elapsed_s"], "lagrange": lam}
                current = copy.deepcopy(policy.state_dict())
                policy.load_state_dict(best_state)
                callback(kept, selector)
                policy.load_state_dict(current)
    policy.load_state_dict(best_state)
    return TrainResult(selector, best, history, time.perf_counter() - t_start, start)

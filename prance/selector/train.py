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

from prance.selector.config import SelectorConfig
from prance.device import autocast_for, of as device_of
from prance.models.meta import MetaViT
from prance.selector import ppo, reward, static
from prance.selector.actions import anchor_dict, anchor_of
from prance.selector.selector import Selector, evaluate_selector


def result_of(cfg: SelectorConfig, lam: float, correct: Tensor, macs: Tensor, budget: Tensor, tokens: Tensor) -> Tensor:
    """:func:`prance.selector.reward.result` with ``cfg``'s reward settings."""
    return reward.result(correct, macs, budget, tokens, cfg.reward_form, cfg.flops_weight, cfg.over_weight, cfg.token_weight, lam)


def full_logits(meta: MetaViT, x: Tensor, amp: bool = False) -> Tensor:
    """The full sub-network's logits of ``x`` (on the meta-network's device), float32 on the CPU."""
    dev = device_of(meta)
    with autocast_for(dev, amp):
        return meta(x.to(dev)).float().cpu()


def reward_fn(meta: MetaViT, cfg: SelectorConfig, budget_gflops: float, lam: float) -> Callable:
    """``f(x, y, episode)``: the result of each greedy schedule at the target budget."""

    def f(x: Tensor, y: Tensor, ep) -> Tensor:
        full = full_logits(meta, x, cfg.amp).argmax(dim=-1)
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


STATE_FORMAT = "prance-selector-train/1"


def _config_key(cfg: SelectorConfig) -> str:
    """What must not change between a training state and the run resuming it."""
    import json

    return json.dumps(cfg.model_dump(exclude={"checkpoint", "device"}), sort_keys=True, default=str)


@dataclass
class TrainState:
    """What PPO carries from one iteration to the next: the selector being trained, its
    optimisers and random stream, the Lagrange multiplier, the validation history and the
    best policy so far. :meth:`saved` is the form a run resumes from (plain data and
    tensors, ``weights_only``), :meth:`restore` reads it back."""

    selector: Selector
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    gen: torch.Generator
    lam: float  # the reward's FLOPs weight (the constrained form's multiplier)
    iteration: int = 0  # the last PPO iteration done
    history: list[dict] = field(default_factory=list)  # validation metrics of every evaluation
    start: dict = field(default_factory=dict)  # the warm start's validation metrics (empty without one)
    best: dict | None = None  # the best validation metrics so far
    best_policy: dict | None = None  # its policy's state
    t_start: float = 0.0  # perf_counter at the start (moved back by a resumed run's elapsed time)

    @classmethod
    def fresh(cls, selector: Selector, cfg: SelectorConfig) -> "TrainState":
        policy = selector.policy
        return cls(selector, torch.optim.Adam(policy.actor.parameters(), lr=cfg.actor_lr),
                   torch.optim.Adam(policy.critic.parameters(), lr=cfg.critic_lr),
                   torch.Generator().manual_seed(cfg.seed), cfg.flops_weight, t_start=time.perf_counter())

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def saved(self, cfg: SelectorConfig, budget_gflops: float) -> dict:
        """Everything PPO carries past :attr:`iteration`: plain data and tensors (``weights_only``)."""
        anchor = self.selector.actions.anchor
        return {
            "format": STATE_FORMAT, "config": _config_key(cfg), "budget_gflops": float(budget_gflops),
            "iteration": int(self.iteration), "policy": copy.deepcopy(self.selector.policy.state_dict()),
            "best_policy": self.best_policy, "best": self.best,
            "actor_opt": copy.deepcopy(self.actor_opt.state_dict()), "critic_opt": copy.deepcopy(self.critic_opt.state_dict()),
            "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "lagrange": float(self.lam),
            "history": list(self.history), "start": dict(self.start), "elapsed_s": float(self.elapsed()),
            "anchor": anchor_dict(anchor) if anchor is not None else None,
        }

    def restore(self, saved: dict) -> None:
        """Continue from ``saved`` (:meth:`saved`, checked by :func:`check_resumable`)."""
        self.selector.policy.load_state_dict(saved["policy"])
        self.actor_opt.load_state_dict(saved["actor_opt"])
        self.critic_opt.load_state_dict(saved["critic_opt"])
        self.gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        self.lam, self.history, self.start = float(saved["lagrange"]), list(saved["history"]), dict(saved["start"])
        if saved["best"] is not None:
            self.best, self.best_policy = dict(saved["best"]), saved["best_policy"]
        self.iteration = int(saved["iteration"])
        self.t_start -= float(saved["elapsed_s"])

    def keep_if_best(self, metrics: dict, budget_gflops: float) -> None:
        """``metrics`` (and the current policy) become the best when they meet the budget
        -- the mean; a cap selector meets it by its mask -- with a higher Top-1."""
        meets = metrics["gflops"] <= budget_gflops * (1 + 1e-9)
        if meets and (self.best is None or metrics["top1"] > self.best["top1"]):
            self.best, self.best_policy = dict(metrics), copy.deepcopy(self.selector.policy.state_dict())


def check_resumable(state: dict, cfg: SelectorConfig, budget_gflops: float) -> None:
    """PranceError unless ``state`` is a training state of this very run."""
    from prance.errors import PranceError

    if state.get("format") != STATE_FORMAT:
        raise PranceError(f"not a selector training state of format {STATE_FORMAT} (found {state.get('format')!r})")
    if state.get("config") != _config_key(cfg) or abs(float(state.get("budget_gflops", -1)) - budget_gflops) > 1e-12:
        raise PranceError("the selector training state belongs to another configuration or budget: start the run afresh")
    if not 1 <= int(state.get("iteration", 0)) <= cfg.iterations:
        raise PranceError(f"the selector training state is at iteration {state.get('iteration')}, outside 1..{cfg.iterations}")


def batches(x: Tensor, y: Tensor, size: int):
    """Consecutive ``(x, y)`` batches of ``size`` from in-memory tensors."""
    for i in range(0, x.shape[0], size):
        yield x[i : i + size], y[i : i + size]


def sample_budgets(n: int, target: float, spread: float, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    """Per-episode budgets (GFLOPs) uniform in target*(1 +- spread), within [lo, hi]."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    b = target * (1 - spread + 2 * spread * u)
    return b.clamp(min=lo, max=hi)


def _say(progress: bool, text: str) -> None:
    """A progress line on stderr (the silent minutes before the first PPO iteration)."""
    if progress:
        import sys

        print(f"[selector] {text}", file=sys.stderr, flush=True)


def _warm_start(meta: MetaViT, selector: Selector, cfg: SelectorConfig, budget_gflops: float,
                train: tuple[Tensor, Tensor]) -> tuple[Selector, "static.Schedule | None"]:
    """The best static schedule at the budget (on the first ``static_images`` rollout
    images) -- with ``static_anchor``, of the action space anchored at the best static
    configuration of the strategy, that configuration included (:mod:`prance.selector.static`)
    -- and the selector (anchored or ``selector``) with its policy's initial logits moved
    towards it; the schedule is None (and the policy untouched) when none fits."""
    images = (train[0][: cfg.static_images], train[1][: cfg.static_images])
    batch = max(cfg.batch_size, 256)
    extra = []
    if cfg.static_anchor:
        make = lambda anchor: selector if anchor is None else Selector.for_config(meta, cfg, anchor, selector.fingerprint)  # noqa: E731
        anchored = static.find_anchor(meta, make, budget_gflops, images, halving=cfg.static_halving, batch_size=batch)
        if anchored is not None:
            selector, sched, _ = anchored
            extra = [sched]
    found = static.best_schedule(meta, selector, budget_gflops, images, halving=cfg.static_halving, batch_size=batch,
                                extra=extra)
    if found is None:
        return selector, None
    static.warm_start(selector, found.best, cfg.warm_start)
    return selector, found.best


def _rollout(meta: MetaViT, state: TrainState, cfg: SelectorConfig, budget_gflops: float, x: Tensor, y: Tensor,
             buffer: "ppo.RolloutBuffer"):
    """One PPO rollout on the images ``x``: per-image budgets around ``budget_gflops``
    (within what the selector reaches), a sampled episode per image, Result-to-Go rewards
    against the full sub-network and their GAE advantages, added to ``buffer``. Returns
    (episode, per-stage predictions, results, budgets)."""
    selector, lam, gen = state.selector, state.lam, state.gen
    policy = selector.policy
    b, S = x.shape[0], selector.actions.num_stages
    active = torch.tensor([selector.actions.active(t) for t in range(S)], dtype=torch.bool)
    budgets = sample_budgets(b, budget_gflops, cfg.budget_spread, selector.min_gflops(), selector.full_gflops(), gen)
    with torch.no_grad():
        full = full_logits(meta, x, cfg.amp)
        full_pred = full.argmax(dim=-1)
        # episodes and completions run on the meta-network's device; the policy and PPO on the CPU
        ep = selector.run_episode(meta, x.to(device_of(meta)), budgets, greedy=False, generator=gen, rtg=True, amp=cfg.amp)
        preds = ep.cont_logits.argmax(dim=-1)  # (B, S)
        correct = reward.correctness(preds, y[:, None], full_pred[:, None], cfg.correctness, ep.cont_logits)
        bmacs = budgets[:, None] * 1e9
        results = result_of(cfg, lam, correct, ep.cont_macs, bmacs, ep.cont_token_ratio)
        baseline = result_of(
            cfg,
            lam,
            reward.correctness(full_pred, y, full_pred, cfg.correctness, full),
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
    return ep, preds, results, budgets


def train_selector(
    meta: MetaViT,
    cfg: SelectorConfig,
    budget_gflops: float,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    callback: Callable[[dict, Selector, dict], None] | None = None,
    *,
    progress: bool = True,
    selector: Selector | None = None,
    resume: dict | None = None,
) -> TrainResult:
    """PPO for ``cfg.iterations`` updates; every ``cfg.eval_every`` (and at the end) the
    greedy selector is evaluated on ``val`` at ``budget_gflops`` and ``callback(metrics,
    selector, state)`` is called with the best selector so far (its validation metrics,
    this iteration's training statistics, ``current_top1`` of the latest policy) and the
    training state to resume from (:meth:`TrainState.saved`). ``selector``: a fresh one made
    from ``cfg`` by the caller (default: made here). ``resume``: such a state; training
    continues after its iteration exactly as it would have without the interruption."""
    state = _begin(meta, cfg, budget_gflops, train, val, selector, resume, progress)
    selector, policy = state.selector, state.selector.policy
    settings = ppo.PPOSettings.of(cfg)
    buffer = ppo.RolloutBuffer()
    xs, ys = train
    first = state.iteration + 1
    bar = tqdm(range(first, cfg.iterations + 1), desc=f"selector {cfg.strategy}", unit="it", disable=not progress, leave=False,
               initial=first - 1, total=cfg.iterations)
    for it in bar:
        state.iteration = it
        idx = torch.randperm(xs.shape[0], generator=state.gen)[: cfg.rollout_images]
        x, y = xs[idx], ys[idx]
        ep, preds, results, budgets = _rollout(meta, state, cfg, budget_gflops, x, y, buffer)
        stats = ppo.update(policy, state.actor_opt, state.critic_opt, buffer, settings, state.gen)
        use = float((ep.macs / (budgets * 1e9)).mean())
        if cfg.reward_form == "constrained":
            state.lam = reward.update_multiplier(state.lam, use, cfg.lagrange_lr)
        train_row = {
            "iteration": it,
            "train_reward": float(results[:, -1].mean()),
            "train_top1": 100.0 * float((preds[:, -1] == y).float().mean()),
            "train_budget_use": use,
            "schedules": ep.groups,
            "lagrange": state.lam,
            **stats,
        }
        bar.set_postfix(reward=f"{train_row['train_reward']:.3f}", use=f"{use:.2f}")
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            _validate(meta, state, cfg, budget_gflops, val, train_row, callback)
    policy.load_state_dict(state.best_policy)
    return TrainResult(selector, state.best, state.history, state.elapsed(), state.start)


def _begin(meta: MetaViT, cfg: SelectorConfig, budget_gflops: float, train: tuple[Tensor, Tensor],
           val: tuple[Tensor, Tensor], selector: Selector | None, resume: dict | None, progress: bool) -> TrainState:
    """The state before the first iteration: resumed from ``resume`` (in the action space
    it was trained in), or fresh -- with ``cfg.warm_start``, the policy moved towards the
    best static schedule and scored on ``val`` as the first candidate PPO must beat."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    meta.eval()
    selector = selector or Selector.for_config(meta, cfg)
    selector.check_budget(budget_gflops)
    if resume is not None:
        check_resumable(resume, cfg, budget_gflops)
    start_schedule = None
    if resume is not None and resume.get("anchor") is not None:  # the action space the state was trained in
        selector = Selector.for_config(meta, cfg, anchor_of(resume["anchor"]), selector.fingerprint)
    elif resume is None and cfg.warm_start > 0:
        t_warm = time.perf_counter()
        _say(progress, f"warm start: searching the best static schedule at {budget_gflops:.4g} GFLOPs "
                       f"on {min(cfg.static_images, len(train[1]))} rollout images")
        selector, start_schedule = _warm_start(meta, selector, cfg, budget_gflops, train)
        _say(progress, f"warm start: {start_schedule.describe() if start_schedule is not None else 'no static schedule fits'} "
                       f"({time.perf_counter() - t_warm:.0f}s); scoring it on the validation images")
    state = TrainState.fresh(selector, cfg)
    state.t_start = t_start
    if resume is not None:  # everything the loop carries from one iteration to the next
        state.restore(resume)
    elif cfg.warm_start > 0:
        # the starting (warm) policy is a candidate too: PPO must beat it on validation
        state.start = evaluate_selector(meta, selector, batches(*val, cfg.batch_size), budget_gflops, progress=False,
                                        reward_fn=reward_fn(meta, cfg, budget_gflops, state.lam), amp=cfg.amp)
        if start_schedule is not None:
            state.start["warm_start"] = start_schedule.describe()
        state.best, state.best_policy = {**state.start, "iteration": 0}, copy.deepcopy(selector.policy.state_dict())
    return state


def _validate(meta: MetaViT, state: TrainState, cfg: SelectorConfig, budget_gflops: float, val: tuple[Tensor, Tensor],
              train_row: dict, callback: Callable[[dict, Selector, dict], None] | None) -> None:
    """The greedy selector on ``val``: into the history, kept when best, and reported to
    ``callback`` with the selector that would be kept."""
    selector, policy = state.selector, state.selector.policy
    metrics = evaluate_selector(meta, selector, batches(*val, cfg.batch_size), budget_gflops, progress=False,
                                reward_fn=reward_fn(meta, cfg, budget_gflops, state.lam), amp=cfg.amp)
    metrics.update(train_row)
    metrics["elapsed_s"] = state.elapsed()
    metrics["lagrange"] = state.lam
    state.history.append(metrics)
    state.keep_if_best(metrics, budget_gflops)
    if callback is None:
        return
    # report the selector that would be kept (best so far, the warm start included) with
    # this iteration's training statistics: a trial stopped early by a scheduler ends with
    # the policy it would keep, not its latest
    best = state.best
    kept = {**best, **train_row, "iteration": state.iteration, "best_iteration": best["iteration"],
            "current_top1": metrics["top1"], "elapsed_s": metrics["elapsed_s"], "lagrange": state.lam}
    saved = state.saved(cfg, budget_gflops)
    policy.load_state_dict(state.best_policy)
    callback(kept, selector, saved)
    policy.load_state_dict(saved["policy"])

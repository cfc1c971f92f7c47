"""The PRANCE selector as the learned controller of a multi-pass cascade (issue 35, part 4).

A *pass* runs one static configuration of a ladder (:func:`prance.cascade.ladder`,
cheapest first, the full sub-network last) on an image. Every image runs the controller's
first rung; after each pass the policy sees that pass's output and chooses to stop (the
answer is that pass's logits) or which more expensive rung runs next, up to
``max_passes`` passes. An image costs the GFLOPs of every pass it ran plus the policy's
own multiply-accumulates per decision, so the budget is a *mean* over images.

This is PRANCE's MDP with a pass as the step:

- **Observation** (:func:`features`): the pass's softmax probabilities sorted (the
  confidence profile, class-order free), the top-1 margin, the normalised entropy, whether
  it agrees with the previous pass's answer, the rung it came from, how many passes ran,
  and the GFLOPs spent over the budget. A confidence cascade sees only the first of these.
- **Result-to-Go reward** (:func:`step_rewards`): the result obtainable after step ``t``
  is ``R_t = p_t(label) - lambda * spent_t / budget`` (``soft`` correctness: the
  probability the current answer gives the label, as :mod:`prance.selector.reward`), and
  the reward of step ``t`` is ``R_t - R_{t-1}`` with ``R_{-1}`` the first pass's result.
  The multiplier ``lambda`` follows dual ascent on the mean GFLOPs over the budget
  (:func:`prance.selector.reward.update_multiplier`): the constrained form that holds a
  mean budget.
- **Warm start and keep rule**: the policy is first fitted to imitate the best cascade
  the search found on the same ladder (:func:`imitate`), and a trained policy is kept
  only if it beats that cascade's Top-1 on the validation images at no more mean GFLOPs;
  otherwise the controller *is* the cascade.

Training and validation need no forward passes beyond the ladder's logits on the rollout
and validation images (the environment is a table lookup, :class:`Table`): PPO costs
milliseconds per iteration. :func:`run` executes a controller on new images for real,
one rung at a time on the images that reach it; it equals the table episode (tested).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from prance import cascade as casc
from prance.budget import spread
from prance.errors import PranceError
from prance.selector.policy import ActorCritic
from prance.selector.ppo import PPOSettings, RolloutBuffer, gae_episodes, update
from prance.selector.reward import update_multiplier
from prance.static_search import StaticConfig

STOP = 0  # action 0 stops; action j >= 1 runs ladder rung j - 1
CONTROLLER_FILE = "controller.safetensors"  # the file name in a sweep trial's checkpoint folder
FORMAT = "prance-controller/1"


@dataclass(frozen=True)
class Table:
    """A ladder's logits on a set of images, the environment of training and validation."""

    logits: Tensor  # (n, K, classes) float32
    labels: Tensor  # (n,)
    costs: Tensor  # (K,) float64 GFLOPs of each rung, cheapest first

    @classmethod
    def of(cls, meta, ladder: list[StaticConfig], x: Tensor, y: Tensor, batch_size: int = 256) -> "Table":
        logits = torch.stack([casc.logits_of(meta, c, x, batch_size) for c in ladder], dim=1)
        return cls(logits, y, torch.tensor([c.gflops for c in ladder], dtype=torch.float64))


def feature_dim(classes: int, rungs: int, max_passes: int) -> int:
    return classes + 3 + rungs + max_passes + 1


def features(logits: Tensor, prev_pred: Tensor, rung: Tensor, passes: Tensor, spent: Tensor, budget: float,
             rungs: int, max_passes: int) -> Tensor:
    """(B, feature_dim) observations after a pass; ``prev_pred`` is -1 before a second pass."""
    p = logits.float().softmax(-1)
    top = p.sort(dim=-1, descending=True).values
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])
    agree = ((prev_pred >= 0) & (prev_pred == p.argmax(-1))).float()
    return torch.cat([top, (top[:, 0] - top[:, 1])[:, None], ent[:, None], agree[:, None],
                      torch.nn.functional.one_hot(rung, rungs).float(),
                      torch.nn.functional.one_hot(passes - 1, max_passes).float(),
                      (spent / budget).float()[:, None]], dim=1)


def allowed(rung: Tensor, passes: Tensor, rungs: int, max_passes: int) -> Tensor:
    """(B, rungs + 1) the actions open: stop always; a rung above the current one while passes remain."""
    j = torch.arange(rungs)
    up = (j[None, :] > rung[:, None]) & (passes[:, None] < max_passes)
    return torch.cat([torch.ones(rung.shape[0], 1, dtype=torch.bool), up], dim=1)


@dataclass
class Controller:
    """A trained controller (``policy``) or, when none beat it, the cascade it started from."""

    ladder: list[StaticConfig]
    start: int  # the ladder rung every image runs first
    max_passes: int
    budget_gflops: float
    cascade: casc.Cascade  # the warm start, and the fallback
    target_gflops: float  # the mean the policy was trained to hold (the budget less the cascade's margin)
    policy: ActorCritic | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def decision_gflops(self) -> float:
        return 0.0 if self.policy is None else self.policy.actor_macs() / 1e9

    def describe(self) -> str:
        if self.policy is None:
            return f"controller = its warm start: {self.cascade.describe()}"
        return f"controller over {len(self.ladder)} rungs from {self.ladder[self.start].describe()}, up to {self.max_passes} passes"


@dataclass
class Episode:
    """Per decision step (S = max_passes - 1): what the policy saw and did."""

    obs: list[Tensor]
    actions: list[Tensor]
    masks: list[Tensor]
    logp: list[Tensor]
    active: list[Tensor]  # (B,) bool: the image was still deciding at this step
    answers: list[Tensor]  # (B, classes): the answer after each step
    spent: list[Tensor]  # (B,) GFLOPs after each step
    first: Tensor  # (B, classes): the first pass's answer
    first_spent: Tensor
    passes: Tensor  # (B,)


def _advance(state: dict, action: Tensor, rung_logits, costs: Tensor) -> None:
    """Run the rung each image chose (``action`` j >= 1: rung j - 1; STOP: nothing) and
    update its answer, previous answer, rung, passes and GFLOPs spent."""
    for j in action.unique().tolist():
        if j == STOP:
            continue
        idx = (action == j).nonzero().squeeze(1)
        state["prev"][idx] = state["answer"][idx].argmax(-1)
        state["answer"][idx] = rung_logits(j - 1, idx)
        state["rung"][idx] = j - 1
        state["passes"][idx] += 1
        state["spent"][idx] += costs[j - 1]


def _step(policy, state: dict, table_rung, costs: Tensor, budget: float, rungs: int, max_passes: int, overhead: float,
          greedy: bool, generator) -> tuple:
    """One decision for the images of ``state``; ``table_rung(j, idx)`` gives rung j's logits on images idx."""
    active = state["active"]
    obs = features(state["answer"], state["prev"], state["rung"], state["passes"], state["spent"], budget, rungs, max_passes)
    mask = allowed(state["rung"], state["passes"], rungs, max_passes) & active[:, None]
    mask[~active, STOP] = True
    with torch.no_grad():
        d = policy.act(obs, mask, (True,), (0,), greedy, generator)
    action = torch.where(active, d.actions[:, 0], torch.zeros_like(d.actions[:, 0]))
    state["spent"] = state["spent"] + overhead * active.double()
    _advance(state, action, table_rung, costs)
    state["active"] = active & (action != STOP) & (state["passes"] < max_passes)
    return obs, action, mask, d.logp, active


def episode(policy: ActorCritic, first: Tensor, table_rung, costs: Tensor, start: int, budget: float, max_passes: int,
            overhead: float, greedy: bool = True, generator=None) -> Episode:
    """The controller's decisions on images whose first pass gave ``first`` (B, classes)."""
    b, rungs = first.shape[0], costs.shape[0]
    state = {"answer": first.clone(), "prev": torch.full((b,), -1, dtype=torch.long), "rung": torch.full((b,), start, dtype=torch.long),
             "passes": torch.ones(b, dtype=torch.long), "spent": torch.full((b,), float(costs[start]), dtype=torch.float64),
             "active": torch.ones(b, dtype=torch.bool) if max_passes > 1 else torch.zeros(b, dtype=torch.bool)}
    ep = Episode([], [], [], [], [], [], [], first, state["spent"].clone(), state["passes"])
    for _ in range(max_passes - 1):
        obs, action, mask, logp, active = _step(policy, state, table_rung, costs, budget, rungs, max_passes, overhead, greedy, generator)
        for name, v in (("obs", obs), ("actions", action), ("masks", mask), ("logp", logp), ("active", active)):
            getattr(ep, name).append(v)
        ep.answers.append(state["answer"].clone())
        ep.spent.append(state["spent"].clone())
    ep.passes = state["passes"]
    return ep


def table_episode(policy, table: Table, idx: Tensor, start: int, budget: float, max_passes: int, overhead: float,
                  greedy: bool = True, generator=None) -> Episode:
    sub = table.logits[idx]
    return episode(policy, sub[:, start], lambda j, i: sub[i, j], table.costs, start, budget, max_passes, overhead, greedy, generator)


def final(ep: Episode) -> tuple[Tensor, Tensor]:
    """(answer logits, GFLOPs spent) of every image at the end of the episode."""
    if not ep.answers:
        return ep.first, ep.first_spent
    return ep.answers[-1], ep.spent[-1]


def step_rewards(ep: Episode, labels: Tensor, lam: float, budget: float) -> Tensor:
    """(B, S) Result-to-Go rewards ``R_t - R_{t-1}``, ``R = p(label) - lam * spent / budget``."""
    def result(logits, spent):
        p = logits.float().softmax(-1).gather(1, labels[:, None]).squeeze(1)
        return p - lam * (spent / budget).float()

    results = torch.stack([result(a, s) for a, s in zip(ep.answers, ep.spent)], dim=1)
    prev = torch.cat([result(ep.first, ep.first_spent)[:, None], results[:, :-1]], dim=1)
    return results - prev


@dataclass(frozen=True)
class PassSettings:
    iterations: int = 60
    images_per_iteration: int = 1024
    lr: float = 3e-4
    hidden: int = 64
    gae_lambda: float = 0.95
    multiplier: float = 0.05  # lambda's start
    multiplier_lr: float = 0.05
    imitation_epochs: int = 30
    eval_every: int = 5
    seed: int = 0
    ppo: PPOSettings = field(default_factory=PPOSettings)


def cascade_actions(cascade: casc.Cascade, ladder: list[StaticConfig], logits: Tensor, rung: Tensor, active: Tensor) -> Tensor:
    """The action the cascade's rule takes after a pass at ``rung`` with ``logits``: the
    next rung of its chain while the answer is unsure, else stop."""
    index = {c.describe(): i for i, c in enumerate(ladder)}
    chain = [index[c.describe()] for c in cascade.rungs]
    action = torch.zeros(rung.shape[0], dtype=torch.long)
    for t, threshold in enumerate(cascade.thresholds):
        here = active & (rung == chain[t]) & casc.escalates(logits, threshold)
        action[here] = chain[t + 1] + 1
    return action


def imitate(policy: ActorCritic, cascade: casc.Cascade, ladder: list[StaticConfig], table: Table, start: int, budget: float,
            max_passes: int, epochs: int, lr: float) -> None:
    """Fit the actor to the cascade's decisions on the states the cascade visits (cross-entropy)."""
    if not cascade.thresholds:
        return
    rule = lambda j, i: table.logits[i, j]  # noqa: E731
    n = table.logits.shape[0]
    state = {"answer": table.logits[:, start].clone(), "prev": torch.full((n,), -1, dtype=torch.long),
             "rung": torch.full((n,), start, dtype=torch.long), "passes": torch.ones(n, dtype=torch.long),
             "spent": torch.full((n,), float(table.costs[start]), dtype=torch.float64)}
    obs, acts, masks = [], [], []
    active = torch.ones(n, dtype=torch.bool)
    for _ in range(max_passes - 1):
        obs.append(features(state["answer"], state["prev"], state["rung"], state["passes"], state["spent"], budget,
                            len(ladder), max_passes)[active])
        masks.append(allowed(state["rung"], state["passes"], len(ladder), max_passes)[active])
        a = cascade_actions(cascade, ladder, state["answer"], state["rung"], active)
        acts.append(a[active])
        _advance(state, a, rule, table.costs)  # a is STOP wherever the image no longer decides
        active = active & (a != STOP)
    o, a, m = torch.cat(obs), torch.cat(acts), torch.cat(masks)
    opt = torch.optim.Adam(policy.actor.parameters(), lr=lr)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(policy.actor(o).masked_fill(~m, float("-inf")), a)
        opt.zero_grad()
        loss.backward()
        opt.step()


def score(policy, table: Table, start: int, budget: float, max_passes: int, overhead: float) -> dict:
    """Greedy Top-1 (%) and per-image GFLOPs of ``policy`` on every image of ``table``."""
    ep = table_episode(policy, table, torch.arange(table.labels.shape[0]), start, budget, max_passes, overhead)
    logits, spent = final(ep)
    return {"top1": 100.0 * float((logits.argmax(-1) == table.labels).double().mean()), **spread(spent.tolist()),
            "passes": float(ep.passes.double().mean())}


def train(ladder: list[StaticConfig], found: casc.CascadeResult, rollouts: Table, val: Table, budget_gflops: float,
          settings: PassSettings = PassSettings(), max_passes: int = casc.MAX_RUNGS, progress=None) -> Controller:
    """PPO over passes, warm-started from ``found`` (the cascade search's result on the same
    ladder and validation images); the policy is kept only if it beats that cascade."""
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    index = {c.describe(): i for i, c in enumerate(ladder)}
    start = index[found.best.rungs[0].describe()]
    classes, k = rollouts.logits.shape[2], len(ladder)
    max_passes = max(max_passes, len(found.best.rungs))
    target = budget_gflops * (1 - found.margin)
    policy = ActorCritic(feature_dim(classes, k, max_passes), (k + 1,), settings.hidden)
    imitate(policy, found.best, ladder, rollouts, start, target, max_passes, settings.imitation_epochs, 10 * settings.lr)
    ctl = Controller(ladder, start, max_passes, budget_gflops, found.best, target)
    overhead = policy.actor_macs() / 1e9
    best = {"top1": found.top1, "gflops": found.gflops}
    lam = settings.multiplier
    actor_opt = torch.optim.Adam(policy.actor.parameters(), lr=settings.lr)
    critic_opt = torch.optim.Adam(policy.critic.parameters(), lr=settings.lr)
    buf = RolloutBuffer()
    for it in range(1, settings.iterations + 1):
        idx = torch.randperm(rollouts.labels.shape[0], generator=gen)[: settings.images_per_iteration]
        ep = table_episode(policy, rollouts, idx, start, target, max_passes, overhead, greedy=False, generator=gen)
        _ppo_step(policy, ep, rollouts.labels[idx], lam, target, settings, buf, actor_opt, critic_opt, gen)
        lam = update_multiplier(lam, float(final(ep)[1].mean()) / target, settings.multiplier_lr)
        if it % settings.eval_every == 0 or it == settings.iterations:
            s = score(policy, val, start, target, max_passes, overhead)
            ctl.history.append({"iteration": it, "multiplier": lam, **{f"val_{k}": v for k, v in s.items()}})
            if s["gflops"] <= target * (1 + 1e-9) and s["top1"] > best["top1"]:
                best, ctl.policy = s, copy.deepcopy(policy)
            if progress is not None:
                progress(f"[passes] it {it}: val top1 {s['top1']:.2f}% at {s['gflops']:.4g} GFLOPs (kept {best['top1']:.2f}%)")
    return ctl


def _ppo_step(policy, ep: Episode, labels: Tensor, lam: float, budget: float, settings: PassSettings, buf: RolloutBuffer,
              actor_opt, critic_opt, gen) -> None:
    rewards = step_rewards(ep, labels, lam, budget)  # (B, S)
    active = torch.stack(ep.active, dim=1)  # (B, S)
    obs = torch.stack(ep.obs, dim=1)
    with torch.no_grad():
        values = policy.value(obs.flatten(0, 1)).view(active.shape) * active.float()
    adv, ret = gae_episodes(rewards * active.float(), values, 1.0, settings.gae_lambda)
    for t in range(active.shape[1]):
        a = active[:, t]
        if bool(a.any()):
            buf.add(ep.obs[t][a], ep.actions[t][a][:, None], [ep.masks[t][a]], torch.ones(int(a.sum()), 1, dtype=torch.bool),
                    ep.logp[t][a], adv[a, t], ret[a, t])
    if len(buf):
        update(policy, actor_opt, critic_opt, buf, settings.ppo, gen)


@torch.inference_mode()
def run(meta, ctl: Controller, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, passes, GFLOPs of each image) of the controller on the images ``x``, each
    rung run only on the images that reach it."""
    if ctl.policy is None:
        logits, passes = casc.forward(meta, ctl.cascade, x, batch_size)
        return logits, passes, torch.tensor(ctl.cascade.costs(), dtype=torch.float64)[passes - 1]
    costs = torch.tensor([c.gflops for c in ctl.ladder], dtype=torch.float64)
    first = casc.logits_of(meta, ctl.ladder[ctl.start], x, batch_size)
    rung = lambda j, i: casc.logits_of(meta, ctl.ladder[j], x[i], batch_size)  # noqa: E731
    ep = episode(ctl.policy, first, rung, costs, ctl.start, ctl.target_gflops, ctl.max_passes, ctl.decision_gflops)
    logits, spent = final(ep)
    return logits, ep.passes, spent


def evaluate(meta, ctl: Controller, x: Tensor, y: Tensor, batch_size: int = 256) -> dict:
    """Top-1 (%), per-image GFLOPs (mean, p95, max), mean passes, the share of images that
    ran more than one pass, and images/s of the controller run batch by batch (each rung
    on the images of the batch that reach it, the policy's decisions included)."""
    from prance.device import of as device_of, synchronize

    if x.shape[0] == 0:
        raise PranceError("no images to evaluate the controller on")
    dev = device_of(meta)
    out, seconds = [], 0.0
    for i in range(0, x.shape[0], batch_size):
        synchronize(dev)
        t0 = time.perf_counter()
        out.append(run(meta, ctl, x[i : i + batch_size], batch_size))
        synchronize(dev)
        seconds += time.perf_counter() - t0
    logits, passes, spent = (torch.cat(t) for t in zip(*out))
    return {"top1": 100.0 * float((logits.argmax(-1) == y).double().mean()), **spread(spent.tolist()),
            "passes": float(passes.double().mean()), "escalated": float((passes > 1).double().mean()),
            "throughput_img_s": x.shape[0] / seconds, "n_images": int(x.shape[0])}


# ------------------------------------------------------------------ checkpoints


def save(ctl: Controller, path: str | Path, fingerprint: str) -> None:
    """``ctl`` as safetensors (the policy's weights, none for a cascade) with a JSON header:
    its ladder and fallback cascade as descriptions, read back by :func:`load`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "ladder": [c.describe() for c in ctl.ladder], "start": ctl.start,
              "max_passes": ctl.max_passes, "budget_gflops": ctl.budget_gflops, "target_gflops": ctl.target_gflops,
              "cascade": ctl.cascade.describe(), "meta_fingerprint": fingerprint,
              "hidden": None if ctl.policy is None else ctl.policy.hidden}
    state = {} if ctl.policy is None else {k: v.detach().contiguous() for k, v in ctl.policy.state_dict().items()}
    if not state:
        state = {"none": torch.zeros(0)}  # safetensors keeps a file with at least one tensor
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"prance": json.dumps(header)})
    os.replace(tmp, path)


def load(path: str | Path, meta) -> Controller:
    """The controller saved at ``path``, on ``meta`` (the meta-network it was trained on)."""
    from safetensors import safe_open

    from prance import static_search
    from prance.selector.selector import meta_fingerprint

    path = Path(path)
    if not path.is_file():
        raise PranceError(f"controller checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("prance", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not safetensors, or a broken header
        raise PranceError(f"{path} is not a controller checkpoint ({e.__class__.__name__})") from None
    if header.get("format") != FORMAT:
        raise PranceError(f"{path} is not a prance controller checkpoint (format {header.get('format')!r})")
    if header["meta_fingerprint"] != meta_fingerprint(meta):
        raise PranceError(f"controller {path} was trained on another meta-network: pass the --checkpoint it was trained with")
    ladder = [static_search.parse(t, meta) for t in header["ladder"]]
    ctl = Controller(ladder, int(header["start"]), int(header["max_passes"]), float(header["budget_gflops"]),
                     casc.parse(header["cascade"], meta), float(header["target_gflops"]))
    if header.get("hidden") is not None:
        classes = meta.arch.num_classes
        ctl.policy = ActorCritic(feature_dim(classes, len(ladder), ctl.max_passes), (len(ladder) + 1,), int(header["hidden"]))
        ctl.policy.load_state_dict(state)
        ctl.policy.eval()
    return ctl

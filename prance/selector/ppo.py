"""Proximal Policy Optimisation for the selector, with the bugs of PRANCE's released
code fixed: the buffer is cleared after every update, GAE runs per episode and stops at
``done``, the log-probability is that of the action actually executed (masks stored with
it), advantages are normalised, updates use shuffled minibatches for several epochs with
an entropy bonus and gradient clipping, and everything is seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prance.selector.config import SelectorConfig
from prance.selector.policy import ActorCritic


def gae(rewards: Tensor, values: Tensor, dones: Tensor, gamma: float, lam: float, last_value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a time-ordered sequence of transitions
    (several episodes one after another). ``dones[i]`` ends an episode after step
    ``i``: nothing flows back across it. Returns (advantages, returns)."""
    n = rewards.shape[0]
    adv = torch.zeros(n, dtype=torch.float64)
    running = 0.0
    next_value = float(last_value)
    for i in range(n - 1, -1, -1):
        nonterminal = 0.0 if bool(dones[i]) else 1.0
        delta = float(rewards[i]) + gamma * next_value * nonterminal - float(values[i])
        running = delta + gamma * lam * nonterminal * running
        adv[i] = running
        next_value = float(values[i])
    adv = adv.to(values.dtype)
    return adv, adv + values


def gae_episodes(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE for a batch of equal-length episodes (B, S) that all end at step S-1:
    the vectorised form of :func:`gae` (tested equal to it)."""
    b, s = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(b, dtype=rewards.dtype)
    next_value = torch.zeros(b, dtype=rewards.dtype)
    for t in range(s - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
        next_value = values[:, t]
    return adv, adv + values


@dataclass
class RolloutBuffer:
    """Transitions of one policy iteration; :meth:`clear` after each update."""

    obs: list[Tensor] = field(default_factory=list)
    actions: list[Tensor] = field(default_factory=list)
    masks: list[list[Tensor]] = field(default_factory=list)
    active: list[Tensor] = field(default_factory=list)
    logp: list[Tensor] = field(default_factory=list)
    advantages: list[Tensor] = field(default_factory=list)
    returns: list[Tensor] = field(default_factory=list)

    def add(self, obs, actions, masks, active, logp, advantages, returns) -> None:
        self.obs.append(obs)
        self.actions.append(actions)
        self.masks.append(masks)
        self.active.append(active)
        self.logp.append(logp)
        self.advantages.append(advantages)
        self.returns.append(returns)

    def __len__(self) -> int:
        return sum(o.shape[0] for o in self.obs)

    def clear(self) -> None:
        for f in (self.obs, self.actions, self.masks, self.active, self.logp, self.advantages, self.returns):
            f.clear()

    def tensors(self) -> dict:
        dims = len(self.masks[0])
        return {
            "obs": torch.cat(self.obs),
            "actions": torch.cat(self.actions),
            "masks": [torch.cat([m[d] for m in self.masks]) for d in range(dims)],
            "active": torch.cat(self.active),
            "logp": torch.cat(self.logp),
            "advantages": torch.cat(self.advantages),
            "returns": torch.cat(self.returns),
        }


def _default(key: str):
    return SelectorConfig.model_fields[key].default


@dataclass
class PPOSettings:
    """The update's settings; the defaults are :class:`SelectorConfig`'s (one place)."""

    clip: float = _default("clip")
    epochs: int = _default("ppo_epochs")
    minibatch: int = _default("minibatch")
    entropy_coef: float = _default("entropy_coef")
    grad_clip: float = _default("grad_clip")
    value_coef: float = 1.0  # the critic has its own optimiser: the weight only scales its step

    @classmethod
    def of(cls, cfg: SelectorConfig) -> "PPOSettings":
        return cls(clip=cfg.clip, epochs=cfg.ppo_epochs, minibatch=cfg.minibatch, entropy_coef=cfg.entropy_coef, grad_clip=cfg.grad_clip)


def update(
    policy: ActorCritic,
    actor_opt: torch.optim.Optimizer,
    critic_opt: torch.optim.Optimizer,
    buffer: RolloutBuffer,
    cfg: PPOSettings,
    generator: torch.Generator,
) -> dict:
    """Several epochs of clipped-surrogate updates on shuffled minibatches; clears the
    buffer. Returns mean losses, entropy, approximate KL and the clipped fraction."""
    data = buffer.tensors()
    buffer.clear()
    n = data["obs"].shape[0]
    adv = data["advantages"]
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clip_frac": 0.0}
    steps = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=generator)
        for mb in perm.split(cfg.minibatch):
            logp, ent = policy.evaluate(data["obs"][mb], data["actions"][mb], [m[mb] for m in data["masks"]], data["active"][mb])
            ratio = (logp - data["logp"][mb]).exp()
            a = adv[mb]
            surrogate = torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a)
            policy_loss = -surrogate.mean() - cfg.entropy_coef * ent.mean()
            actor_opt.zero_grad()
            policy_loss.backward()
            nn.utils.clip_grad_norm_(policy.actor.parameters(), cfg.grad_clip)
            actor_opt.step()

            value_loss = cfg.value_coef * (policy.value(data["obs"][mb]) - data["returns"][mb]).pow(2).mean()
            critic_opt.zero_grad()
            value_loss.backward()
            nn.utils.clip_grad_norm_(policy.critic.parameters(), cfg.grad_clip)
            critic_opt.step()

            with torch.no_grad():
                stats["policy_loss"] += float(policy_loss)
                stats["value_loss"] += float(value_loss)
                stats["entropy"] += float(ent.mean())
                stats["approx_kl"] += float((data["logp"][mb] - logp).mean())
                stats["clip_frac"] += float(((ratio - 1).abs() > cfg.clip).float().mean())
            steps += 1
    return {k: v / max(steps, 1) for k, v in stats.items()}

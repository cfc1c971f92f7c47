"""The selector's networks: a small actor (one categorical per action dimension, sampled
dimension by dimension under the budget mask) and a separate critic, as in PRANCE
(~118K parameters each there; ours are ~45K with the default width)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out))


@dataclass
class Decision:
    actions: Tensor  # (B, dims) long
    logp: Tensor  # (B,) log-probability of the executed action (masked, active dims only)
    masks: list[Tensor]  # per dim (B, size) bool: the choices that were allowed


class Actor(nn.Module):
    """The actor MLP, plus a per-stage prior added to its logits: ``stage_prior[t]`` for
    observations of stage ``t`` (read from the stage one-hot at ``stage_slice`` of the
    observation). The prior starts at zero; a warm start sets it to a static schedule,
    which may pick different widths in different stages (the MLP's own bias cannot)."""

    def __init__(self, obs_dim: int, hidden: int, out: int, stage_slice: tuple[int, int]):
        super().__init__()
        self.mlp = _mlp(obs_dim, hidden, out)
        self.stage_slice = stage_slice
        self.stage_prior = nn.Parameter(torch.zeros(stage_slice[1] - stage_slice[0], out))
        # small last layer: start near the uniform policy (PPO practice)
        nn.init.orthogonal_(self.mlp[-1].weight, gain=0.01)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, obs: Tensor) -> Tensor:
        a, b = self.stage_slice
        return self.mlp(obs) + obs[:, a:b] @ self.stage_prior

    def macs(self) -> int:
        return sum(m.in_features * m.out_features for m in self.mlp if isinstance(m, nn.Linear))


class ActorCritic(nn.Module):
    def __init__(self, obs_dim: int, sizes: tuple[int, ...], hidden: int = 128, stage_slice: tuple[int, int] = (0, 0)):
        super().__init__()
        self.obs_dim, self.sizes, self.hidden = obs_dim, tuple(sizes), hidden
        self.actor = Actor(obs_dim, hidden, sum(sizes), stage_slice)
        self.critic = _mlp(obs_dim, hidden, 1)

    def actor_macs(self) -> int:
        """Multiply-accumulates of one actor forward (the selector's inference cost; the
        stage prior is a row lookup)."""
        return self.actor.macs()

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(obs).squeeze(-1)

    def _logits(self, obs: Tensor) -> list[Tensor]:
        return list(self.actor(obs).split(self.sizes, dim=-1))

    def act(
        self,
        obs: Tensor,
        feasible: Tensor,
        active: tuple[bool, ...],
        fixed: tuple[int, ...],
        greedy: bool,
        generator: torch.Generator | None = None,
    ) -> Decision:
        """Choose one index per dimension. ``feasible`` (B, *sizes) marks the combos that
        keep the budget reachable; dimensions are chosen in order, each masked to the
        values for which some choice of the remaining ones is feasible. Inactive
        dimensions take their ``fixed`` index and contribute nothing to the log-prob."""
        b = obs.shape[0]
        logits = self._logits(obs)
        rows = torch.arange(b)
        actions = torch.zeros(b, len(self.sizes), dtype=torch.long)
        logp = torch.zeros(b)
        masks = []
        feas = feasible
        for d, size in enumerate(self.sizes):
            if not active[d]:
                idx = torch.full((b,), fixed[d], dtype=torch.long)
                mask = torch.zeros(b, size, dtype=torch.bool)
                mask[rows, idx] = True
            else:
                mask = feas.flatten(2).any(dim=2) if feas.dim() > 2 else feas
                log_p = logits[d].masked_fill(~mask, float("-inf")).log_softmax(dim=-1)
                if greedy:
                    idx = log_p.argmax(dim=1)
                else:
                    u = torch.rand(b, size, generator=generator).clamp_min(1e-12)
                    idx = (log_p - (-u.log()).log()).argmax(dim=1)  # Gumbel-max with our generator
                logp = logp + log_p.gather(1, idx[:, None]).squeeze(1)
            actions[:, d] = idx
            masks.append(mask)
            if d < len(self.sizes) - 1:
                feas = feas[rows, idx]
        return Decision(actions, logp, masks)

    def evaluate(self, obs: Tensor, actions: Tensor, masks: list[Tensor], active: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probability and entropy of stored ``actions`` under the stored ``masks``;
        ``active`` (B, dims) says which dimensions were decided."""
        logits = self._logits(obs)
        logp = torch.zeros(obs.shape[0])
        ent = torch.zeros(obs.shape[0])
        for d in range(len(self.sizes)):
            log_p = logits[d].masked_fill(~masks[d], float("-inf")).log_softmax(dim=-1)
            a = active[:, d].float()
            logp = logp + a * log_p.gather(1, actions[:, d : d + 1]).squeeze(1)
            safe = log_p.masked_fill(~masks[d], 0.0)  # 0 * log 0 := 0, with a finite gradient
            ent = ent - a * (safe.exp() * safe).sum(dim=1)
        return logp, ent

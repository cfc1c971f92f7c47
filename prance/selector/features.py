"""What the selector sees at a decision point.

PRANCE fed the per-token mean of the previous block's keys, zero-padded to a fixed token
count. Ours is smaller and independent of the token count: the class token and the
size-weighted mean of the other tokens (each layer-normalised without affine weights and
zero-padded to the full width), the stage (one-hot), the image's budget,
the MACs already spent and the tokens left -- all as shares of the full sub-network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prance.tokens.state import TokenState

EXTRA = 4  # budget, spent, remaining, token ratio


def obs_dim(embed_dim: int, num_stages: int) -> int:
    return 2 * embed_dim + num_stages + EXTRA


def stage_slice(embed_dim: int, num_stages: int) -> tuple[int, int]:
    """Where the stage one-hot lies in an observation."""
    return 2 * embed_dim, 2 * embed_dim + num_stages


def observe(
    state: TokenState,
    stage: int,
    num_stages: int,
    budget_frac: Tensor,
    spent_frac: Tensor,
    n0: int,
    embed_dim: int,
    tokens: Tensor | None = None,
) -> Tensor:
    """(B, obs_dim) features of the tokens in ``state`` before stage ``stage``, on the CPU;
    ``tokens`` (B,): each image's own token count where rows are padded (padding has size 0)."""
    x = state.x.detach().float()
    b, n, c = x.shape
    p = state.num_prefix
    cls = F.layer_norm(x[:, 0], (c,))
    patches = x[:, p:]
    if state.size is None:
        mean = patches.mean(dim=1)
    else:
        s = state.size[:, p:].float()
        mean = (patches * s).sum(dim=1) / s.sum(dim=1)
    mean = F.layer_norm(mean, (c,))
    cls, mean = cls.cpu(), mean.cpu()  # the policy runs on the CPU (prance.selector.execute)
    pad = embed_dim - c
    if pad > 0:
        cls, mean = F.pad(cls, (0, pad)), F.pad(mean, (0, pad))
    onehot = torch.zeros(b, num_stages)
    onehot[:, stage] = 1.0
    budget = budget_frac.float().view(b, 1)
    spent = spent_frac.float().view(b, 1)
    tokens = torch.full((b, 1), n / n0) if tokens is None else tokens.float().view(b, 1) / n0
    return torch.cat([cls, mean, onehot, budget, spent, budget - spent, tokens], dim=1)

"""Rewards of the stage MDP, with Result-to-Go (RTG).

The *result* of a (possibly partial) schedule for one image is

    R = correct - cost

* ``correct``: PRANCE's acc' (``acc_prime``, the default: 0 only when the schedule is
  wrong and the full sub-network right, else 1), plain correctness against the label
  (``label``), or the probability the schedule gives the label (``soft``: the same optimum
  as ``label`` in expectation, far less variance per episode -- a 0/1 reward changes on a
  few images per rollout only).
* ``cost`` (``penalty`` form): ``flops_weight * F/B + over_weight * max(0, F/B - 1)
  + token_weight * token_ratio``, with F the image's MACs (selector included) and B its
  budget. (``constrained`` form): ``lam * F/B + token_weight * token_ratio`` where the
  multiplier ``lam >= 0`` follows dual ascent on the mean of F/B - 1 (it grows while the
  selector overspends and decays to 0 once it does not: Top-1 is then maximised within
  the budget).

Result-to-Go: after decision ``t`` the rest of the network is completed with decision
``t``'s channels and no further token reduction, giving ``R_t``; ``R_{-1}`` is the full
sub-network (before any decision). The reward of step ``t`` is ``r_t = R_t - R_{t-1}``:
what decision ``t`` changed in the result that is obtainable right now. The rewards are
dense (every step gets its own), the return with gamma = 1 telescopes to
``R_final - R_full`` (the episode's true result minus a constant), and each action stays
per-stage. ``R_{S-1}`` is the episode's actual result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def correctness(pred: Tensor, labels: Tensor, full_pred: Tensor, kind: str, logits: Tensor | None = None) -> Tensor:
    """1/0 per image (``acc_prime``, ``label``) or, for ``soft``, the probability the
    schedule gives the label (needs ``logits``)."""
    if kind == "soft":
        return logits.float().softmax(dim=-1).gather(-1, labels.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    right = (pred == labels).float()
    if kind == "label":
        return right
    if kind == "acc_prime":
        return 1.0 - ((pred != labels) & (full_pred == labels)).float()
    raise ValueError(f"unknown correctness {kind!r}")


def result(correct: Tensor, macs: Tensor, budget: Tensor, token_ratio: Tensor, form: str, flops_weight: float, over_weight: float, token_weight: float, lam: float) -> Tensor:
    use = (macs / budget).float()
    if form == "penalty":
        cost = flops_weight * use + over_weight * (use - 1).clamp(min=0)
    elif form == "constrained":
        cost = lam * use
    else:
        raise ValueError(f"unknown reward form {form!r}")
    return correct - cost - token_weight * token_ratio


def rtg_rewards(results: Tensor, baseline: Tensor) -> Tensor:
    """(B, S) step rewards ``R_t - R_{t-1}`` from the results ``R_0..R_{S-1}`` (B, S)
    and ``R_{-1}`` (B,)."""
    prev = torch.cat([baseline[:, None], results[:, :-1]], dim=1)
    return results - prev


def update_multiplier(lam: float, mean_use: float, lr: float) -> float:
    """Dual ascent on ``E[F/B] <= 1``."""
    return max(0.0, lam + lr * (mean_use - 1.0))

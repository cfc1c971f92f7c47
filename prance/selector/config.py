"""The selector's configuration (prance selector, a sweep's ``selector:`` section)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from prance.config import Strict
from prance.halving import Halving
from prance.tokens.strategies import SELECTOR_STRATEGIES

# The default meta-network: the supernet prance ships, found by name (prance.checkpoint.locate;
# its file is named once, in prance/models/zoo.py), so the default works in an installed wheel.
DEFAULT_CHECKPOINT = "timm:prance_vit_fmnist"


class SelectorConfig(Strict):
    """PRANCE selector: PPO over the stage MDP with Result-to-Go rewards (docs/selector.md)."""

    # what to select
    checkpoint: str = DEFAULT_CHECKPOINT
    dataset: str = "fashion-mnist"
    strategy: Literal[SELECTOR_STRATEGIES] = "prune"
    budget: str = "50%"  # GFLOPs ("0.04") or a share of the full sub-network ("50%")
    # mean: the average GFLOPs per image is held at the budget (the constrained reward's
    # multiplier does it; no image is capped below the full sub-network); cap: every image
    # within the budget (the policy's actions are masked per image)
    budget_kind: Literal["mean", "cap"] = "mean"
    budget_spread: float = Field(default=0.25, ge=0, lt=1)  # train on budgets in budget*(1 +- spread)
    decision_blocks: list[int] = Field(default_factory=lambda: [3, 6, 9])
    joint_widths: bool = True  # heads, MLP and embedding widths move together (one level per stage)
    merge_spread: bool = False  # merge / prune_merge: a stage's merge keep is spread over its blocks (ToMe-like), stage 0 included

    # data: rollouts on images the meta-network never trained on (a part of the test split,
    # disjoint from validation and test images; or, for a checkpoint pretrained with
    # holdout_fraction, its held-out train images, the whole test split left for test)
    # or on the train split; ``auto``: train_holdout when the checkpoint held out train
    # images (the shipped supernet does), else holdout; see docs/selector.md
    rollouts_from: Literal["auto", "holdout", "train_holdout", "train"] = "auto"
    train_limit: int | None = Field(default=4000, ge=1)  # rollout images
    val_limit: int = Field(default=1000, ge=1)  # validation images (what a sweep optimises)
    test_limit: int | None = Field(default=None, ge=1)  # final test images (the rest of the test split)

    # PPO (defaults: PRANCE's where it states them)
    iterations: int = Field(default=20, ge=1)  # PPO updates
    rollout_images: int = Field(default=256, ge=8)  # episodes per update (one per image)
    minibatch: int = Field(default=128, ge=8)  # transitions per gradient step
    ppo_epochs: int = Field(default=8, ge=1)
    actor_lr: float = Field(default=1e-3, gt=0)
    critic_lr: float = Field(default=1e-3, gt=0)
    clip: float = Field(default=0.2, gt=0, lt=1)
    entropy_coef: float = Field(default=0.0, ge=0)
    gamma: float = Field(default=1.0, gt=0, le=1)
    gae_lambda: float = Field(default=0.95, ge=0, le=1)
    grad_clip: float = Field(default=0.5, gt=0)
    hidden: int = Field(default=128, ge=8)
    warm_start: float = Field(default=3.0, ge=0)  # initial logit bias towards the best static schedule in budget (0: uniform start)
    static_first_images: int = Field(default=Halving.first_images, ge=1)  # warm-start search: rollout images every static schedule is scored on first
    static_eta: int = Field(default=Halving.eta, ge=2)  # warm-start search: successive-halving factor
    static_images: int = Field(default=2048, ge=1)  # warm-start search: rollout images it ranks on, at most
    static_anchor: bool = True  # warm start: also the best static configuration of the strategy, its token plan added as a per-stage choice

    # reward
    reward_form: Literal["penalty", "constrained"] = "penalty"
    correctness: Literal["acc_prime", "label", "soft"] = "acc_prime"
    flops_weight: float = Field(default=0.0, ge=0)  # per unit of GFLOPs / budget; constrained: initial multiplier
    over_weight: float = Field(default=2.0, ge=0)  # penalty form: per unit of relative overshoot
    token_weight: float = Field(default=0.0, ge=0)  # per unit of token ratio (PRANCE: 0.1 x keep)
    lagrange_lr: float = Field(default=0.5, gt=0)  # constrained form: dual ascent step
    eval_every: int = Field(default=5, ge=1)  # iterations between validation reports

    batch_size: int = Field(default=64, ge=1)  # evaluation batch
    seed: int = 0

    # where: the meta-network's rollouts, completions and evaluations run on ``device``
    # (cpu, cuda, cuda:N or auto); the policy and PPO stay on the CPU (prance.selector.execute)
    device: str = "cpu"
    amp: bool = False  # the meta-network's forwards in mixed precision (float16 on CUDA, bfloat16 on CPU)

    @model_validator(mode="after")
    def _check(self) -> "SelectorConfig":
        if self.minibatch > self.rollout_images:
            raise ValueError(f"minibatch {self.minibatch} is larger than rollout_images {self.rollout_images}")
        if sorted(set(self.decision_blocks)) != list(self.decision_blocks) or not self.decision_blocks:
            raise ValueError(f"decision_blocks {self.decision_blocks} must be increasing, distinct and non-empty")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device {self.device!r} is not a device name (cpu, cuda, cuda:N or auto)") from None
        return self

    @property
    def static_halving(self) -> Halving:
        """The warm start's successive halving (``static_first_images``, ``static_eta``)."""
        return Halving(self.static_first_images, self.static_eta)

"""The pretraining configuration (sweeps/pretrain.py, prance.train.launch)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from prance.config import Strict
from prance.models.subnet import DEFAULT_EMBED, DEFAULT_HEADS, DEFAULT_MLP
from prance.tokens.strategies import REDUCING_STRATEGIES


def _check_fractions(name: str, values: tuple[float, ...]) -> tuple[float, ...]:
    if not values or any(not 0 < v <= 1 for v in values) or max(values) != 1.0:
        raise ValueError(f"{name} fractions {list(values)} must lie in (0, 1] and include 1.0 (the full width)")
    return values


class WidthFractions(Strict):
    """The sub-network space, as fractions of the wrapped model's widths: the choices of
    active heads and MLP hidden width per block and of embedding width per stage."""

    heads: tuple[float, ...] = DEFAULT_HEADS
    mlp: tuple[float, ...] = DEFAULT_MLP
    embed: tuple[float, ...] = DEFAULT_EMBED

    @model_validator(mode="after")
    def _check(self) -> "WidthFractions":
        for name in ("heads", "mlp", "embed"):
            _check_fractions(name, getattr(self, name))
        return self


class PretrainConfig(Strict):
    """Weight-sharing meta-network pretraining (sandwich rule + in-place distillation)."""

    # what to train
    model: str = "prance_vit_fmnist"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool = False  # start from timm's weights (needs internet)
    reorder: bool = False  # sort channels by importance first (useful for pretrained weights)
    init_from: str | None = None  # a prance checkpoint of the same model whose weights start the run (OFA-style shrinking)
    dataset: str = "fashion-mnist"
    train_limit: int | None = Field(default=None, ge=1)  # seeded subset of the train split
    holdout_fraction: float = Field(default=0.0, ge=0, lt=1)  # of the train split, never trained on (prance.data.pretrain_holdout)
    eval_limit: int | None = Field(default=None, ge=1)  # seeded subset of the test split, each epoch

    # optimisation (DeiT-style)
    epochs: int = Field(default=10, ge=1)
    steps_per_epoch: int | None = Field(default=None, ge=1)  # cap, for smoke runs
    batch_size: int = Field(default=128, ge=1)  # global; split across workers
    lr: float = Field(default=1e-3, gt=0)
    min_lr: float = Field(default=1e-5, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    clip_grad: float | None = Field(default=1.0, gt=0)
    augment: bool = True  # flips and +-2 px shifts on tensor datasets; timm's train transform on folders

    # sandwich rule
    widths: WidthFractions = Field(default_factory=WidthFractions)  # the space, saved in the checkpoint
    random_subnets: int = Field(default=1, ge=0)  # besides the largest and the smallest
    distill: bool = True  # smaller sub-networks learn the largest's soft predictions
    distill_temperature: float = Field(default=1.0, gt=0)
    token_strategies: list[Literal[REDUCING_STRATEGIES]] = Field(default_factory=list)
    token_keep_min: float = Field(default=0.5, gt=0, le=1)  # lowest keep ratio sampled for token strategies

    # distribution, checkpoints, tracking
    num_workers: int = Field(default=1, ge=0)  # 0: in-process (tests)
    use_gpu: bool = False
    cpus_per_worker: int | None = Field(default=None, ge=1)  # default: the cluster's CPUs / workers (GPU: CPUs per GPU)
    loader_workers: int | None = Field(default=None, ge=0)  # data-loading processes per worker; None: 0 for in-memory tensors, CPUs - 1 for image folders
    amp: bool = True  # mixed precision on GPU (ignored on CPU)
    seed: int = 0
    keep_checkpoints: int = Field(default=2, ge=1)
    best_by: Literal["top1_largest", "top1_sandwich"] = "top1_largest"  # sandwich: mean of largest and smallest
    max_failures: int = Field(default=2, ge=0)
    storage: str = "runs/pretrain"  # local folder or s3://, gs://, an NFS path
    name: str = "default"
    mlflow_uri: str | None = None  # default sqlite:///<storage>/mlflow.db
    experiment: str = "prance-pretrain"

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        if self.num_workers > 0 and self.batch_size < self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than num_workers {self.num_workers}")
        return self

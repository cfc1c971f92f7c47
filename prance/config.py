"""Typed configurations loaded from YAML, with presets and ``key=value`` overrides.

Pydantic models with ``extra="forbid"``: a misspelt key is an error that names the key
and the allowed ones. Presets live in ``sweeps/configs/<kind>/<name>.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prance.errors import PranceError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "sweeps" / "configs"

T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PretrainConfig(Strict):
    """Weight-sharing meta-network pretraining (sandwich rule + in-place distillation)."""

    # what to train
    model: str = "prance_vit_fmnist"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool = False  # start from timm's weights (needs internet)
    reorder: bool = False  # sort channels by importance first (useful for pretrained weights)
    dataset: str = "fashion-mnist"
    train_limit: int | None = Field(default=None, ge=1)  # seeded subset of the train split
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
    random_subnets: int = Field(default=1, ge=0)  # besides the largest and the smallest
    distill: bool = True  # smaller sub-networks learn the largest's soft predictions
    distill_temperature: float = Field(default=1.0, gt=0)
    token_strategies: list[Literal["prune", "merge", "prune_merge", "ppt"]] = Field(default_factory=list)
    token_keep_min: float = Field(default=0.5, gt=0, le=1)  # lowest keep ratio sampled for token strategies

    # distribution, checkpoints, tracking
    num_workers: int = Field(default=1, ge=0)  # 0: in-process (tests)
    use_gpu: bool = False
    cpus_per_worker: int | None = Field(default=None, ge=1)  # default: the cluster's CPUs / workers
    amp: bool = True  # mixed precision on GPU (ignored on CPU)
    seed: int = 0
    keep_checkpoints: int = Field(default=2, ge=1)
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


def _format_error(err: ValidationError, model: type[BaseModel], where: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(config)"
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        return f"{where}: unknown key {key!r}; allowed keys: {allowed}"
    return f"{where}: {key}: {first['msg']}"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=3", "token_strategies=[prune, merge]"]`` -> dict, values parsed as YAML."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PranceError(f"override {item!r} is not key=value")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise PranceError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return out


def presets(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))


def load_config(model: type[T], kind: str, preset_or_path: str, overrides: dict[str, Any] | None = None) -> T:
    """A preset name (``sweeps/configs/<kind>/<name>.yaml``) or a YAML path, plus overrides."""
    path = Path(preset_or_path)
    if not path.suffix:
        path = CONFIG_ROOT / kind / f"{preset_or_path}.yaml"
        if not path.is_file():
            raise PranceError(f"unknown preset {preset_or_path!r}: choose from {', '.join(presets(kind))} or give a YAML path")
    elif not path.is_file():
        raise PranceError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PranceError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PranceError(f"{path} must hold a mapping of keys to values")
    data.update(overrides or {})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise PranceError(_format_error(e, model, str(path))) from None

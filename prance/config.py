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
from prance.models.subnet import DEFAULT_EMBED, DEFAULT_HEADS, DEFAULT_MLP
from prance.tokens.strategies import REDUCING_STRATEGIES, SELECTOR_STRATEGIES, sweep_strategies

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "sweeps" / "configs"

T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class SelectorConfig(Strict):
    """PRANCE selector: PPO over the stage MDP with Result-to-Go rewards (docs/selector.md)."""

    # what to select
    checkpoint: str = "checkpoints/prance_vit_fmnist.safetensors"
    dataset: str = "fashion-mnist"
    strategy: Literal[SELECTOR_STRATEGIES] = "prune"
    budget: str = "50%"  # GFLOPs ("0.04") or a share of the full sub-network ("50%")
    budget_spread: float = Field(default=0.25, ge=0, lt=1)  # train on budgets in budget*(1 +- spread)
    decision_blocks: list[int] = Field(default_factory=lambda: [3, 6, 9])
    joint_widths: bool = True  # heads, MLP and embedding widths move together (one level per stage)
    merge_spread: bool = False  # merge / prune_merge: a stage's merge keep is spread over its blocks (ToMe-like), stage 0 included

    # data: rollouts on images the meta-network never trained on (a part of the test split,
    # disjoint from validation and test images; or, for a checkpoint pretrained with
    # holdout_fraction, its held-out train images, the whole test split left for test)
    # or on the train split; see docs/selector.md
    rollouts_from: Literal["holdout", "train_holdout", "train"] = "holdout"
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
    static_first_images: int = Field(default=64, ge=1)  # warm-start search: rollout images every static schedule is scored on first
    static_eta: int = Field(default=3, ge=2)  # warm-start search: successive-halving factor
    static_images: int = Field(default=2048, ge=1)  # warm-start search: rollout images it ranks on, at most

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


# Token strategies of a budget sweep: name -> (method, token strategy). The PPO selector
# decides per input; the training-free ones run the full meta-network with the strategy
# calibrated to the budget (prance.budget.calibrate), one deterministic trial each; the
# static ones search the meta-network's sub-networks (a width level per stage) x the
# strategy calibrated to the rest of the budget (prance.static_search), one trial each.
SWEEP_STRATEGIES: dict[str, tuple[str, str]] = sweep_strategies()  # derived from the strategy registry


class StaticSearchSettings(Strict):
    """How the static baselines search their configurations (prance.static_search):
    successive halving on the validation images."""

    first_images: int = Field(default=64, ge=1)  # images every candidate is scored on first
    eta: int = Field(default=3, ge=2)  # keep the best 1/eta, score them on eta x as many images
    uniform_only: bool = False  # only the same width level in every stage
# SelectorConfig keys a sweep sets per trial or at its top level, never in ``selector:``.
SWEEP_OWNED = ("checkpoint", "dataset", "strategy", "budget", "device")


class ParamSpace(Strict):
    """One searched hyper-parameter: a range (``low``/``high``, optionally ``log`` or
    ``step``) or ``choices``; ``when`` makes it conditional on other parameters' values."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    choices: list[Any] | None = Field(default=None, min_length=1)
    when: dict[str, Any] | None = None  # e.g. {reward_form: penalty}

    @model_validator(mode="after")
    def _check(self) -> "ParamSpace":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high, or choices")
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    def values_to_check(self) -> list[Any]:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class SweepConfig(Strict):
    """Ray Tune + Optuna sweep over budget x token strategy and the selector's PPO/reward
    hyper-parameters (docs/sweep.md)."""

    # what to compress, on which images
    checkpoint: str = "checkpoints/prance_vit_fmnist.safetensors"
    dataset: str = "fashion-mnist"
    budgets: list[str] = Field(default_factory=lambda: ["40%", "55%", "70%"], min_length=1)  # GFLOPs or % of dense
    strategies: list[str] = Field(default_factory=lambda: list(SWEEP_STRATEGIES), min_length=1)

    # the search
    trials_per_combo: int = Field(default=1, ge=1)  # selector trials per budget x selector strategy
    selector: SelectorConfig = Field(default_factory=SelectorConfig)  # fixed selector settings of every trial
    space: dict[str, ParamSpace] = Field(default_factory=dict)  # searched SelectorConfig keys
    multi_objective: bool = False  # Optuna on (top1 max, gflops min), no ASHA; reports the Pareto front
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int | None = Field(default=None, ge=1)  # PPO iterations before ASHA may stop a trial
    reduction_factor: float = Field(default=2.0, gt=1)
    overshoot_penalty: float = Field(default=200.0, ge=0)  # score points per unit of relative GFLOPs overshoot
    startup_trials: int = Field(default=4, ge=0)  # random selector trials before TPE models the space
    static: StaticSearchSettings = Field(default_factory=StaticSearchSettings)  # the static_* baselines' search
    seed: int = 0

    # resources, storage, tracking
    cpus_per_trial: int = Field(default=1, ge=1)
    gpus_per_trial: float = Field(default=1.0, gt=0)
    use_gpu: bool = False
    max_concurrent_trials: int | None = Field(default=None, ge=1)  # default: what the cluster can place
    max_failures: int = Field(default=0, ge=0)  # retries of a failed trial
    storage: str = "runs/sweeps"  # local folder or s3://, gs://, an NFS path
    name: str | None = None  # default <preset>-<date>-<time>
    mlflow_uri: str | None = None  # default sqlite:///<storage>/mlflow.db
    mlflow_wait_s: float = Field(default=600.0, ge=0, allow_inf_nan=False)  # at the end, how long to wait for an MLflow server that stopped answering

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        unknown = [s for s in self.strategies if s not in SWEEP_STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}: choose from {', '.join(SWEEP_STRATEGIES)}")
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError("a strategy is listed twice")
        if len({b.strip() for b in self.budgets}) != len(self.budgets):
            raise ValueError("a budget is listed twice")
        owned = sorted(set(SWEEP_OWNED) & self.selector.model_fields_set)
        if owned:
            raise ValueError(f"selector.{owned[0]} is set by the sweep: use the top-level keys checkpoint, dataset, strategies, budgets, use_gpu")
        tunable = [k for k in SelectorConfig.model_fields if k not in SWEEP_OWNED]
        seen: list[str] = []
        for key, spec in self.space.items():
            if key not in tunable:
                raise ValueError(f"space: {key!r} is not a tunable selector setting; choose from {', '.join(tunable)}")
            for cond in spec.when or {}:
                if cond not in seen and cond not in SelectorConfig.model_fields:
                    raise ValueError(f"space.{key}.when: {cond!r} is neither a selector setting nor a parameter listed before {key!r}")
            base = self.selector.model_dump()
            for value in spec.values_to_check():
                try:
                    SelectorConfig.model_validate({**base, key: value})
                except ValidationError as e:
                    first = e.errors()[0]
                    raise ValueError(f"space.{key}: value {value!r} is invalid for the selector: {first['msg']}") from None
            seen.append(key)
        return self


def _model_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel], str]:
    """The (nested) model that holds the last key of ``loc``, and the dotted key."""
    import typing

    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return model, ".".join(str(p) for p in loc)
    if typing.get_origin(current) is dict:
        current = typing.get_args(current)[1]
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        current = model
    return current, ".".join(str(p) for p in loc)


def _format_error(err: ValidationError, model: type[BaseModel], where: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "(config)"
    if first["type"] == "extra_forbidden":
        holder, key = _model_at(model, loc)
        allowed = ", ".join(holder.model_fields)
        return f"{where}: unknown key {key!r}; allowed keys: {allowed}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {key}: {msg}" if loc else f"{where}: {msg}"


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


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set ``overrides`` into ``data``; a dotted key (``selector.iterations``) reaches into
    nested mappings, creating them where missing."""
    for key, value in overrides.items():
        parts = key.split(".")
        target = data
        for part in parts[:-1]:
            nxt = target.get(part)
            if not isinstance(nxt, dict):
                nxt = target[part] = {}
            target = nxt
        target[parts[-1]] = value


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
    _apply_overrides(data, overrides or {})
    return validate(model, data, str(path))


def validate(model: type[T], data: dict[str, Any], where: str) -> T:
    """``model`` from ``data``; a mistake is a :class:`PranceError` naming the key (and,
    for an unknown one, the allowed keys), prefixed by ``where``."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise PranceError(_format_error(e, model, where)) from None

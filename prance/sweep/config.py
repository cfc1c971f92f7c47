"""The budget sweep's configuration (sweeps/budget_sweep.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from prance.config import Strict
from prance.halving import Halving
from prance.selector.config import DEFAULT_CHECKPOINT, SelectorConfig
from prance.sweep import methods


# Strategies of a budget sweep: name -> (method, token strategy), from the registry of
# sweep methods (prance.sweep.methods: what each method is and how its trial runs).
SWEEP_STRATEGIES: dict[str, tuple[str, str]] = methods.strategies()


class StaticSearchSettings(Strict):
    """How the static baselines search their configurations (prance.static_search):
    successive halving on the validation images."""

    first_images: int = Field(default=Halving.first_images, ge=1)  # images every candidate is scored on first
    eta: int = Field(default=Halving.eta, ge=2)  # keep the best 1/eta, score them on eta x as many images
    uniform_only: bool = False  # only the same width level in every stage


class CascadeSettings(Strict):
    """The ``cascade`` method (prance.cascade): its ladder, computed once per budget, and
    the chains it chooses from. The ladder searches each rung with the static search's
    successive halving; ``uniform_only`` (the default) keeps that to the same width level
    in every stage, 12 candidates a rung instead of hundreds, so the default sweep keeps
    its 10 minutes (``search-cascade`` searches mixed widths)."""

    rungs: list[float] = Field(default_factory=lambda: [0.5, 0.8, 1.0, 1.6, 2.5], min_length=1)  # multiples of the budget
    strategies: list[str] = Field(default_factory=lambda: ["none", "merge", "prune_merge"], min_length=1)
    max_rungs: int = Field(default=3, ge=1)  # the most configurations an image may run
    uniform_only: bool = True
    margin: bool = True  # hold back the share of the budget that keeps the mean within it on unseen images

    @model_validator(mode="after")
    def _check(self) -> "CascadeSettings":
        from prance.cascade import ladder_problem

        problem = ladder_problem(self.rungs, self.strategies, self.max_rungs)
        if problem:
            raise ValueError(f"cascade: {problem}")
        return self


class ControllerSettings(Strict):
    """The ``controller`` method (prance.selector.passes): PPO over the passes of the
    cascade method's ladder, started from its best cascade (docs/selector.md)."""

    iterations: int = Field(default=60, ge=1)  # PPO updates (each on images_per_iteration rollout episodes)
    images_per_iteration: int = Field(default=1024, ge=8)
    lr: float = Field(default=3e-4, gt=0)
    hidden: int = Field(default=64, ge=4)
    multiplier_lr: float = Field(default=0.05, ge=0)  # dual ascent on the mean-GFLOPs multiplier
    imitation_epochs: int = Field(default=30, ge=0)  # warm start: fit the policy to the cascade's decisions
    eval_every: int = Field(default=5, ge=1)
    max_passes: int = Field(default=3, ge=1, le=3)  # the most rungs an image runs


# SelectorConfig keys a sweep sets per trial or at its top level, never in ``selector:``.
SWEEP_OWNED = ("checkpoint", "dataset", "strategy", "budget", "budget_kind", "device")


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
    checkpoint: str = DEFAULT_CHECKPOINT
    dataset: str = "fashion-mnist"
    budgets: list[str] = Field(default_factory=lambda: ["15%", "20%", "35%"], min_length=1)  # GFLOPs or % of dense
    budget_kind: Literal["mean", "cap"] = "mean"  # mean: average GFLOPs per image within the budget; cap: every image
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
    cascade: CascadeSettings = Field(default_factory=CascadeSettings)  # the cascade method's ladder and chains
    controller: ControllerSettings = Field(default_factory=ControllerSettings)  # the controller method's PPO
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
            raise ValueError(f"selector.{owned[0]} is set by the sweep: use the top-level keys checkpoint, dataset, strategies, budgets, budget_kind, use_gpu")
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

"""The define-by-run search space handed to Optuna (through Ray Tune's OptunaSearch).

Trial number ``n`` runs combo ``trials[n]`` (the dense reference and the training-free
combos first, then the selector combos round-robin), returned as constants, so every
budget x strategy gets its share of trials whatever the sampler does. Only selector
combos suggest the PPO/reward parameters of the sweep's ``space:``, each in the order
written and only when its ``when:`` conditions hold (Optuna's conditional spaces); TPE
with ``group=True`` models each set of parameters that occur together.

The object is pickled with the searcher's state (Tuner.restore brings it back), so it
holds plain data only.
"""

from __future__ import annotations

from typing import Any

from prance.selector.config import SelectorConfig
from prance.sweep.config import ParamSpace
from prance.sweep.methods import METHODS


def _is_int_field(name: str) -> bool:
    ann = SelectorConfig.model_fields[name].annotation
    return ann is int or (getattr(ann, "__args__", None) is not None and int in ann.__args__ and float not in ann.__args__)


def suggest(trial, name: str, spec: ParamSpace) -> Any:
    """One Optuna suggestion for ``spec`` (int or float by the selector field's type)."""
    if spec.choices is not None:
        return trial.suggest_categorical(name, list(spec.choices))
    if _is_int_field(name):
        step = int(spec.step or 1)
        return trial.suggest_int(name, int(spec.low), int(spec.high), step=step, log=spec.log)
    return trial.suggest_float(name, float(spec.low), float(spec.high), step=spec.step, log=spec.log)


class DefineByRun:
    """``space(trial) -> constants``: the combo of ``trial.number`` plus, for selector
    combos, the suggested hyper-parameters (captured by OptunaSearch)."""

    def __init__(self, trials: list[dict], space: dict[str, dict], fixed: dict[str, Any]):
        self.trials = trials  # BudgetStrategy.as_config() per trial number
        self.space = space  # name -> ParamSpace.model_dump()
        self.fixed = fixed  # the selector settings every trial shares (for `when` on fixed keys)

    def __len__(self) -> int:
        return len(self.trials)

    def __setstate__(self, state: dict) -> None:
        """A searcher pickled before ``trials`` was named ``schedule`` still resumes."""
        if "schedule" in state:
            state["trials"] = state.pop("schedule")
        self.__dict__.update(state)

    def params(self, trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, raw in self.space.items():
            spec = ParamSpace.model_validate(raw)
            if spec.when and any(values.get(k, self.fixed.get(k)) != v for k, v in spec.when.items()):
                continue
            values[name] = suggest(trial, name, spec)
        return values

    def __call__(self, trial) -> dict[str, Any]:
        number = trial.number
        combo = dict(self.trials[number % len(self.trials)])
        if METHODS[combo["method"]].searches:
            self.params(trial)  # OptunaSearch records the suggestions into the trial's config
        return {**combo, "trial_number": number}

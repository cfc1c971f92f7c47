"""The budget sweep: budget x token strategy x the selector's PPO/reward hyper-parameters.

One job per module; only :mod:`prance.sweep.tune` imports Ray.

- ``plan``: checks every input before any trial (checkpoint, dataset, budgets, strategies)
  and lays out the combos in trial order.
- ``space``: the define-by-run Optuna space (combo by trial number, conditional PPO/reward
  parameters for selector combos only).
- ``trial``: the body of one trial, Ray-free: a training-free evaluation or a selector
  training, and the score the search optimises.
- ``runs``: the sweep's MLflow runs (one per trial, found again on resume, a summary run).
- ``report``: results table, Pareto front, plot, the printed summary.
- ``store``: the sweep folder (its settings, naming, locating the latest sweep).
- ``rows``: a row of results.csv as a configuration to run again (:func:`best`, :func:`trial_row`).
- ``tune``: the Ray Tune driver (Tuner, OptunaSearch, ASHA, the MLflow callback, resume).
"""

from prance.sweep.rows import best, trial_row  # noqa: E402,F401  (light: pandas and the checkpoint load when called)

"""The Ray Tune driver of the budget sweep (the only module of prance.sweep importing Ray).

One ``Tuner`` per sweep: ``OptunaSearch`` over the define-by-run space of
:mod:`prance.sweep.space` (TPE, multivariate and grouped for the conditional space,
seeded, constant liar for parallel trials), ASHA on the per-iteration ``score`` of the
selector trials (training-free trials report no ``iteration`` and are invisible to it),
trials placed by resources with actors reused. ``multi_objective`` swaps in Optuna on
(top1 max, gflops min) and no early stopping.

MLflow is written by :class:`SweepCallback` on the driver only, through
:class:`prance.sweep.runs.SweepRuns`: a run per trial (reused on resume), metrics per
iteration, the selector checkpoint as an artifact, a summary run. The results table is
built from Tune's ``ResultGrid`` after ``fit()`` -- also after an interrupted or resumed
sweep -- so a finished trial is never lost.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from prance import splits, tracking
from pydantic import ValidationError

from prance.config import _format_error
from prance.sweep.config import SWEEP_OWNED, SweepConfig
from prance.errors import PranceError, first_line, one_line
from prance.sweep import report as rep
from prance.sweep import store
from prance.sweep.plan import SweepPlan, plan_sweep, trial_threads
from prance.sweep.runs import QUEUE_FOLDER, SweepRuns
from prance.sweep.space import DefineByRun
from prance.selector.store import SELECTOR_FILE
from prance.sweep.methods import DENSE, METHODS, run_trial
from prance.sweep.rows import selector_path, trained_file
from prance.sweep.trial import FINAL, TrialContext, selector_config, split_of

# Tune's own bookkeeping in every result, and ours, stay out of MLflow's metrics
NOT_LOGGED = frozenset({"done", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "hostname",
                        "node_ip", "time_since_restore", "iterations_since_restore", "checkpoint_dir_name", "date",
                        "trial_id", "experiment_tag", "config", "should_checkpoint", "iteration", FINAL, "body_s",
                        "trial_number", "n_images"})
_ACTIVE: "Progress | None" = None  # the driver's live state, found by the (re)loaded callback


# ----------------------------------------------------------------------------- trials


def trainable(config: dict, ctx: TrialContext) -> None:
    """A Tune function trainable: one trial, reported through ``tune.report``."""
    from ray import tune

    for name in ("ray.tune", "ray.train"):  # no "Checkpoint successfully created" line per report
        logging.getLogger(name).setLevel(logging.WARNING)
    from prance.rayinit import quiet_sigterm_in_callbacks

    quiet_sigterm_in_callbacks()
    workdir = Path(tempfile.mkdtemp(prefix="prance-selector-"))
    checkpoint = tune.get_checkpoint()  # a retried trial, or an unfinished one of a resumed sweep
    restored = checkpoint is not None and restore_checkpoint(checkpoint, workdir)

    def report(metrics: dict, folder: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder is not None else None
        tune.report(metrics, checkpoint=checkpoint)

    try:
        run_trial(config, ctx, report, workdir, restored)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _older_checkpoints(checkpoint) -> list:
    """The trial's checkpoints before ``checkpoint`` (Tune keeps ``num_to_keep`` of them
    in the trial's folder), newest first, on the same filesystem."""
    import pyarrow.fs
    from ray import tune

    fs, path = checkpoint.filesystem, str(checkpoint.path).rstrip("/")
    parent, name = path.rsplit("/", 1)
    try:
        found = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    except Exception:  # the trial's folder cannot be listed: only the checkpoint Tune gave
        return []
    older = sorted((f.base_name for f in found if f.type == pyarrow.fs.FileType.Directory
                    and f.base_name.startswith("checkpoint_") and f.base_name < name), reverse=True)
    return [tune.Checkpoint(f"{parent}/{n}", filesystem=fs) for n in older]


def restore_checkpoint(checkpoint, workdir: Path) -> bool:
    """Copy the trial's newest readable checkpoint into ``workdir``: ``checkpoint`` (what
    Tune restores), or, when that one is corrupt or incomplete, the one before it, with a
    warning. False, ``workdir`` empty, when none is readable: the trial starts over rather
    than fail."""
    from prance.selector.store import check_training_folder

    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        try:
            with candidate.as_directory() as folder:
                shutil.copytree(folder, workdir, dirs_exist_ok=True)
            check_training_folder(workdir)
        except Exception as e:
            print(f"warning: checkpoint {candidate.path} is unreadable ({one_line(e) if isinstance(e, PranceError) else first_line(e)}): "
                  "trying the one before it", file=sys.stderr, flush=True)
            continue
        if candidate is not checkpoint:
            print(f"warning: the trial continues from its earlier checkpoint {candidate.path}", file=sys.stderr, flush=True)
        return True
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    print("warning: no checkpoint of the trial is readable: it starts again from its beginning", file=sys.stderr, flush=True)
    return False


# ------------------------------------------------------------------------- the driver


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:d}:{s:02d}"


def trial_label(config: dict) -> str:
    """``prune@55%#7``: a trial's one label -- its cell (:attr:`BudgetStrategy.label`) and
    number -- in the progress lines and as its MLflow run's name."""
    return f"{config.get('strategy')}@{config.get('budget')}#{config.get('trial_number')}"


def run_tags(config: dict) -> dict:
    return {k: config.get(k) for k in ("method", "strategy", "token_strategy", "budget", "budget_gflops")}


def split_inputs(spec, image_spec) -> dict[str, dict]:
    """:func:`prance.splits.inputs` of ``spec``; a warning and none when they cannot be
    worked out (a run without its dataset inputs is better than no run)."""
    try:
        return splits.inputs(spec, image_spec)
    except Exception as e:
        print(f"warning: the MLflow dataset inputs of the split could not be recorded ({first_line(e)})", file=sys.stderr, flush=True)
        return {}


@dataclass
class Progress:
    """What the callback needs on the driver: the MLflow runs, the plan, the clock."""

    runs: SweepRuns
    plan: SweepPlan
    ctx: TrialContext
    iterations: int
    total: int
    done: int = 0
    start: float = field(default_factory=time.monotonic)
    started: dict = field(default_factory=dict)  # trial number -> monotonic start (this session)
    wall: dict = field(default_factory=dict)  # trial number -> seconds from start to end (this session)
    dataset_inputs: dict = field(default_factory=dict)  # repr(SplitSpec) -> its parts' MLflow dataset inputs

    def line(self, text: str) -> None:
        print(f"[{_clock(time.monotonic() - self.start):>6}] {text}", flush=True)

    def params(self, config: dict) -> dict:
        base = {k: v for k, v in config.items()}
        if METHODS[config["method"]].searches:
            base.update(selector_config(config, self.ctx).model_dump())
        else:
            base.update({k: self.ctx.selector.get(k) for k in ("val_limit", "batch_size", "seed")})
        return base

    def inputs(self, config: dict) -> list[dict]:
        """The MLflow dataset inputs of a trial's run: the parts of the split its method
        reads, of its own split (a searching trial's suggestions may change it)."""
        method = METHODS[config["method"]]
        spec = split_of(self.ctx)
        if method.searches:
            spec = splits.SplitSpec.of(selector_config(config, self.ctx).model_copy(update={"test_limit": None}))
        if repr(spec) not in self.dataset_inputs:
            self.dataset_inputs[repr(spec)] = split_inputs(spec, self.plan.image_spec)
        known = self.dataset_inputs[repr(spec)]
        return [known[p] for p in method.parts if p in known]

    def tracked(self, what: str, write) -> None:
        """MLflow writes never take the sweep down (an outage is queued by SweepRuns)."""
        try:
            write()
        except Exception as e:
            print(f"warning: MLflow {what} failed: {e}", file=sys.stderr, flush=True)

    def on_start(self, trial) -> None:
        c = trial.config
        n = int(c["trial_number"])
        self.started.setdefault(n, time.monotonic())
        self.tracked(f"run of trial {n}", lambda: self.runs.open(n, trial.trial_id, trial_label(c), self.params(c), run_tags(c),
                                                                 self.inputs(c)))

    def on_result(self, trial, result: dict) -> None:
        c = trial.config
        n = int(c["trial_number"])
        step = int(result.get("iteration", 0) or 0)
        metrics = {k: v for k, v in result.items() if k not in NOT_LOGGED}
        self.tracked(f"metrics of trial {n}", lambda: self.runs.log(n, metrics, step))
        if METHODS[c["method"]].searches and not result.get(FINAL):
            self.line(f"      {trial_label(c):<28} it {step:>3}/{self.iterations}  top1 {result.get('top1', float('nan')):6.2f}%  "
                      f"{result.get('gflops', float('nan')):.4g} GFLOPs  score {result.get('score', float('nan')):+7.2f}")

    def on_complete(self, trial, error: bool = False) -> None:
        c = trial.config
        n = int(c["trial_number"])
        last = trial.last_result or {}
        wall = time.monotonic() - self.started.get(n, time.monotonic())
        self.wall[n] = wall
        self.done += 1
        outcome = "error" if error else ("finished" if last.get(FINAL) else "stopped")
        metrics = {"trial_wall_s": wall, "trial_body_s": last.get("body_s")}
        step = int(last.get("iteration", 0) or 0)
        checkpoint = None if error else trial.checkpoint
        def close() -> None:
            with (checkpoint.as_directory() if checkpoint is not None else nullcontext(None)) as folder:
                art = Path(folder) if folder and (Path(folder) / SELECTOR_FILE).is_file() else None
                found = {tracking.TAG_CONFIGURATION: last["configuration"]} if last.get("configuration") else None
                self.runs.close(n, "FAILED" if error else "FINISHED", outcome, metrics, tags=found, step=step, artifacts=art)

        self.tracked(f"logging of trial {n}", close)
        what = {"finished": "", "stopped": f" (stopped by ASHA at it {last.get('iteration')})", "error": " FAILED"}[outcome]
        if error:
            self.line(f"{self.done:>3}/{self.total} {trial_label(c):<28} failed after {wall:.1f}s: see {trial.path}")
        else:
            self.line(f"{self.done:>3}/{self.total} {trial_label(c):<28} top1 {last.get('top1', float('nan')):6.2f}%  "
                      f"{last.get('gflops', float('nan')):.4g} GFLOPs  score {last.get('score', float('nan')):+7.2f}  {wall:5.1f}s{what}")


def _callback_class():
    from ray import tune

    class SweepCallback(tune.Callback):
        """Per-trial MLflow runs and one-line progress, from the driver. Pickled with the
        Tuner; a restored copy picks up the live state of the resuming driver."""

        def __init__(self):
            self.progress: Progress | None = None

        def __reduce__(self):
            return (_make_callback, ())

        def setup(self, **info):
            self.progress = _ACTIVE

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.progress:
                self.progress.on_start(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.progress:
                self.progress.on_result(trial, result)

        def on_trial_recover(self, iteration, trials, trial, **info):
            if self.progress:
                self.progress.line(f"      {trial_label(trial.config):<28} failed; Tune retries it from its last checkpoint")

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.progress:
                self.progress.on_complete(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.progress:
                self.progress.on_complete(trial, error=True)

    return SweepCallback


def trial_name(trial) -> str:
    """``t0007-prune-55pct-<id>``: the trial's folder and name in Tune (its label, safe
    as a folder name and unique with Tune's trial id)."""
    c = trial.config
    budget = str(c.get("budget", "")).replace("%", "pct")
    return f"t{int(c.get('trial_number', 0)):04d}-{c.get('strategy')}-{budget}-{trial.trial_id}"


def _make_callback():
    return _callback_class()()


def _searcher(cfg: SweepConfig, plan: SweepPlan, multi: bool):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    fixed = sum(1 for c in plan.trials if not METHODS[c.method].searches)
    sampler = optuna.samplers.TPESampler(
        multivariate=True, group=True, seed=cfg.seed, n_startup_trials=fixed + cfg.startup_trials, constant_liar=True
    )
    space = DefineByRun([c.as_config() for c in plan.trials], {k: v.model_dump() for k, v in cfg.space.items()},
                        cfg.selector.model_dump())
    if multi:
        return OptunaSearch(space, metric=[tracking.TOP1, tracking.GFLOPS], mode=["max", "min"], sampler=sampler)
    return OptunaSearch(space, metric="score", mode="max", sampler=sampler)


def _grace(cfg: SweepConfig) -> int | None:
    """ASHA's grace period in PPO iterations; None when no ASHA decides (FIFO, several objectives)."""
    if cfg.multi_objective or cfg.scheduler == "fifo":
        return None
    s = cfg.selector
    return min(cfg.grace_period or max(s.eval_every, s.iterations // 4), s.iterations)


def asha_rungs(grace: int, max_t: int, reduction_factor: float) -> list[float]:
    """The iterations at which ASHA (one bracket, as ``_scheduler`` builds it) records a
    trial and may stop it: ``grace * rf**k`` up to ``max_t``, by Ray's own formula."""
    n = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    return [grace * reduction_factor ** k for k in range(n)]


def checkpoint_iterations(cfg: SweepConfig) -> tuple[float, ...]:
    """Where a selector trial checkpoints (the first report at or past each): ASHA's rungs, so
    that a trial it stops keeps the selector it was judged on, and every grace period between
    them, so that a failure loses at most that much work; empty (every report) without ASHA."""
    grace = _grace(cfg)
    if grace is None:
        return ()
    every = range(grace, cfg.selector.iterations + 1, grace)
    return tuple(sorted(set(asha_rungs(grace, cfg.selector.iterations, cfg.reduction_factor)) | set(every)))


def _scheduler(cfg: SweepConfig, multi: bool):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    grace = _grace(cfg)
    if multi or grace is None:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="iteration", metric="score", mode="max", max_t=cfg.selector.iterations,
                         grace_period=grace, reduction_factor=cfg.reduction_factor)


def _slots(cfg: SweepConfig) -> int:
    """Trials the cluster can run at once; PranceError when it cannot run one."""
    import ray

    res = ray.cluster_resources()
    if cfg.use_gpu:
        gpus = float(res.get("GPU", 0))
        if gpus < cfg.gpus_per_trial:
            from prance.train.placement import autoscaler_max_nodes

            if not autoscaler_max_nodes() > 1:
                raise PranceError(f"--use-gpu: a trial needs {cfg.gpus_per_trial} GPU, the Ray cluster has {gpus:g}")
            return cfg.max_concurrent_trials or 1  # the autoscaler brings GPU nodes once trials wait
        return cfg.max_concurrent_trials or max(1, int(gpus // cfg.gpus_per_trial))
    cpus = float(res.get("CPU", 0))
    if cpus < cfg.cpus_per_trial:
        raise PranceError(f"a trial needs {cfg.cpus_per_trial} CPUs, the Ray cluster has {cpus:g}")
    return cfg.max_concurrent_trials or max(1, int(cpus // cfg.cpus_per_trial))


def _init_ray(address: str | None) -> None:
    from prance.rayinit import init_ray, starts_local_cluster

    if starts_local_cluster(address):
        init_ray(address, include_dashboard=False, logging_level=logging.WARNING)
    else:
        init_ray(address)  # a running cluster, e.g. under `ray job submit`


@dataclass
class SweepOutcome:
    name: str
    folder: Path
    results: Path
    plot: Path
    table: str
    mlflow_uri: str
    experiment_id: str
    interrupted: int  # trials left unfinished (resume to finish them)
    failed: int
    wall_s: float
    tracking_error: str | None = None  # MLflow could not be brought up to date (results.csv is)


def resume_settings(storage: str, name: str | None) -> tuple[SweepConfig, dict]:
    """The saved configuration of the sweep to continue."""
    name = name or store.latest_sweep(storage)
    settings = store.read_settings(storage, name)
    if settings is None:
        raise PranceError(f"nothing to resume: no sweep {name!r} in {store.absolute_storage(storage)}")
    if not store.is_remote(storage) and not store.has_tune_state(storage, name):
        raise PranceError(f"nothing to resume in {store.experiment_path(storage, name)}: the sweep never started its trials")
    try:
        cfg = SweepConfig.model_validate({**settings["config"], "name": name, "storage": storage})
    except ValidationError as e:
        raise PranceError(f"the saved settings of sweep {name} no longer validate: {_format_error(e, SweepConfig, store.SWEEP_FILE)}") from None
    return cfg, settings


@dataclass
class SweepSession:
    """What one session of a sweep works on, checked before Ray starts (:func:`_check_inputs`)."""

    cfg: SweepConfig
    plan: SweepPlan
    name: str
    storage: str  # absolute
    exp_path: str  # Tune's folder of the sweep
    uri: str  # the MLflow tracking URI
    resume: bool
    t_start: float  # time.monotonic() when the session began


def _check_inputs(cfg: SweepConfig, source: str, resume: bool, settings: dict | None, t_start: float) -> SweepSession:
    """Step 1, before Ray and before anything is written to MLflow: the plan, the sweep's
    name, storage, Tune folder and MLflow URI; PranceError on anything wrong."""
    if not resume and cfg.mlflow_uri:
        tracking.check_uri(cfg.mlflow_uri)  # the cheap checks first: the plan loads the model and the images
    storage = store.absolute_storage(cfg.storage)
    if not store.is_remote(storage):
        from prance.paths import check_output_dir

        check_output_dir(storage, "--storage", shown=cfg.storage)
    if cfg.use_gpu:
        _check_local_gpus(cfg)
    plan = plan_sweep(cfg)
    name = cfg.name or store.default_name(source)
    if "runtime_resources/working_dir_files" in storage:
        print(f"warning: --storage {cfg.storage} lies in the Ray job's temporary copy of the working dir ({storage}): "
              "pass an absolute path or shared storage (s3://, gs://, NFS) to keep the results", file=sys.stderr)
    exp_path = store.experiment_path(storage, name)
    local_root = storage if not store.is_remote(storage) else str(store.LOCAL_ROOT.resolve())
    if resume:
        uri = settings["mlflow_uri"]
        if cfg.mlflow_uri and tracking.resolve_uri(cfg.mlflow_uri, local_root) != uri:
            raise PranceError(f"sweep {name} tracks to {uri}; resume it there (drop --mlflow-uri)")
    else:
        uri = tracking.resolve_uri(cfg.mlflow_uri, local_root)
        if store.exists(storage, name):
            raise PranceError(f"sweep {name!r} already exists in {storage}: pass --resume to continue it, or choose another --name")
    tracking.check_reachable(uri)
    tracking.check_store(uri)
    if resume:
        store.check_tune_state(storage, name)

    return SweepSession(cfg, plan, name, storage, exp_path, uri, resume, t_start)


def _check_local_gpus(cfg: SweepConfig) -> None:
    """--use-gpu on a Ray this driver starts itself: its GPUs are this machine's, counted
    before Ray starts (a cluster one joins is counted once Ray is up, in _slots)."""
    from prance.rayinit import starts_local_cluster

    if not starts_local_cluster(None):
        return
    import torch

    gpus = torch.cuda.device_count()
    if gpus < cfg.gpus_per_trial:
        raise PranceError(f"--use-gpu: a trial needs {cfg.gpus_per_trial:g} GPU, this machine has {gpus}")


def _tuner(session: SweepSession, ctx: TrialContext, slots: int):
    """Step 3b: a new Tuner for the plan, or the interrupted one restored from its folder."""
    from ray import tune

    cfg, plan, name, storage, exp_path = session.cfg, session.plan, session.name, session.storage, session.exp_path

    resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial if cfg.use_gpu else 0}
    fn = tune.with_resources(tune.with_parameters(trainable, ctx=ctx), resources)
    if session.resume:
        try:
            tuner = tune.Tuner.restore(exp_path, fn, resume_unfinished=True, resume_errored=False)
        except Exception as e:  # a truncated or corrupted experiment state (tuner.pkl, experiment_state-*.json)
            raise PranceError(f"cannot resume sweep {name}: Tune's saved state in {exp_path} is unreadable "
                              f"({type(e).__name__}: {first_line(e)}); results.csv in {store.report_folder(storage, name)} "
                              "keeps the trials that finished") from None
    else:
        tuner = tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(
                search_alg=_searcher(cfg, plan, cfg.multi_objective), scheduler=_scheduler(cfg, cfg.multi_objective),
                num_samples=len(plan.trials), max_concurrent_trials=slots, reuse_actors=True,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, callbacks=[_make_callback()], verbose=0,
                # 2: the newest checkpoint may be half-synced when a node dies; Tune forces an experiment
                # snapshot every num_to_keep checkpoints of a trial (1: one per checkpoint), and its warning
                # about snapshots that take long stays on; trials checkpoint at ASHA's rungs and every grace
                # period, not at every report (checkpoint_iterations; issue 36)
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            ),
        )
    return tuner


def _report(session: SweepSession, grid, runs: SweepRuns, progress: Progress, slots: int, fit_s: float,
            experiment_id: str) -> SweepOutcome:
    """Step 4: MLflow catches up (writes queued while a server was away), then the report
    from Tune's results -- written whatever MLflow does -- then the summary run."""
    cfg, plan, name, storage, uri, t_start = session.cfg, session.plan, session.name, session.storage, session.uri, session.t_start
    multi = cfg.multi_objective
    tracking_error = settle_runs(runs, cfg.mlflow_wait_s)
    rows = result_rows(grid, plan, runs, progress)
    if tracking_error is None:
        tracking_error = reconcile_runs(runs, grid, rows, progress)
    params = list(cfg.space)
    df = rep.results_frame(rows, params)
    folder = store.report_folder(storage, name)
    folder.mkdir(parents=True, exist_ok=True)
    results = folder / "results.csv"
    df.to_csv(results, index=False)
    plot = rep.plot_pareto(df, folder / "pareto.png", f"{name}: Top-1 vs GFLOPs of {Path(str(plan.checkpoint)).name}")
    timing = store.append_timing(folder, {"resumed": session.resume, "slots": slots, "fit_s": round(fit_s, 2),
                                          "session_s": round(time.monotonic() - t_start, 2), "trials": len(progress.wall)})
    store.publish(storage, name, [results, plot, timing])
    interrupted = int(df["status"].isin(["interrupted", "pending"]).sum())
    failed = int((df["status"] == "error").sum())
    wall = time.monotonic() - t_start
    summary_metrics = {
        "trials_finished": int((df["status"] == "finished").sum()), "trials_stopped": int((df["status"] == "stopped").sum()),
        "trials_failed": failed, "trials_interrupted": interrupted, "session_wall_s": wall, "fit_s": fit_s,
    }
    dense = df[(df["method"] == DENSE.name) & df["status"].isin(rep.DONE)]
    if len(dense):
        summary_metrics["dense_top1"] = float(dense.iloc[0][tracking.TOP1])
    if tracking_error is None:
        try:
            runs.summary(name, summary_params(cfg), [results, plot], summary_metrics, {"complete": str(interrupted == 0).lower(), "folder": str(folder)})
        except Exception as e:
            tracking_error = f"the summary run could not be written ({e})"
    if tracking_error is None:  # each budget x method's best row as a pyfunc model, each budget's best registered
        try:
            from prance.sweep.models import log_models

            log_models(storage, name, uri)
        except Exception as e:
            tracking_error = f"the best configurations could not be logged as MLflow models ({first_line(e)})"
    table = rep.summary_table(df, params)
    if multi:
        front = df[df["pareto"] == True]  # noqa: E712
        table += "\n\nPareto front (Top-1 up, GFLOPs down):\n" + "\n".join(
            f"  {r['strategy']}@{r['budget']} #{int(r['trial_number'])}: top1 {r[tracking.TOP1]:.2f}%  {r[tracking.GFLOPS]:.4g} GFLOPs"
            for _, r in front.sort_values(tracking.GFLOPS).iterrows())
    return SweepOutcome(name, folder, results, plot, table, uri, experiment_id, interrupted, failed, wall, tracking_error)


def _start_ray(address: str | None, storage: str, uri: str) -> None:
    """Step 2: the environment Tune and MLflow should see, Ray itself, and (on a cluster)
    the check that every node reaches the storage and the tracking server."""
    # an MLflow server that went away: fail a request in seconds (SweepRuns queues it), not
    # after MLflow's default of minutes of retries, which would hold up Tune's event loop
    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables off: Progress prints one line per event
    _init_ray(address)
    for logger in ("ray.tune", "ray.train", "mlflow"):  # their INFO lines drown the progress lines
        logging.getLogger(logger).setLevel(logging.WARNING)
    from prance.train.placement import check_shared_locations

    check_shared_locations(storage, uri)


def _open_tracking(session: SweepSession, source: str, command: str, settings: dict | None):
    """Step 3: the sweep's settings file (new sweeps), its MLflow experiment and the
    per-trial run bookkeeping; on resume, runs the interrupted session left RUNNING close."""
    cfg, name, storage, uri, resume = session.cfg, session.name, session.storage, session.uri, session.resume
    if resume:
        sweep_id, experiment = settings["sweep_id"], settings["experiment"]
    else:
        sweep_id, experiment = f"{name}-{uuid.uuid4().hex[:8]}", f"prance-sweep-{name}"
        store.write_settings(storage, name, {
            "name": name, "sweep_id": sweep_id, "experiment": experiment, "mlflow_uri": uri, "created": time.time(),
            "source": source, "command": command,
            "config": cfg.model_dump(exclude={"name": True, "storage": True, "selector": set(SWEEP_OWNED)}),
        })
    experiment_id = tracking.ensure_experiment(uri, experiment)
    runs = SweepRuns(uri, experiment_id, sweep_id, queue_dir=store.report_folder(storage, name) / QUEUE_FOLDER)
    if resume and runs.pending:  # what the interrupted session could not write (MLflow was away): first, in order
        queued = len(runs.pending)
        if not runs.flush(force=True):
            raise PranceError(f"MLflow at {uri} does not answer: {queued} write(s) the interrupted session queued are kept in "
                              f"{runs.queue_dir}; resume once it answers")
        print(f"[sweep] wrote the {queued} MLflow write(s) the interrupted session had queued", flush=True)
    if resume:
        closed = runs.close_running()
        if closed:
            print(f"[sweep] closed {len(closed)} MLflow run(s) left RUNNING by the interrupted session (trials {closed})", flush=True)
    # the parent run every trial's run nests under (the same one on resume): the summary at the end
    split = splits.SplitSpec.of_settings(session.plan.dataset, session.plan.checkpoint, cfg.selector.model_dump())
    runs.open_parent(name, summary_params(cfg), list(split_inputs(split, session.plan.image_spec).values()))
    return runs, experiment, experiment_id


def summary_params(cfg: SweepConfig) -> dict:
    """The sweep's settings as its parent run's params."""
    return cfg.model_dump(exclude={"space", "selector"})


def _trial_context(cfg: SweepConfig, plan: SweepPlan, shared: str) -> TrialContext:
    """What every trial of the sweep shares (``shared``: the name of its registry actor)."""
    return TrialContext(
        checkpoint=plan.checkpoint, dataset=plan.dataset, shared=shared,
        selector=cfg.selector.model_dump(), overshoot_penalty=cfg.overshoot_penalty,
        threads=trial_threads(cfg.cpus_per_trial) if not cfg.use_gpu else cfg.cpus_per_trial,
        device="cuda" if cfg.use_gpu else "cpu", static=cfg.static.model_dump(), cascade=cfg.cascade.model_dump(),
        controller=cfg.controller.model_dump(), checkpoint_at=checkpoint_iterations(cfg),
    )


def run_sweep(cfg: SweepConfig, *, source: str = "default", resume: bool = False, settings: dict | None = None,
              command: str = "", address: str | None = None) -> SweepOutcome:
    """Check everything, run (or resume) the sweep, write the report."""
    global _ACTIVE
    t_start = time.monotonic()

    # 1. inputs
    session = _check_inputs(cfg, source, resume, settings, t_start)
    plan, name, storage, exp_path, uri = session.plan, session.name, session.storage, session.exp_path, session.uri
    # 2. Ray, and what needs it
    _start_ray(address, storage, uri)
    from ray import tune

    slots = _slots(cfg)
    if resume and not tune.Tuner.can_restore(exp_path):
        raise PranceError(f"nothing to resume in {exp_path}: the sweep never started its trials")

    # 3. from here on things are written: settings, the MLflow experiment. A new sweep that
    # fails before its trials start leaves no folder behind (it would be a sweep --resume
    # picks and cannot continue).
    try:
        runs, experiment, experiment_id = _open_tracking(session, source, command, settings)
    except PranceError:
        if not resume:
            store.remove_unstarted(storage, name)
        raise
    except Exception as e:  # the tracking store refused (a database it cannot open or migrate)
        if not resume:
            store.remove_unstarted(storage, name)
        raise PranceError(f"MLflow at {uri} failed before any trial started ({type(e).__name__}: {first_line(e)})") from None
    except BaseException:
        if not resume:
            store.remove_unstarted(storage, name)
        raise

    from prance.sweep import shared

    _registry, registry_name = shared.start()  # images, anchors, baselines, ladders: once per sweep (alive while run_sweep holds it)
    ctx = _trial_context(cfg, plan, registry_name)
    counts = plan.counts()
    progress = Progress(runs, plan, ctx, cfg.selector.iterations, len(plan.trials))
    progress.done = sum(1 for n in runs.run_ids if runs.outcome(n) in ("finished", "stopped", "error"))
    _ACTIVE = progress
    print(
        f"[sweep] {name}: {len(plan.trials)} trials ({', '.join(f'{n} {m}' for m, n in counts.items())}) "
        f"on {budget_list(plan)}, {slots} at a time"
        + (f"; {len(plan.unreachable)} budget x strategy combos unreachable" if plan.unreachable else "")
        + f"\n[sweep] folder {exp_path}\n[sweep] MLflow {uri} (experiment {experiment})"
        + ("\n[sweep] resuming: finished trials are kept" if resume else ""),
        flush=True,
    )

    tuner = _tuner(session, ctx, slots)
    t_fit = time.monotonic()
    try:
        grid = tuner.fit()
    finally:
        _ACTIVE = None
    fit_s = time.monotonic() - t_fit

    # 4. the report
    return _report(session, grid, runs, progress, slots, fit_s, experiment_id)




def settle_runs(runs: SweepRuns, wait_s: float) -> str | None:
    """Queued MLflow writes done (waiting up to ``wait_s`` for a server that went away),
    runs left RUNNING by interrupted trials closed; the reason when MLflow stays behind."""
    if runs.pending:
        print(f"[sweep] waiting up to {wait_s:.0f}s for MLflow at {runs.uri} ({len(runs.pending)} queued write(s))",
              file=sys.stderr, flush=True)
    try:
        runs.drain(wait_s)
        runs.close_running()  # trials interrupted in this session
        runs.refresh()
    except PranceError as e:
        return str(e)
    except Exception as e:
        return f"MLflow at {runs.uri} failed ({type(e).__name__}: {str(e).strip()[:200]})"
    return None


def reconcile_runs(runs: SweepRuns, grid, rows: list[dict], progress: "Progress") -> str | None:
    """Every trial Tune knows as ended has its run, closed, with its final metrics -- also
    when the driver died between the trial's end and its callback, or its run was never
    written (MLflow away for good in an earlier session). Sets the rows' run ids."""
    status = {int(r["trial_number"]): r["status"] for r in rows if "trial_number" in r and r["status"] != "unreachable"}
    made = []
    try:
        for result in grid:
            config = dict(result.config or {})
            if "trial_number" not in config or status.get(int(config["trial_number"])) not in ("finished", "stopped", "error"):
                continue
            n = int(config["trial_number"])
            m = dict(result.metrics or {})
            metrics = {k: v for k, v in m.items() if k not in NOT_LOGGED}
            tags = {**run_tags(config), tracking.TAG_TRIAL: m.get("trial_id") or ""}
            if runs.reconcile(n, trial_label(config), progress.params(config), tags, metrics, status[n], int(m.get("iteration") or 0),
                              progress.inputs(config)):
                made.append(n)
        runs.drain(0)
    except PranceError as e:
        return str(e)
    except Exception as e:
        return f"MLflow at {runs.uri} failed ({type(e).__name__}: {str(e).strip()[:200]})"
    for row in rows:
        if "trial_number" in row and row["status"] != "unreachable":
            row["mlflow_run_id"] = runs.run_ids.get(int(row["trial_number"]))
    if made:
        print(f"[sweep] wrote the MLflow runs of {len(made)} ended trial(s) that had none or were left open (trials {made})",
              flush=True)
    return None


def budget_list(plan: SweepPlan) -> str:
    kinds = {b.kind for b in plan.budgets.values()}
    return (f"{'/'.join(sorted(kinds))} budgets " if kinds else "budgets ") + ", ".join(
        f"{text} ({b.gflops:.4g} GFLOPs)" for text, b in plan.budgets.items())


def result_rows(grid, plan: SweepPlan, runs: SweepRuns, progress: Progress) -> list[dict]:
    """A row per trial of Tune's ResultGrid (status from its last result and the trial's
    MLflow run), plus a row per combo no trial could run."""
    rows = []
    for result in grid:
        config = dict(result.config or {})
        if "trial_number" not in config:
            continue
        n = int(config["trial_number"])
        m = dict(result.metrics or {})
        if result.error is not None:
            status = "error"
        elif m.get(FINAL):
            status = "finished"
        elif runs.outcome(n) == "stopped":
            status = "stopped"
        else:
            status = "interrupted"
        row = {**config, "trial_id": m.get("trial_id"), "status": status, "mlflow_run_id": runs.run_ids.get(n)}
        for k in (*rep.METRIC_COLUMNS, "gflops_p95", "gflops_max", "escalated", "margin", "passes", "cascade_top1", "trained", "policy_top1", "score", "baseline_top1", "iteration", "best_iteration", "warm_start_top1", "warm_start", "body_s"):
            if k in m:
                row[k] = m[k]
        for k, v in m.items():
            if k.startswith("test_"):
                row[k] = v
        if m.get("configuration"):  # a static trial: what its search chose
            row["param"] = m["configuration"]
        if trained_file(str(config.get("method"))) and result.checkpoint is not None:  # what `prance eval --sweep` runs
            row["selector_path"] = selector_path(result.checkpoint, config["method"])
        if n in progress.wall:
            row["wall_s"] = progress.wall[n]
        if result.error is not None:
            row["error"] = str(result.error).strip().splitlines()[-1][:300] if str(result.error).strip() else type(result.error).__name__
        rows.append(row)
    seen = {int(r["trial_number"]) for r in rows}
    for number, c in enumerate(plan.trials):
        if number not in seen:  # never started (the sweep was interrupted before)
            rows.append({**c.as_config(), "trial_number": number, "status": "pending"})
    for c in plan.unreachable:
        rows.append({**c.as_config(), "status": "unreachable", "note": c.note})
    return rows


def mlflow_ui_command(uri: str, experiment_id: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/#/experiments/{experiment_id}"
    return f"mlflow ui --backend-store-uri {uri}"

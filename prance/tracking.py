"""MLflow conventions in one place: tracking URIs, metric names, run life cycle.

Runs are driven through ``MlflowClient`` with explicit run ids (no global active run), so
a driver and its Ray workers can log to the same run. The default tracking store is
``sqlite:///<absolute path>/mlflow.db`` (MLflow 3 rejects plain directories; a relative
URI would resolve inside each Ray worker's temporary directory).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prance.errors import PranceError

# Metric names used everywhere (CLI JSON, MLflow, results tables).
TOP1 = "top1"
GFLOPS = "gflops"
TOKEN_RATIO = "token_ratio"
FINAL_TOKEN_RATIO = "final_token_ratio"
THROUGHPUT = "throughput_img_s"
REWARD = "reward"


def default_uri(folder: str | os.PathLike) -> str:
    return f"sqlite:///{Path(folder).expanduser().resolve() / 'mlflow.db'}"


# The tracking stores MLflow 3 opens (a SQLAlchemy dialect may follow a "+": mysql+pymysql).
# ``file:`` / plain folders are refused by MLflow 3 itself.
URI_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def check_uri(uri: str) -> None:
    """PranceError, before anything is written, for a tracking URI MLflow cannot open."""
    if "://" not in uri:
        raise PranceError(f"MLflow tracking URI {uri!r} is not a URI: use sqlite:///path/mlflow.db or http://host:port")
    scheme = uri.split("://", 1)[0].lower()
    if scheme.split("+", 1)[0] not in URI_SCHEMES:
        raise PranceError(f"MLflow tracking URI {uri!r}: unknown scheme {scheme!r}; use sqlite:///path/mlflow.db, "
                          f"http(s)://host:port or one of {', '.join(URI_SCHEMES)}")


def resolve_uri(uri: str | None, folder: str | os.PathLike) -> str:
    """``uri`` made absolute (sqlite paths), or the default store in ``folder``; a sqlite
    database's folder is checked writable and created (PranceError when it cannot be)."""
    from prance.paths import check_output_file

    if not uri:
        check_output_file(Path(folder).expanduser() / "mlflow.db", "the MLflow database")
        Path(folder).expanduser().mkdir(parents=True, exist_ok=True)
        return default_uri(folder)
    check_uri(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
        check_output_file(path, "MLflow tracking URI")
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if uri.startswith("sqlite:////"):
        check_output_file(uri.removeprefix("sqlite:///"), "MLflow tracking URI")
    return uri


def is_reachable(uri: str, timeout_s: float = 2.0) -> bool:
    """Whether the tracking store answers now (a server's /health; local stores always)."""
    try:
        check_reachable(uri, timeout_s)
    except PranceError:
        return False
    return True


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any run is created, when an MLflow server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise PranceError(f"MLflow server {uri} is unreachable ({getattr(e, 'reason', e)})") from None


def check_store(uri: str) -> None:
    """Open a database tracking store (sqlite, postgresql, ...) once, before any run or
    sweep folder is written: a file that is not a database, or one MLflow cannot migrate,
    is a PranceError now rather than a traceback after Ray has started. Servers are
    checked by :func:`check_reachable`."""
    if uri.startswith(("http://", "https://", "databricks", "uc:")):
        return
    import logging

    quiet = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..." on a new file
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as e:
        text = " ".join(str(e).split()).split(" [SQL")[0]
        raise PranceError(f"MLflow tracking store {uri} cannot be opened ({type(e).__name__}: {text[:160]})") from None
    finally:
        quiet.setLevel(level)


PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow reads it each time it would draw a bar


@contextmanager
def no_artifact_progress_bars():
    """MLflow's artifact upload/download progress bars off inside the block (logging a
    model downloads it again to check its input example: one bar per model in the sweep's
    output), unless the user set ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` themselves."""
    if PROGRESS_BAR_ENV in os.environ:
        yield
        return
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        os.environ.pop(PROGRESS_BAR_ENV, None)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else c.create_experiment(name)


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    c = client(uri)
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags or {})
    for k, v in params.items():
        c.log_param(run.info.run_id, k, str(v)[:6000])
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    c = client(uri)
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            c.log_metric(run_id, k, float(v), step=step)


def last_step(uri: str, run_id: str, key: str) -> int:
    """The highest step logged for metric ``key`` of the run (-1 when none): a restarted
    worker or trial logs only the steps after it, so that no step appears twice."""
    history = client(uri).get_metric_history(run_id, key)
    return max((h.step for h in history), default=-1)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run(uri: str, run_id: str, ok: bool) -> None:
    client(uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a resumed run RUNNING again (it was FAILED or KILLED when interrupted)."""
    client(uri).update_run(run_id, status="RUNNING")


# --------------------------------------------------------------------------- sweeps
# A sweep's runs carry these tags; a run is found again by (sweep id, trial id), which is
# what keeps a resumed sweep from creating duplicates.
TAG_KIND = "prance.kind"  # pretrain | sweep-trial | sweep-summary
TAG_SWEEP = "prance.sweep_id"
TAG_TRIAL = "prance.trial_id"
TAG_STATUS = "prance.status"  # finished | stopped | error | interrupted
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's UI picks an experiment's first page from this tag
MODEL_TRAINING = "custom_model_development"
TAG_CONFIGURATION = "prance.configuration"  # what a static baseline's search chose
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow nests a run under the run this tag names (the UI's run tree)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite database (MLflow's own
    default would be ``./mlruns`` in whatever folder the driver runs in); a server decides
    for itself."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        return (db.parent / "mlartifacts" / safe).as_uri()
    return None


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, created (with its artifact location) when missing."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    experiment_id = c.create_experiment(name, artifact_location=artifact_location(uri, name))
    # model training, not GenAI: MLflow 3's UI then opens the experiment on its runs table
    c.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return experiment_id


def find_runs(uri: str, experiment_id: str, tags: dict[str, str]) -> list:
    """Every run of the experiment whose tags equal ``tags`` (any status)."""
    from mlflow.entities import ViewType

    c = client(uri)
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs, token = [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=query, run_view_type=ViewType.ACTIVE_ONLY,
                             max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def log_batch(uri: str, run_id: str, metrics: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
              tags: dict[str, Any] | None = None, step: int = 0) -> None:
    """Metrics (numbers only), params and tags in one request."""
    import math
    import time

    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    m = [Metric(k, float(v), now, int(step)) for k, v in (metrics or {}).items()
         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    p = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    if m or p or t:
        client(uri).log_batch(run_id, metrics=m, params=p, tags=t)


def log_artifacts(uri: str, run_id: str, folder: str | os.PathLike, artifact_path: str | None = None) -> None:
    client(uri).log_artifacts(run_id, str(folder), artifact_path)


def log_artifact(uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_inputs(uri: str, run_id: str, datasets: list[dict]) -> None:
    """The run's dataset inputs (``mlflow.log_input`` through the client): ``datasets`` are
    records of :func:`prance.splits.inputs` (name, digest, source, profile, context), no
    copy of the data. MLflow keeps one input per dataset and run: logging it again adds
    nothing."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entries = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d.get("profile")),
                            tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])]) for d in datasets]
    if entries:
        client(uri).log_inputs(run_id, datasets=entries)


def set_status(uri: str, run_id: str, status: str) -> None:
    """RUNNING, FINISHED, FAILED or KILLED (end time set for the last three)."""
    c = client(uri)
    if status == "RUNNING":
        c.update_run(run_id, status="RUNNING")
    else:
        c.set_terminated(run_id, status=status)

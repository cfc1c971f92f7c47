"""The driver side of pretraining: checks the input, starts (or resumes) the MLflow run and
a Ray Train ``TorchTrainer``, and exports the best checkpoint."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from prance import tracking
from prance.checkpoint import locate, read_header
from prance.train.config import PretrainConfig
from prance.errors import PranceError
from prance.storage import absolute, fetch, is_remote, local_path, write_text
from prance.train.placement import check_shared_locations
from prance.train.worker import MODEL_FILE, has_train_state, load_train_state, train_loop_per_worker

RUN_ID_FILE = "mlflow_run_id"


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Path  # the best epoch's model.safetensors, copied into the run folder
    metrics: dict
    run_dir: Path
    mlflow_uri: str
    mlflow_run_id: str


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest epoch first."""
    found = []
    for d in run_dir.glob("checkpoint_*"):
        if has_train_state(d) and (d / MODEL_FILE).is_file():
            try:
                epoch = json.loads((d / "metrics.json").read_text())["epoch"]
            except (OSError, ValueError, KeyError):
                continue
            found.append((epoch, d))
    return [d for _, d in sorted(found)]


def latest_good(checkpoints: list[Path]) -> Path:
    """The newest checkpoint folder whose files read back whole (a node lost while writing
    one, a truncated copy): older ones are fallen back to with a warning naming what was
    skipped and why; PranceError when none reads."""

    from prance.checkpoint import verify_safetensors

    skipped = []
    for folder in reversed(checkpoints):
        try:
            verify_safetensors(folder / MODEL_FILE)
            load_train_state(folder)
        except PranceError as e:
            skipped.append(f"{folder.name}: {e}")
            continue
        for why in skipped:
            print(f"warning: skipping unreadable checkpoint {why}; resuming from {folder.name}", file=sys.stderr, flush=True)
        return folder
    raise PranceError(f"nothing to resume: every checkpoint in {checkpoints[0].parent} is unreadable "
                      f"(newest: {skipped[0]})")


STAGING = "runs"  # local folder (under the working folder) where runs on remote storage are fetched to


def staging_dir(cfg: PretrainConfig) -> Path:
    """The local folder of a run on remote storage: its best checkpoint and MLflow run id
    are fetched there for the export."""
    return Path(STAGING).resolve() / cfg.name


def fetch_best(remote_run: str, best_by: str, dest: Path) -> Path:
    """Download the best checkpoint (by ``best_by`` in each ``metrics.json``) of a run on
    remote storage (``s3://bucket/prefix/name``; any URI pyarrow reads) to
    ``dest/best.safetensors``; PranceError when it holds no checkpoint."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(remote_run)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except Exception as e:  # unreachable endpoint, no credentials, bad URI
        raise PranceError(f"cannot list {remote_run}: {type(e).__name__}: {e}") from None
    scored = []
    for info in infos:
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/metrics.json") as f:
                metrics = json.loads(f.read())
            scored.append((metrics.get(best_by, -1.0), metrics.get("epoch", -1), info.path))
        except (OSError, ValueError):
            continue  # a checkpoint still being written, or cut short
    if not scored:
        raise PranceError(f"no finished run in {remote_run} (no checkpoint with a metrics.json)")
    best = max(scored)[2]
    return fetch(f"{best}/{MODEL_FILE}", dest / "best.safetensors", fs=fs)


def run_dir_of(cfg: PretrainConfig) -> Path:
    """The local folder of a finished run (for a run on remote storage: its best checkpoint
    fetched into the local staging folder first); PranceError when there is none."""
    if is_remote(cfg.storage):
        run_dir = staging_dir(cfg)
        fetch_best(f"{absolute(cfg.storage)}/{cfg.name}", cfg.best_by, run_dir)
        _fetch_run_id(cfg, run_dir)
        return run_dir
    run_dir = local_path(cfg.storage) / cfg.name
    if not (run_dir / "best.safetensors").is_file():
        raise PranceError(f"no finished run in {run_dir} (best.safetensors is missing)")
    return run_dir


def mlflow_uri_of(cfg: PretrainConfig) -> str:
    """The tracking URI a run of ``cfg`` logs to (as :func:`pretrain` resolves it)."""
    local_store = absolute(cfg.storage) if not is_remote(cfg.storage) else str(Path(STAGING).resolve())
    return tracking.resolve_uri(cfg.mlflow_uri, local_store)


def _arch(name, kwargs) -> str:
    return f"{name}{kwargs}" if kwargs else f"{name}"


def _check_architecture(header: dict, cfg: PretrainConfig, what: str) -> None:
    """PranceError naming ``what`` when the checkpoint behind ``header`` is another model."""
    if header.get("model") != cfg.model or header.get("model_kwargs", {}) != cfg.model_kwargs:
        raise PranceError(f"{what} is a {_arch(header.get('model'), header.get('model_kwargs'))}, "
                          f"the config asks for {_arch(cfg.model, cfg.model_kwargs)}")


def _check_init_from(cfg: PretrainConfig) -> None:
    """``init_from`` must be a prance checkpoint of the configured model; a warning when it
    was trained on the images this run holds out (they no longer validate cleanly)."""
    path = Path(locate(cfg.init_from))  # a path, or a shipped checkpoint by name (timm:prance_vit_fmnist.base)
    if not path.is_file():
        raise PranceError(f"init_from: checkpoint {cfg.init_from} not found")
    header = read_header(path)
    _check_architecture(header, cfg, f"init_from: {path}")
    seen = header.get("info", {}).get("config", {}).get("holdout_fraction", 0.0)
    if cfg.holdout_fraction and seen < cfg.holdout_fraction:
        print(f"warning: {path} was trained on (some of) the {cfg.holdout_fraction:.0%} hold-out this run keeps out: "
              "validation on those images will be optimistic (test-split numbers stay clean)", file=sys.stderr, flush=True)


BOOKKEEPING = {"storage", "name", "mlflow_uri", "experiment", "max_failures", "keep_checkpoints", "loader_workers",
               "cpus_per_worker", "epochs"}  # config keys that do not change what a resumed run computes (epochs: checked apart)


def check_resume_from(cfg: PretrainConfig, folder: Path) -> Path:
    """A resumable state (a checkpoint folder, or what ``--export-resume`` wrote) that this
    config can continue: readable, the same architecture, an epoch before ``cfg.epochs``; a
    warning names the config keys that differ from the state's (the run then does not
    continue bit-identically)."""
    from prance.checkpoint import verify_safetensors

    folder = Path(folder)
    if not folder.is_dir():
        raise PranceError(f"resume_from: {folder} is not a folder")
    verify_safetensors(folder / MODEL_FILE)
    state = load_train_state(folder)
    header = read_header(folder / MODEL_FILE)
    _check_architecture(header, cfg, f"cannot resume from {folder}: its checkpoint")
    if state["epoch"] + 1 >= cfg.epochs:
        raise PranceError(f"{folder} finished epoch {state['epoch'] + 1} of {cfg.epochs}: nothing left to train (raise --epochs)")
    saved = header.get("info", {}).get("config") or {}
    changed = sorted(k for k, v in cfg.model_dump().items() if k not in BOOKKEEPING and k in saved and saved[k] != v)
    if changed or saved.get("epochs", cfg.epochs) != cfg.epochs:
        print(f"warning: resuming {folder} with other settings ({', '.join(changed + (['epochs'] if saved.get('epochs', cfg.epochs) != cfg.epochs else []))}): "
              "the run will not continue as the interrupted one would have", file=sys.stderr, flush=True)
    return folder


def check_inputs(cfg: PretrainConfig, resume: bool, resume_from: Path | None = None) -> Path | None:
    """Everything that can be checked before Ray starts; returns the checkpoint to resume."""
    from prance.data import build_dataset, input_spec_for_model
    from prance.models import create_vit

    vit = create_vit(cfg.model, pretrained=False, **cfg.model_kwargs)  # unknown model -> PranceError
    build_dataset(cfg.dataset, "test", input_spec_for_model(vit))  # missing dataset -> PranceError
    if resume and resume_from is not None:
        raise PranceError("--resume continues a run from its own checkpoints, --resume-from from a saved state: pass one")
    if cfg.init_from and not resume and resume_from is None:
        _check_init_from(cfg)
    if resume_from is not None:
        check_resume_from(cfg, resume_from)
    if is_remote(cfg.storage):
        return None  # Ray Train restores runs on remote storage itself
    run_dir = local_path(cfg.storage) / cfg.name
    existing = checkpoints_in(run_dir)
    if not resume:
        if existing:
            raise PranceError(f"run {run_dir} already has checkpoints: pass --resume to continue it, or choose another --name")
        return Path(resume_from).resolve() if resume_from is not None else None
    if not existing:
        raise PranceError(f"nothing to resume: no checkpoint in {run_dir}")
    latest = latest_good(existing)
    _check_architecture(read_header(latest / MODEL_FILE), cfg, f"cannot resume {run_dir}: its checkpoint")
    return latest


def _cpus_per_gpu() -> int:
    """CPUs per GPU on the GPU node that has the fewest (at least 1): what a GPU worker can
    take for its data loading without leaving another GPU of that node unplaceable."""
    import ray

    shares = [int(n["Resources"].get("CPU", 0) // n["Resources"]["GPU"])
              for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1]
    return max(1, min(shares)) if shares else 1


def _check_resources(cfg: PretrainConfig) -> int | None:
    """CPUs per worker (its threads, or for a GPU worker its data-loading processes);
    PranceError when the cluster cannot place the workers."""
    import ray

    res = ray.cluster_resources()
    workers = max(1, cfg.num_workers)
    if cfg.use_gpu:
        gpus = int(res.get("GPU", 0))
        if gpus < workers:
            raise PranceError(f"{workers} GPU workers requested, the cluster has {gpus} GPUs")
        return cfg.cpus_per_worker or _cpus_per_gpu()
    cpus = int(res.get("CPU", 0))
    per = cfg.cpus_per_worker or max(1, cpus // workers)
    if cfg.num_workers > 0 and per * workers > cpus:
        raise PranceError(f"{workers} workers x {per} CPUs requested, the cluster has {cpus} CPUs")
    return per


def pretrain(cfg: PretrainConfig, *, resume: bool = False, resume_from: str | Path | None = None) -> PretrainResult:
    """Train per ``cfg``. ``resume``: continue the run ``cfg.name`` from its latest checkpoint;
    ``resume_from``: start the run from a saved state (a checkpoint folder or what
    :func:`prance.train.worker.export_resume` wrote), continuing its epochs and optimizer."""
    saved_state = Path(resume_from).resolve() if resume_from is not None else None
    resume_from = check_inputs(cfg, resume, saved_state) or saved_state
    # workers may run in another folder: they get the absolute path, while the config (and so
    # every checkpoint header and record) keeps init_from as given, e.g. relative to the checkout
    init_path = locate(cfg.init_from) if cfg.init_from else None
    storage = absolute(cfg.storage)
    remote = is_remote(storage)
    # a run on remote storage: its best checkpoint and MLflow run id come to the local staging folder
    run_dir = staging_dir(cfg) if remote else Path(storage) / cfg.name
    uri = mlflow_uri_of(cfg)
    tracking.check_reachable(uri)
    tracking.check_store(uri)

    from prance.rayinit import init_ray

    init_ray()  # joins RAY_ADDRESS (e.g. under `ray job submit`) or starts a local Ray
    check_shared_locations(storage, uri)  # multi-node: local storage -> PranceError, sqlite MLflow -> warning
    per_worker = _check_resources(cfg)

    run_id = _mlflow_run(cfg, uri, run_dir, resume)
    trainer = _trainer(cfg, storage, per_worker, {
        "init_from_path": init_path,
        "resume_from": str(resume_from) if resume_from else None,
        "mlflow_uri": uri,
        "mlflow_run_id": run_id,
    })
    ok = False
    try:
        out, metrics, checkpoint = _keep_best(trainer.fit(), cfg, run_dir)
        where = f"{storage}/{cfg.name}/{Path(checkpoint.path).name}" if remote else str(out)
        tracking.log_metrics(uri, run_id, {f"best_{k}": v for k, v in metrics.items() if k.startswith("top1")})
        tracking.set_tags(uri, run_id, {"checkpoint": where})
        ok = True
        return PretrainResult(out, dict(metrics), run_dir, uri, run_id)
    finally:
        tracking.end_run(uri, run_id, ok)


def _fetch_run_id(cfg: PretrainConfig, run_dir: Path) -> None:
    """The MLflow run id of a run on remote storage, from beside its checkpoints into
    ``run_dir`` (runs started before it was kept there have none: nothing is fetched)."""
    try:
        fetch(f"{absolute(cfg.storage)}/{cfg.name}/{RUN_ID_FILE}", run_dir / RUN_ID_FILE)
    except PranceError:
        pass


def _mlflow_run(cfg: PretrainConfig, uri: str, run_dir: Path, resume: bool) -> str:
    """The run's MLflow run id: reopened on resume, else a new run (its id kept in ``run_dir``
    and, for a run on remote storage, beside its checkpoints: an export or a resume on
    another machine finds it there)."""
    run_id_path = run_dir / RUN_ID_FILE
    if resume and is_remote(cfg.storage) and not run_id_path.is_file():
        _fetch_run_id(cfg, run_dir)
    if resume and run_id_path.is_file():
        run_id = run_id_path.read_text().strip()
        tracking.reopen_run(uri, run_id)
        return run_id
    params = {k: v for k, v in cfg.model_dump().items()}
    run_id = tracking.start_run(uri, cfg.experiment, f"pretrain-{cfg.name}", params, tags={"prance.kind": "pretrain"})
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id_path.write_text(run_id)
    if is_remote(cfg.storage):
        write_text(f"{absolute(cfg.storage)}/{cfg.name}/{RUN_ID_FILE}", run_id)
    return run_id


def _trainer(cfg: PretrainConfig, storage: str, per_worker: int, extra: dict):
    """Ray Train's TorchTrainer of the run; ``extra``: more of the workers' loop config."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": per_worker} if per_worker else None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "pretrain": cfg.model_dump(),
            "threads": per_worker if not cfg.use_gpu else None,
            "loader_workers": cfg.loader_workers,  # None: auto (prance.train.worker.loader_workers)
            "cpus": per_worker,
            **extra,
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=cfg.best_by, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )


def _keep_best(result, cfg: PretrainConfig, run_dir: Path):
    """(``run_dir/best.safetensors``, its metrics, its Ray checkpoint): the best checkpoint
    of the run by ``cfg.best_by``, copied out of Ray's storage."""
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get(cfg.best_by, -1)) if result.best_checkpoints else None
    if best is None:
        raise PranceError("training finished without a checkpoint")
    checkpoint, metrics = best
    out = run_dir / "best.safetensors"
    run_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:  # downloads it first from remote storage
        shutil.copyfile(Path(folder) / MODEL_FILE, out)
    return out, metrics, checkpoint

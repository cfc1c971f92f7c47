"""The driver side of pretraining: checks the input, starts (or resumes) the MLflow run and
a Ray Train ``TorchTrainer``, and exports the best checkpoint."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from prance import tracking
from prance.checkpoint import read_header
from prance.train.config import PretrainConfig
from prance.errors import PranceError
from prance.storage import absolute, is_remote, local_path
from prance.train.placement import check_shared_locations
from prance.train.worker import MODEL_FILE, STATE_FILE, train_loop_per_worker

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
        if (d / STATE_FILE).is_file() and (d / MODEL_FILE).is_file():
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

    from prance.checkpoint import load_state, verify_safetensors

    skipped = []
    for folder in reversed(checkpoints):
        try:
            verify_safetensors(folder / MODEL_FILE)
            load_state(folder / STATE_FILE)
        except PranceError as e:
            skipped.append(f"{folder.name}: {e}")
            continue
        for why in skipped:
            print(f"warning: skipping unreadable checkpoint {why}; resuming from {folder.name}", file=sys.stderr, flush=True)
        return folder
    raise PranceError(f"nothing to resume: every checkpoint in {checkpoints[0].parent} is unreadable "
                      f"(newest: {skipped[0]})")


def run_dir_of(cfg: PretrainConfig) -> Path:
    """The local folder of a run; PranceError when it holds no finished run."""
    if is_remote(cfg.storage):
        raise PranceError("exporting needs a local --storage folder")
    run_dir = local_path(cfg.storage) / cfg.name
    if not (run_dir / "best.safetensors").is_file():
        raise PranceError(f"no finished run in {run_dir} (best.safetensors is missing)")
    return run_dir


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
    path = Path(cfg.init_from)
    if not path.is_file():
        raise PranceError(f"init_from: checkpoint {path} not found")
    header = read_header(path)
    _check_architecture(header, cfg, f"init_from: {path}")
    seen = header.get("info", {}).get("config", {}).get("holdout_fraction", 0.0)
    if cfg.holdout_fraction and seen < cfg.holdout_fraction:
        print(f"warning: {path} was trained on (some of) the {cfg.holdout_fraction:.0%} hold-out this run keeps out: "
              "validation on those images will be optimistic (test-split numbers stay clean)", file=sys.stderr, flush=True)


def check_inputs(cfg: PretrainConfig, resume: bool) -> Path | None:
    """Everything that can be checked before Ray starts; returns the checkpoint to resume."""
    from prance.data import build_dataset, input_spec_for_model
    from prance.models import create_vit

    vit = create_vit(cfg.model, pretrained=False, **cfg.model_kwargs)  # unknown model -> PranceError
    build_dataset(cfg.dataset, "test", input_spec_for_model(vit))  # missing dataset -> PranceError
    if cfg.init_from and not resume:
        _check_init_from(cfg)
    if is_remote(cfg.storage):
        return None  # Ray Train restores runs on remote storage itself
    run_dir = local_path(cfg.storage) / cfg.name
    existing = checkpoints_in(run_dir)
    if not resume:
        if existing:
            raise PranceError(f"run {run_dir} already has checkpoints: pass --resume to continue it, or choose another --name")
        return None
    if not existing:
        raise PranceError(f"nothing to resume: no checkpoint in {run_dir}")
    latest = latest_good(existing)
    _check_architecture(read_header(latest / MODEL_FILE), cfg, f"cannot resume {run_dir}: its checkpoint")
    return latest


def _check_resources(cfg: PretrainConfig) -> int | None:
    """Threads per worker; PranceError when the cluster cannot place the workers."""
    import ray

    res = ray.cluster_resources()
    workers = max(1, cfg.num_workers)
    if cfg.use_gpu:
        gpus = int(res.get("GPU", 0))
        if gpus < workers:
            raise PranceError(f"{workers} GPU workers requested, the cluster has {gpus} GPUs")
        return cfg.cpus_per_worker
    cpus = int(res.get("CPU", 0))
    per = cfg.cpus_per_worker or max(1, cpus // workers)
    if cfg.num_workers > 0 and per * workers > cpus:
        raise PranceError(f"{workers} workers x {per} CPUs requested, the cluster has {cpus} CPUs")
    return per


def pretrain(cfg: PretrainConfig, resume: bool = False) -> PretrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resume_from = check_inputs(cfg, resume)
    if cfg.init_from:  # workers may run in another folder
        cfg = cfg.model_copy(update={"init_from": str(Path(cfg.init_from).resolve())})
    storage = absolute(cfg.storage)
    run_dir = Path(storage) / cfg.name
    local_store = storage if not is_remote(storage) else str(Path("runs").resolve())
    uri = tracking.resolve_uri(cfg.mlflow_uri, local_store)
    tracking.check_reachable(uri)
    tracking.check_store(uri)

    from prance.rayinit import init_ray

    init_ray()  # joins RAY_ADDRESS (e.g. under `ray job submit`) or starts a local Ray
    check_shared_locations(storage, uri)  # multi-node: local storage -> PranceError, sqlite MLflow -> warning
    per_worker = _check_resources(cfg)

    run_id_path = run_dir / RUN_ID_FILE
    if resume and run_id_path.is_file():
        run_id = run_id_path.read_text().strip()
        tracking.reopen_run(uri, run_id)
    else:
        params = {k: v for k, v in cfg.model_dump().items()}
        run_id = tracking.start_run(uri, cfg.experiment, f"pretrain-{cfg.name}", params, tags={"prance.kind": "pretrain"})
        if not is_remote(storage):
            run_dir.mkdir(parents=True, exist_ok=True)
            run_id_path.write_text(run_id)

    resources = {"CPU": per_worker} if per_worker else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "pretrain": cfg.model_dump(),
            "threads": per_worker if not cfg.use_gpu else None,
            "resume_from": str(resume_from) if resume_from else None,
            "mlflow_uri": uri,
            "mlflow_run_id": run_id,
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
    ok = False
    try:
        result = trainer.fit()
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get(cfg.best_by, -1)) if result.best_checkpoints else None
        if best is None:
            raise PranceError("training finished without a checkpoint")
        checkpoint, metrics = best
        out = run_dir / "best.safetensors" if not is_remote(storage) else None
        with checkpoint.as_directory() as folder:
            if out is not None:
                shutil.copyfile(Path(folder) / MODEL_FILE, out)
        tracking.log_metrics(uri, run_id, {f"best_{k}": v for k, v in metrics.items() if k.startswith("top1")})
        tracking.set_tags(uri, run_id, {"checkpoint": str(out or checkpoint.path)})
        ok = True
        return PretrainResult(out or Path(checkpoint.path), dict(metrics), run_dir, uri, run_id)
    finally:
        tracking.end_run(uri, run_id, ok)

"""The Ray Train worker loop of meta-network pretraining (one process per worker).

Data parallel: every epoch the train set is permuted with ``seed + epoch`` and worker
``r`` of ``w`` takes positions ``r, r + w, ...``, a disjoint shard; gradients are
all-reduced by DDP once per sandwich step. Each epoch ends with a sharded evaluation of
the largest and smallest sub-networks and a checkpoint reported through
``ray.train.report`` (rank 0 writes it: ``model.safetensors`` + ``train_state.safetensors``).

A checkpoint folder (or a copy of one made by :func:`export_resume`, which can live in git:
safetensors only, no pickle) continues bit-identically: weights in float32, the optimizer
state, the epoch and step counters; every random draw is seeded by (seed, epoch, rank).
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Subset

from prance.checkpoint import load_checkpoint, load_state, load_tensor_state, save_checkpoint, save_tensor_state
from prance.errors import PranceError
from prance.train.config import PretrainConfig
from prance.data import EpochShardSampler, TensorImageDataset, build_dataset, input_spec_for_model, make_loader, pretrain_holdout, seeded_subset
from prance.device import autocast_for
from prance.models import MetaViT, create_meta, reorder_by_importance
from prance.models.subnet import SubnetSpace
from prance.train import optim
from prance.train.augment import flip_shift
from prance.train.sandwich import sample_plan, sandwich, sandwich_step

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"  # optimizer state + counters, prance.checkpoint.save_tensor_state
LEGACY_STATE_FILE = "train_state.pt"  # what checkpoints written before 2026-12-07 hold (torch.save; read weights_only)


def _is_tensor_dataset(ds) -> bool:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return isinstance(ds, TensorImageDataset)


def pretrain_split(cfg: PretrainConfig, spec, train: bool | None = None):
    """(the images pretraining trains on, the held-out ones or None): the train split less
    the ``holdout_fraction`` that :func:`prance.data.pretrain_holdout` keeps out (the split
    selectors and the export's leak check read back from a checkpoint's header), then
    ``train_limit`` of what is left."""
    train_set = build_dataset(cfg.dataset, "train", spec, train=cfg.augment if train is None else train)
    held = None
    if cfg.holdout_fraction:
        train_set, held = pretrain_holdout(train_set, cfg.holdout_fraction)
    if cfg.train_limit:
        train_set = seeded_subset(train_set, cfg.train_limit, cfg.seed)
    return train_set, held


def loader_workers(cfg: PretrainConfig, train_set, cpus: int | None, configured: int | None = None) -> int:
    """Data-loading processes of one training worker: ``configured`` when given; else none
    for in-memory tensors (their batches are preprocessed in one vectorised call, cheaper
    than handing them between processes), and for image folders (per-image decode and
    transforms) one per CPU of the worker but one."""
    if configured is not None:
        return configured
    if _is_tensor_dataset(train_set):
        return 0
    return max(1, (cpus or 1) - 1)


def save_train_checkpoint(folder: Path, model: MetaViT, cfg: PretrainConfig, optimizer, epoch: int, step: int, metrics: dict) -> None:
    info = {"epoch": epoch, "step": step, "metrics": metrics, "config": cfg.model_dump()}
    save_checkpoint(folder / MODEL_FILE, model, cfg.model, cfg.model_kwargs, info=info)
    save_tensor_state(folder / STATE_FILE, {"optimizer": optimizer.state_dict(), "epoch": epoch, "step": step})
    (folder / "metrics.json").write_text(json.dumps({"epoch": epoch, **metrics}))


def has_train_state(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() or (folder / LEGACY_STATE_FILE).is_file()


def load_train_state(folder: Path) -> dict:
    """Optimizer state and counters: ``train_state.safetensors``, or an older checkpoint's
    ``train_state.pt`` through ``torch.load(weights_only=True)`` (tensors and plain containers only)."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file() and (folder / LEGACY_STATE_FILE).is_file():
        return load_state(folder / LEGACY_STATE_FILE)
    return load_tensor_state(folder / STATE_FILE)


def export_resume(checkpoint: Path, dest: Path) -> Path:
    """Copy the resumable state of a checkpoint folder to ``dest`` as safetensors only:
    ``model.safetensors`` (float32 weights, config in its header), ``train_state.safetensors``
    (optimizer state, epoch, step) and ``metrics.json``. Small enough to commit; a later
    session continues from it with ``sweeps/pretrain.py --resume-from dest``."""
    import shutil

    checkpoint, dest = Path(checkpoint), Path(dest)
    state = load_train_state(checkpoint)  # also converts an older train_state.pt
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint / MODEL_FILE, dest / (MODEL_FILE + ".tmp"))
    (dest / (MODEL_FILE + ".tmp")).replace(dest / MODEL_FILE)
    save_tensor_state(dest / STATE_FILE, state)
    if (checkpoint / "metrics.json").is_file():
        (dest / "metrics.json").write_text((checkpoint / "metrics.json").read_text())
    (dest / LEGACY_STATE_FILE).unlink(missing_ok=True)
    return dest


@torch.inference_mode()
def evaluate_shard(model: MetaViT, loader, subnets: dict, device, world: int) -> dict[str, float]:
    """Top-1 (%) of each named sub-network over this worker's shard, summed across workers."""
    model.eval()
    counts = torch.zeros(len(subnets) + 1, dtype=torch.float64)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        for i, sub in enumerate(subnets.values()):
            counts[i] += (model(x, sub).argmax(-1) == y).sum().item()
        counts[-1] += len(y)
    if world > 1:
        torch.distributed.all_reduce(counts)
    model.train()
    return {name: 100.0 * float(counts[i] / counts[-1]) for i, name in enumerate(subnets)}


# Primes, so that (seed, epoch, rank) triples of realistic size never share a seed.
_RUN_STRIDE, _EPOCH_STRIDE = 100003, 1009


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a worker's random draws in one epoch: distinct per run seed, epoch and
    rank (primes keep them apart), the same after a resume, so a resumed run redraws the
    epoch it restarts exactly as the first attempt did."""
    return seed * _RUN_STRIDE + epoch * _EPOCH_STRIDE + rank


@dataclass
class _Worker:
    """One worker's model, optimiser and data: what the epochs share."""

    cfg: PretrainConfig
    model: MetaViT
    net: torch.nn.Module  # the model, DDP-wrapped with several workers
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int
    world: int
    sampler: EpochShardSampler
    loader: object  # this worker's shard of the train set
    eval_loader: object  # its shard of the evaluation images
    steps_per_epoch: int
    total_steps: int
    warmup: int  # steps
    tensor_data: bool  # in-memory images: augmented here per batch
    amp: bool
    scaler: torch.amp.GradScaler | None = None
    gen: torch.Generator = field(default_factory=torch.Generator)  # seeded per epoch (sub-network and augmentation draws)

    def autocast(self):
        return autocast_for(self.device, self.amp)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: build, then per epoch train, evaluate and report."""
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig.model_validate(config["pretrain"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    torch.manual_seed(cfg.seed)  # same initial weights on every worker
    model, optimizer_state, start_epoch, step = _build_model(cfg, config, ray.train.get_checkpoint())
    w = _build_worker(cfg, config, model, optimizer_state, device, rank, world)
    epoch_times: list[float] = []
    logging = rank == 0 and bool(config.get("mlflow_uri") and config.get("mlflow_run_id"))
    if logging:  # a restart after a failure may redo an epoch whose checkpoint was not committed: log it once
        from prance import tracking

        logged = tracking.last_step(config["mlflow_uri"], config["mlflow_run_id"], "top1_largest")
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        loss_sum, n_img, n_steps, step = train_one_epoch(w, epoch, step)
        train_seconds = time.perf_counter() - t0
        top1 = evaluate_shard(model, w.eval_loader, {"largest": model.space.largest(), "smallest": model.space.smallest()}, device, world)
        epoch_times.append(time.perf_counter() - t0)
        seconds_left = (cfg.epochs - epoch - 1) * sum(epoch_times) / len(epoch_times)
        metrics = {
            "epoch": epoch,
            "loss": loss_sum / max(1, n_steps),
            "top1_largest": top1["largest"],
            "top1_smallest": top1["smallest"],
            "top1_sandwich": (top1["largest"] + top1["smallest"]) / 2,
            "images_per_s": n_img * world / train_seconds,
            "lr": w.optimizer.param_groups[0]["lr"],
            "epoch_seconds": epoch_times[-1],
            "seconds_left": seconds_left,
        }
        if rank != 0:
            ray.train.report(metrics)
            continue
        print(
            f"[pretrain] epoch {epoch + 1}/{cfg.epochs}  loss {metrics['loss']:.3f}  "
            f"top1 largest {top1['largest']:.2f}%  smallest {top1['smallest']:.2f}%  "
            f"{metrics['images_per_s']:.0f} img/s  epoch {epoch_times[-1]:.0f}s  left ~{seconds_left / 60:.1f} min",
            flush=True,
        )
        if logging and epoch > logged:
            tracking.log_metrics(config["mlflow_uri"], config["mlflow_run_id"], metrics, step=epoch)
        with tempfile.TemporaryDirectory() as tmp:
            save_train_checkpoint(Path(tmp), model, cfg, w.optimizer, epoch, step, metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _build_model(cfg: PretrainConfig, config: dict, checkpoint) -> tuple[MetaViT, dict | None, int, int]:
    """(the meta-network, the optimizer state to restore or None, the first epoch, the
    step count): from Ray's ``checkpoint`` of this run or ``resume_from`` (continuing),
    else ``init_from``'s weights, else a fresh (optionally reordered) model."""
    model = create_meta(cfg.model, pretrained=cfg.pretrained, **cfg.model_kwargs)
    model.space = SubnetSpace.from_fractions(model.arch, cfg.widths.heads, cfg.widths.mlp, cfg.widths.embed)
    start_epoch, step = 0, 0
    optimizer_state = None
    resume_dir = config.get("resume_from")
    if checkpoint is not None or resume_dir:
        with (checkpoint.as_directory() if checkpoint is not None else nullcontext(resume_dir)) as folder:
            folder = Path(folder)
            restored, _ = load_checkpoint(folder / MODEL_FILE)
            model.vit.load_state_dict(restored.vit.state_dict())
            state = load_train_state(folder)
            optimizer_state, start_epoch, step = state["optimizer"], state["epoch"] + 1, state["step"]
    elif cfg.init_from:  # checked by launch.check_inputs: same architecture
        restored, _ = load_checkpoint(config.get("init_from_path") or cfg.init_from)
        model.vit.load_state_dict(restored.vit.state_dict())
    elif cfg.reorder:
        reorder_by_importance(model.vit)
    return model, optimizer_state, start_epoch, step


def _build_worker(cfg: PretrainConfig, config: dict, model: MetaViT, optimizer_state: dict | None, device: torch.device,
                  rank: int, world: int) -> _Worker:
    """The model in training mode on the device (DDP with several workers), its optimiser,
    and this worker's shards of the train and evaluation images."""
    model.train()
    if world > 1:
        import ray.train.torch

        net = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU), moved to the device
    else:
        net = model.to(device)
    optimizer = optim.adamw(model, cfg.lr, cfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    spec = input_spec_for_model(model.vit)
    train_set, _ = pretrain_split(cfg, spec)
    test_set = seeded_subset(build_dataset(cfg.dataset, "test", spec), cfg.eval_limit, cfg.seed)
    eval_shard = Subset(test_set, list(range(rank, len(test_set), world)))
    n_loaders = loader_workers(cfg, train_set, config.get("cpus"), config.get("loader_workers"))
    feed = {"num_workers": n_loaders, "pin_memory": device.type == "cuda"}
    if n_loaders:  # the same processes serve every epoch, each keeps 4 batches ready
        feed.update(persistent_workers=True, prefetch_factor=4)
    eval_loader = make_loader(eval_shard, batch_size=256, **feed)
    per_worker = max(1, cfg.batch_size // world)
    # epoch e: the train set permuted with seed + e, worker r takes positions r, r + w, ...
    sampler = EpochShardSampler(len(train_set), cfg.seed, rank, world)
    loader = make_loader(train_set, batch_size=per_worker, drop_last=True, sampler=sampler, **feed)
    steps_per_epoch = len(train_set) // world // per_worker
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    amp = cfg.amp and device.type == "cuda"
    return _Worker(cfg, model, net, optimizer, device, rank, world, sampler, loader, eval_loader, steps_per_epoch,
                   steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch), _is_tensor_dataset(train_set),
                   amp, torch.amp.GradScaler("cuda") if amp else None)


def train_one_epoch(w: _Worker, epoch: int, step: int) -> tuple[float, int, int, int]:
    """One epoch of sandwich steps on this worker's shard: (summed loss of the largest
    sub-network, images, steps, the step count after it)."""
    cfg, model, optimizer, scaler = w.cfg, w.model, w.optimizer, w.scaler
    no_sync = w.net.no_sync if hasattr(w.net, "no_sync") else nullcontext
    w.gen.manual_seed(epoch_seed(cfg.seed, epoch, w.rank))
    w.sampler.set_epoch(epoch)
    loss_sum, n_img, n_steps = 0.0, 0, 0
    for x, y in w.loader:
        if n_steps >= w.steps_per_epoch:
            break
        optim.set_lr(optimizer, optim.lr_at(step, w.total_steps, w.warmup, cfg.lr, cfg.min_lr))
        x, y = x.to(w.device, non_blocking=True), y.to(w.device, non_blocking=True)
        if cfg.augment and w.tensor_data:
            x = flip_shift(x, w.gen)
        subnets = sandwich(model.space, cfg.random_subnets, w.gen)
        plans = [None] + [sample_plan(model.arch, cfg.token_strategies, cfg.token_keep_min, w.gen) for _ in subnets[1:]]
        optimizer.zero_grad(set_to_none=True)
        losses = sandwich_step(w.net, x, y, subnets, plans, cfg.label_smoothing, cfg.distill, cfg.distill_temperature,
                               scaler=scaler, autocast=w.autocast, no_sync=no_sync)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        loss_sum += losses[0]
        n_img += len(y)
        n_steps += 1
        step += 1
    return loss_sum, n_img, n_steps, step

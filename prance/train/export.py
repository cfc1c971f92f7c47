"""Exporting a finished pretraining run as a small, self-describing checkpoint: the best
epoch's weights (float16 when that keeps Top-1 within ``tolerance`` points), and beside it
a JSON record of the command, wall time, per-epoch metrics, the Top-1 of the largest
and smallest sub-networks on the full test set and on a fixed subset (for tests), the
space record (every uniform width level and random mixed sub-networks, each dense and
with token pruning at keep 0.5) and, for a run that held out train images, the leak
check: the same sub-networks' Top-1 on the whole hold-out beside the test split.

Every sub-network of the record is evaluated on each batch as it is decoded: one pass
over the test split and one over the hold-out, whatever the number of sub-networks
(a second test pass only when float16 turns out lossy and the float32 weights ship).
On a Ray cluster with GPUs (right after pretraining) each pass is sharded over one Ray
task per GPU, the float16 weights under AMP; elsewhere it runs in this process.
The record names files relative to the repository (or by file name), never by the
absolute path of the machine that trained them."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from prance.checkpoint import load_checkpoint, save_checkpoint
from prance.device import autocast_for
from prance.data import build_dataset, input_spec_for_model, make_loader, pretrain_holdout, seeded_subset
from prance import flops
from prance.models.meta import MetaViT
from prance.static_search import level_subnet, num_levels
from prance.tokens.strategies import StrategyConfig, build_plan

FIXED_SUBSET = {"n": 1000, "seed": 0}
RANDOM_SUBNETS_SEED = 20  # the random mixed sub-networks of the space record
# The hold-out's validation part: its first VALIDATION_IMAGES images (what a sweep chooses
# on); the rest are rollout images. Why this size: docs/pretraining.md, "Hold-out size".
VALIDATION_IMAGES = 3000
LEAK_GAP_TARGET = 0.8  # points: issue 31's bound on |hold-out - test| for the largest and the smallest
REPO_ROOT = Path(__file__).resolve().parents[2]


def portable_path(value: str) -> str:
    """An absolute path made relative to the repository (or the working folder) when it lies
    inside, else reduced to its file name; anything else (relative paths, URLs) unchanged."""
    if not value or "://" in value or not os.path.isabs(value):
        return value
    path = Path(value)
    for root in (REPO_ROOT, Path.cwd()):
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            continue
    return path.name


def portable_command(command: str) -> str:
    """``command`` with every absolute path (also in ``key=/abs/path``) made portable."""
    out = []
    for word in command.split(" "):
        key, eq, value = word.rpartition("=")
        out.append(f"{key}{eq}{portable_path(value)}" if eq else portable_path(word))
    return " ".join(out)


def _record_rows(model: MetaViT, n_random: int, seed: int) -> list[tuple[str, object]]:
    space = model.space
    gen = torch.Generator().manual_seed(seed)
    stages = len(space.stage_starts)
    named = [(f"level_{lv}", level_subnet(space, (lv,) * stages)) for lv in range(num_levels(space))]
    return named + [(f"random_{i}", space.sample(gen)) for i in range(n_random)]


@dataclass(frozen=True)
class Devices:
    """Where the record's sub-networks are evaluated: in this process (``shards`` 0, on its
    CPU), or as ``shards`` Ray tasks over consecutive parts of the images, each on a GPU of
    the cluster when ``gpu`` (under AMP: float16 autocast), else on a CPU of a worker."""

    shards: int = 0
    gpu: bool = False

    @classmethod
    def of_cluster(cls) -> "Devices":
        """One task per GPU of the running Ray cluster; in this process without Ray or GPUs."""
        try:
            import ray
        except ImportError:
            return cls()
        gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
        return cls(shards=gpus, gpu=True) if gpus else cls()


IN_PROCESS = Devices()


@torch.inference_mode()
def correct_per_image(jobs: dict[str, tuple], dataset: Dataset, batch_size: int = 500, desc: str = "eval",
                      on: Devices = IN_PROCESS, exact: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """For every job ``name: (model, subnet, plan)``: a bool per image of ``dataset``, whether
    that sub-network's prediction is right. Each batch is decoded once and fed to all jobs;
    ``on`` shards the images over Ray tasks (each decodes its part once). On a GPU every job
    but those named in ``exact`` runs under AMP."""
    if on.shards:
        return _sharded(jobs, dataset, batch_size, on, exact)
    from tqdm import tqdm

    device = torch.device("cuda") if on.gpu and torch.cuda.is_available() else torch.device("cpu")
    models = {id(m): m.to(device).eval() for m, _, _ in jobs.values()}
    out: dict[str, list[torch.Tensor]] = {name: [] for name in jobs}
    for x, y in tqdm(make_loader(dataset, batch_size, pin_memory=device.type == "cuda"), desc=desc, unit="batch", leave=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for name, (model, sub, plan) in jobs.items():
            with autocast_for(device, device.type == "cuda" and name not in exact):
                out[name].append((models[id(model)](x, sub, plan).argmax(-1) == y).cpu())
    return {name: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for name, v in out.items()}


def _sharded(jobs: dict[str, tuple], dataset: Dataset, batch_size: int, on: Devices, exact: frozenset) -> dict[str, torch.Tensor]:
    """``correct_per_image`` as ``on.shards`` Ray tasks over consecutive index ranges, joined in order."""
    import ray

    n = len(dataset)
    bounds = [round(i * n / on.shards) for i in range(on.shards + 1)]
    task = ray.remote(_shard).options(num_gpus=1 if on.gpu else 0, num_cpus=1)
    jobs_ref, data_ref = ray.put(jobs), ray.put(dataset)  # once, whatever the shards
    parts = ray.get([task.remote(jobs_ref, data_ref, range(a, b), batch_size, on.gpu, exact) for a, b in zip(bounds, bounds[1:]) if b > a])
    return {name: torch.cat([p[name] for p in parts]) if parts else torch.zeros(0, dtype=torch.bool) for name in jobs}


def _shard(jobs: dict[str, tuple], dataset: Dataset, indices: range, batch_size: int, gpu: bool, exact: frozenset) -> dict:
    """One Ray task of :func:`_sharded`: its part of the images, on its GPU when given one."""
    from torch.utils.data import Subset

    return correct_per_image(jobs, Subset(dataset, list(indices)), batch_size, desc="shard", on=Devices(gpu=gpu), exact=exact)


def _top1(correct: torch.Tensor) -> float:
    return 100.0 * float(correct.float().mean())


def subnet_top1(model, dataset) -> dict[str, float]:
    """Top-1 (%) of the largest and the smallest sub-network over ``dataset``, one pass."""
    c = correct_per_image({"top1_largest": (model, model.space.largest(), None),
                           "top1_smallest": (model, model.space.smallest(), None)}, dataset)
    return {k: _top1(v) for k, v in c.items()}


def _se_points(p_percent: float, n: int) -> float:
    p = p_percent / 100
    return 100 * math.sqrt(p * (1 - p) / n) if n else float("nan")


def space_record(model, dataset, n_random: int = 20, keep: float = 0.5, seed: int = RANDOM_SUBNETS_SEED,
                 holdout: Dataset | None = None, validation_images: int = VALIDATION_IMAGES,
                 extra: dict[str, tuple] | None = None, return_correct: bool = False, on: Devices = IN_PROCESS,
                 amp: bool = True) -> dict:
    """Top-1 over ``dataset`` of every uniform width level (level 0 is the smallest, the
    last the largest) and of ``n_random`` seeded random mixed sub-networks, each dense and
    with token pruning at ``keep``; with the median and the worst of the random ones.

    With ``holdout`` (the train images the checkpoint's pretraining never saw) each row
    also gets its dense Top-1 there, and ``leak_check`` compares hold-out and test for the
    largest, the smallest and the random median (the gap is the evidence that nothing
    leaked). ``extra`` jobs (name: (model, subnet, plan)) ride along on the test pass; with
    ``return_correct`` the per-image correctness of every test job (the rows by name, the
    pruned ones as ``name/prune``, the extra ones) comes back under ``"_correct"``. ``on``:
    where they are evaluated; on GPUs the rows run under AMP when ``amp``, the extra jobs
    never."""
    arch = model.arch
    plan = build_plan(StrategyConfig("prune").with_param(keep), arch)
    full = flops.gflops(arch)
    named = _record_rows(model, n_random, seed)
    jobs = {}
    for name, sub in named:
        jobs[name] = (model, sub, None)
        jobs[f"{name}/prune"] = (model, sub, plan)
    jobs.update(extra or {})
    exact = frozenset(extra or {}) if amp else frozenset(jobs)
    test_c = correct_per_image(jobs, dataset, desc="space record: test", on=on, exact=exact)
    held_c = correct_per_image({name: (model, sub, None) for name, sub in named}, holdout, desc="space record: hold-out",
                               on=on, exact=exact) if holdout is not None else None
    rows = []
    for name, sub in named:
        row = {
            "name": name,
            "gflops_share": flops.gflops(arch, sub) / full,
            "top1": _top1(test_c[name]),
            f"top1_prune_keep{keep}": _top1(test_c[f"{name}/prune"]),
            f"gflops_share_prune_keep{keep}": flops.gflops(arch, sub, plan) / full,
        }
        if held_c is not None:
            row["top1_holdout"] = _top1(held_c[name])
        row["subnet"] = sub.to_dict()
        rows.append(row)
    randoms = [r for r in rows if r["name"].startswith("random_")]

    def summary(key: str) -> dict:
        values = [r[key] for r in randoms]
        return {"median": statistics.median(values), "worst": min(values)} if values else {}

    record = {
        "token_reduction": {"strategy": "prune", "keep": keep},
        "n_images": len(dataset),
        "random_seed": seed,
        "random_top1": summary("top1"),
        f"random_top1_prune_keep{keep}": summary(f"top1_prune_keep{keep}"),
        "subnets": rows,
    }
    if held_c is not None:
        record["random_top1_holdout"] = summary("top1_holdout")
        record["leak_check"] = leak_check(rows, held_c, len(dataset), validation_images)
    if return_correct:
        record["_correct"] = test_c
    return record


def leak_check(rows: list[dict], held_c: dict[str, torch.Tensor], n_test: int, validation_images: int) -> dict:
    """Hold-out vs test Top-1 of the largest, the smallest and the median random
    sub-network, with the binomial standard error of each gap; and the Top-1 of the
    hold-out's validation part (its first ``validation_images``) and rollout part (the rest)."""
    levels = sorted((r for r in rows if r["name"].startswith("level_")), key=lambda r: int(r["name"].split("_")[1]))
    picks = {"largest": levels[-1], "smallest": levels[0]}
    randoms = sorted((r for r in rows if r["name"].startswith("random_")), key=lambda r: r["top1"])
    if randoms:
        picks["random_median"] = randoms[(len(randoms) - 1) // 2]
    n_held = len(next(iter(held_c.values())))
    out: dict = {"n_test": n_test, "n_holdout": n_held, "validation_images": min(validation_images, n_held),
                 "target_abs_gap": LEAK_GAP_TARGET, "subnets": {}}
    for key, row in picks.items():
        test, held = row["top1"], row["top1_holdout"]
        c = held_c[row["name"]]
        se = math.hypot(_se_points(test, n_test), _se_points(held, n_held))
        out["subnets"][key] = {
            "name": row["name"], "gflops_share": row["gflops_share"], "top1_test": test, "top1_holdout": held,
            "gap": held - test, "gap_se": se,
            "top1_validation_part": _top1(c[:validation_images]),
            "top1_rollout_part": _top1(c[validation_images:]) if n_held > validation_images else None,
        }
    out["within_target"] = all(abs(out["subnets"][k]["gap"]) <= LEAK_GAP_TARGET for k in ("largest", "smallest"))
    return out


def checkpoint_holdout(header: dict, dataset: str, spec) -> Dataset | None:
    """The train images the checkpoint's pretraining held out (the split it used,
    :func:`prance.data.pretrain_holdout` with the fraction in its header); None when it held
    out nothing."""
    fraction = float(((header.get("info") or {}).get("config") or {}).get("holdout_fraction") or 0.0)
    if not fraction:
        return None
    return pretrain_holdout(build_dataset(dataset, "train", spec), fraction)[1]


def _portable_config(config: dict | None) -> dict | None:
    if not config:
        return config
    out = dict(config)
    for key in ("init_from", "storage", "mlflow_uri"):
        if isinstance(out.get(key), str):
            value = out[key]
            out[key] = ("sqlite:///" + portable_path(value.removeprefix("sqlite:///"))) if value.startswith("sqlite:///") else portable_path(value)
    if isinstance(out.get("dataset"), str) and out["dataset"].startswith("imagefolder:"):
        out["dataset"] = "imagefolder:" + portable_path(out["dataset"][len("imagefolder:"):])
    return out


def measure(model32: MetaViT, model16: MetaViT, test: Dataset, holdout: Dataset | None, tolerance: float,
            n_random: int = 20, on: Devices = IN_PROCESS) -> dict:
    """Everything the record measures. One test pass runs the float32 largest and smallest
    beside the whole space record of the float16 weights; float16 ships when it is within
    ``tolerance`` points of float32 for both, else the space record is redone on float32
    (a second pass). ``on``: where (:class:`Devices`; on GPUs the float16 weights run under
    AMP, the float32 ones exactly). Returns the fields of the record plus ``use_half``."""
    fixed_idx = torch.as_tensor(seeded_subset(test, FIXED_SUBSET["n"], FIXED_SUBSET["seed"]).indices)
    extra = {"fp32/largest": (model32, model32.space.largest(), None),
             "fp32/smallest": (model32, model32.space.smallest(), None)}
    space = space_record(model16, test, n_random=n_random, holdout=holdout, extra=extra, return_correct=True, on=on)
    c = space.pop("_correct")
    last = f"level_{num_levels(model16.space) - 1}"
    ends = {"top1_largest": (last, "fp32/largest"), "top1_smallest": ("level_0", "fp32/smallest")}
    full16 = {k: _top1(c[half]) for k, (half, _) in ends.items()}
    full32 = {k: _top1(c[full]) for k, (_, full) in ends.items()}
    use_half = all(abs(full16[k] - full32[k]) <= tolerance for k in full32)
    pick = 0 if use_half else 1
    fixed = {k: _top1(c[names[pick]][fixed_idx]) for k, names in ends.items()}
    if not use_half:  # float32 ships: its space record, a second pass
        space = space_record(model32, test, n_random=n_random, holdout=holdout, on=on, amp=False)
    return {"use_half": use_half, "test_top1_float32": full32, "test_top1": full16 if use_half else full32,
            "fixed_subset": {**FIXED_SUBSET, **fixed}, "leak_check": space.pop("leak_check", None), "space": space}


def export_run(run_dir: Path, out: Path, command: str, dataset: str, tolerance: float = 0.1,
               mlflow_uri: str | None = None, n_random: int = 20, limit: int | None = None, on: Devices | None = None) -> dict:
    """Export ``run_dir/best.safetensors`` to ``out`` (+ ``out``.json, the record).
    ``mlflow_uri``: the run's tracking store (default: the sqlite file beside ``run_dir``).
    ``limit``: measure on a seeded subset of that many test and hold-out images (a quick
    check; a shipped record uses the whole splits). ``on``: where the sub-networks are
    evaluated (default :meth:`Devices.of_cluster`: one Ray task per GPU of the cluster this
    process has joined, e.g. right after pretraining; else in this process)."""
    from prance import tracking
    from prance.train.launch import RUN_ID_FILE

    model, header = load_checkpoint(run_dir / "best.safetensors")
    spec = input_spec_for_model(model.vit)
    test = build_dataset(dataset, "test", spec)
    holdout = checkpoint_holdout(header, dataset, spec)
    if limit is not None:
        test = seeded_subset(test, limit, 0)
        holdout = seeded_subset(holdout, limit, 0) if holdout is not None else None

    half_path = out.with_suffix(".fp16.tmp.safetensors")
    save_checkpoint(half_path, model, header["model"], header.get("model_kwargs"), header.get("info"), dtype=torch.float16)
    half, _ = load_checkpoint(half_path)
    on = Devices.of_cluster() if on is None else on
    m = measure(model, half, test, holdout, tolerance, n_random=n_random, on=on)
    if m["use_half"]:
        half_path.replace(out)
    else:
        half_path.unlink()
        save_checkpoint(out, model, header["model"], header.get("model_kwargs"), header.get("info"))

    epochs: dict[int, dict] = {}
    wall = None
    uri = mlflow_uri or tracking.default_uri(run_dir.parent)
    run_id_file = run_dir / RUN_ID_FILE
    if run_id_file.is_file():
        client, run_id = tracking.client(uri), run_id_file.read_text().strip()
        info = client.get_run(run_id).info
        if info.end_time and info.start_time:
            wall = (info.end_time - info.start_time) / 1000
        for key in ("loss", "top1_largest", "top1_smallest", "images_per_s", "epoch_seconds"):
            for metric in client.get_metric_history(run_id, key):
                epochs.setdefault(metric.step, {"epoch": metric.step})[key] = metric.value
    info = header.get("info", {})
    record = {
        "command": portable_command(command),
        "model": header["model"],
        "dtype": "float16" if m["use_half"] else "float32",
        "best_epoch": info.get("epoch"),
        "config": _portable_config(info.get("config")),
        "wall_time_s": wall,
        "test_top1_float32": m["test_top1_float32"],
        "test_top1": m["test_top1"],
        "fixed_subset": m["fixed_subset"],
        "space": m["space"],
        "leak_check": m["leak_check"],
        "epochs": [epochs[k] for k in sorted(epochs)],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "evaluated_on": {"ray_tasks": on.shards, "device": "cuda" if on.gpu else "cpu", "amp": on.gpu},
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record

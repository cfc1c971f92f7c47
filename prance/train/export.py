"""Exporting a finished pretraining run as a small, self-describing checkpoint: the best
epoch's weights (float16 when that keeps Top-1 within ``tolerance`` points), and beside it
a JSON record of the command, wall time, per-epoch metrics, the Top-1 of the largest
and smallest sub-networks on the full test set and on a fixed subset (for tests), and
the space record: every uniform width level and random mixed sub-networks, each dense
and with token pruning at keep 0.5."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from prance.checkpoint import load_checkpoint, save_checkpoint
from prance.data import build_dataset, input_spec_for_model, make_loader, seeded_subset
from prance import flops
from prance.evaluate import evaluate
from prance.static_search import level_subnet, num_levels
from prance.tokens.strategies import StrategyConfig, build_plan

FIXED_SUBSET = {"n": 1000, "seed": 0}
RANDOM_SUBNETS_SEED = 20  # the random mixed sub-networks of the space record


def _top1(model, dataset, subnet, plan=None) -> float:
    return evaluate(model, make_loader(dataset, 500), subnet=subnet, plan=plan, progress=False)["top1"]


def subnet_top1(model, dataset) -> dict[str, float]:
    return {
        "top1_largest": _top1(model, dataset, model.space.largest()),
        "top1_smallest": _top1(model, dataset, model.space.smallest()),
    }


def space_record(model, dataset, n_random: int = 20, keep: float = 0.5, seed: int = RANDOM_SUBNETS_SEED) -> dict:
    """Top-1 over ``dataset`` of every uniform width level (level 0 is the smallest, the
    last the largest) and of ``n_random`` seeded random mixed sub-networks, each dense and
    with token pruning at ``keep``; with the median and the worst of the random ones."""
    from tqdm import tqdm

    arch, space = model.arch, model.space
    plan = build_plan(StrategyConfig("prune").with_param(keep), arch)
    full = flops.gflops(arch)
    gen = torch.Generator().manual_seed(seed)
    stages = len(space.stage_starts)
    named = [(f"level_{lv}", level_subnet(space, (lv,) * stages)) for lv in range(num_levels(space))]
    named += [(f"random_{i}", space.sample(gen)) for i in range(n_random)]
    rows = []
    for name, sub in tqdm(named, desc="space record", unit="subnet"):
        rows.append({
            "name": name,
            "gflops_share": flops.gflops(arch, sub) / full,
            "top1": _top1(model, dataset, sub),
            f"top1_prune_keep{keep}": _top1(model, dataset, sub, plan),
            f"gflops_share_prune_keep{keep}": flops.gflops(arch, sub, plan) / full,
            "subnet": sub.to_dict(),
        })
    randoms = [r for r in rows if r["name"].startswith("random_")]

    def summary(key: str) -> dict:
        values = [r[key] for r in randoms]
        return {"median": statistics.median(values), "worst": min(values)} if values else {}

    return {
        "token_reduction": {"strategy": "prune", "keep": keep},
        "n_images": len(dataset),
        "random_seed": seed,
        "random_top1": summary("top1"),
        f"random_top1_prune_keep{keep}": summary(f"top1_prune_keep{keep}"),
        "subnets": rows,
    }


def export_run(run_dir: Path, out: Path, command: str, dataset: str, tolerance: float = 0.1) -> dict:
    from prance import tracking
    from prance.train.launch import RUN_ID_FILE

    model, header = load_checkpoint(run_dir / "best.safetensors")
    test = build_dataset(dataset, "test", input_spec_for_model(model.vit))
    fixed = seeded_subset(test, FIXED_SUBSET["n"], FIXED_SUBSET["seed"])
    full32 = subnet_top1(model, test)

    half_path = out.with_suffix(".fp16.tmp.safetensors")
    save_checkpoint(half_path, model, header["model"], header.get("model_kwargs"), header.get("info"), dtype=torch.float16)
    half, _ = load_checkpoint(half_path)
    full16 = subnet_top1(half, test)
    use_half = all(abs(full16[k] - full32[k]) <= tolerance for k in full32)
    if use_half:
        half_path.replace(out)
        final, shipped = half, full16
    else:
        half_path.unlink()
        save_checkpoint(out, model, header["model"], header.get("model_kwargs"), header.get("info"))
        final, shipped = model, full32

    epochs: dict[int, dict] = {}
    wall = None
    uri = tracking.default_uri(run_dir.parent)
    run_id_file = run_dir / RUN_ID_FILE
    if run_id_file.is_file():
        client, run_id = tracking.client(uri), run_id_file.read_text().strip()
        info = client.get_run(run_id).info
        if info.end_time and info.start_time:
            wall = (info.end_time - info.start_time) / 1000
        for key in ("loss", "top1_largest", "top1_smallest", "images_per_s", "epoch_seconds"):
            for m in client.get_metric_history(run_id, key):
                epochs.setdefault(m.step, {"epoch": m.step})[key] = m.value
    record = {
        "command": command,
        "model": header["model"],
        "dtype": "float16" if use_half else "float32",
        "best_epoch": header.get("info", {}).get("epoch"),
        "config": header.get("info", {}).get("config"),
        "wall_time_s": wall,
        "test_top1_float32": full32,
        "test_top1": shipped,
        "fixed_subset": {**FIXED_SUBSET, **subnet_top1(final, fixed)},
        "space": space_record(final, test),
        "epochs": [epochs[k] for k in sorted(epochs)],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record

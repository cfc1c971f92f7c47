"""Pretraining throughput benchmark (docs/benchmarks.md): weight-sharing overhead and
Ray Train scaling. Run on an otherwise idle machine:

    .venv/bin/python scripts/bench_pretrain.py [--device cuda --amp] [--workers 1,2] [--output PATH]

1. Training images/s (forward + backward + AdamW step, batch 128) of the largest
   sub-network through the meta-network vs the plain timm model it wraps, same batch,
   interleaved rounds, median. Target: ratio >= 0.9.
2. Sandwich-step images/s of real Ray Train runs (default preset's model and step,
   a fixed number of steps) with 1 and 2 workers (``--workers none``: skipped).
Writes docs/results/bench_pretrain_<device>.json (or ``--output``).

    .venv/bin/python scripts/bench_pretrain.py --compare fp32,bf16,compile [--steps 6]

3. Instead of 1 and 2: the sandwich step (largest + smallest, batch 128, forward +
   backward + AdamW) of the default model in float32, under bfloat16 autocast and through
   ``torch.compile``, interleaved after warm-up, median of ``--steps``; the first
   compiled step (compilation) timed apart. Writes
   docs/results/bench_pretrain_precision_<device>.json. Decides what pretraining uses:
   docs/pretraining.md, "Precision and compilation".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prance.train.config import PretrainConfig  # noqa: E402
from prance.device import autocast_for  # noqa: E402
from prance.models import create_meta  # noqa: E402


def weight_sharing_overhead(device: str, amp: bool, batch: int = 128, rounds: int = 7) -> dict:
    meta = create_meta("prance_vit_fmnist").train().to(device)
    vit = meta.vit
    largest = meta.space.largest()
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.AdamW(meta.parameters(), lr=1e-4)
    dev = torch.device(device)

    def step(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast_for(dev, amp):
            loss = F.cross_entropy(fn().float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    runs = {"meta_largest": lambda: meta(x, largest), "timm": lambda: vit(x)}
    for fn in runs.values():
        step(fn)
        step(fn)
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            times[k].append(step(fn))
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "images_per_s": ips, "ratio": ips["meta_largest"] / ips["timm"]}


def compare_variants(variants: list[str], device: str, batch: int = 128, steps: int = 6, warmup: int = 2) -> dict:
    """Sandwich-step images/s per variant (fp32, bf16: CPU/CUDA bfloat16 autocast, fp16:
    CUDA float16 autocast, timed without a GradScaler; compile: torch.compile of the float32 model),
    each variant run ``warmup`` steps then ``steps`` timed ones, in two interleaved rounds."""
    from prance.train.sandwich import sandwich_step

    torch.manual_seed(0)
    meta = create_meta("prance_vit_fmnist").train().to(device)
    dev = torch.device(device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.AdamW(meta.parameters(), lr=1e-4)
    subs = [meta.space.largest(), meta.space.smallest()]
    compiled = torch.compile(meta) if "compile" in variants else None

    def autocast(kind):
        if kind in ("bf16", "fp16"):
            return lambda: torch.autocast(dev.type, dtype=torch.bfloat16 if kind == "bf16" else torch.float16)
        return lambda: autocast_for(dev, False)

    def step(kind) -> float:
        model = compiled if kind == "compile" else meta
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sandwich_step(model, x, y, subs, [None, None], autocast=autocast(kind))
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    out: dict = {"step": f"sandwich (largest + smallest), batch {batch}, forward + backward + AdamW", "variants": {}}
    for _round in range(2):
        for kind in variants:
            first = [step(kind) for _ in range(warmup)]
            times = [step(kind) for _ in range(steps)]
            rec = out["variants"].setdefault(kind, {"images_per_s": [], "first_step_s": []})
            rec["images_per_s"].append(round(batch / statistics.median(times), 1))
            rec["first_step_s"].append(round(first[0], 2))
            print(kind, rec["images_per_s"][-1], "img/s", flush=True)
    return out


def ray_scaling(workers: list[int], use_gpu: bool, amp: bool = True, batch: int = 128, steps: int = 40) -> dict:
    from prance.train.launch import pretrain

    out = {}
    for n in workers:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = PretrainConfig(model="prance_vit_fmnist", epochs=2, steps_per_epoch=steps, batch_size=batch, random_subnets=0,
                                 eval_limit=256, num_workers=n, use_gpu=use_gpu, amp=amp, storage=tmp, name=f"w{n}", keep_checkpoints=1)
            result = pretrain(cfg)
            out[str(n)] = result.metrics["images_per_s"]  # of the best epoch (the 2nd: warm)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts, comma-separated; none: skip the Ray Train runs")
    p.add_argument("--batch-size", type=int, default=128, help="training batch of both measurements")
    p.add_argument("--steps-per-epoch", type=int, default=40, help="steps of each of the Ray Train runs' 2 epochs")
    p.add_argument("--compare", help="only the sandwich-step comparison of these variants: fp32,bf16,fp16,compile")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant and round of --compare")
    p.add_argument("--output", help="the JSON record (default docs/results/bench_pretrain_<device>.json)")
    args = p.parse_args()
    if args.compare:
        variants = args.compare.split(",")
        bad = sorted(set(variants) - {"fp32", "bf16", "fp16", "compile"})
        if bad:
            p.error(f"--compare: unknown variant(s) {bad}: use fp32, bf16, fp16, compile")
        record = {
            "command": "python scripts/bench_pretrain.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": args.device,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
            **compare_variants(variants, args.device, args.batch_size, args.steps),
        }
        out = Path(args.output) if args.output else ROOT / "docs" / "results" / f"bench_pretrain_precision_{args.device.split(':')[0]}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"written {out}")
        return
    record = {
        "command": "python scripts/bench_pretrain.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "amp": args.amp,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "weight_sharing": weight_sharing_overhead(args.device, args.amp, args.batch_size),
    }
    print(json.dumps(record["weight_sharing"]), flush=True)
    if args.workers != "none":
        record["ray_train_images_per_s"] = ray_scaling([int(w) for w in args.workers.split(",")], args.device.startswith("cuda"),
                                                       args.amp, args.batch_size, args.steps_per_epoch)
        print(json.dumps(record["ray_train_images_per_s"]), flush=True)
    out = Path(args.output) if args.output else ROOT / "docs" / "results" / f"bench_pretrain_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()

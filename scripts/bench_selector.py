"""Selector benchmark (docs/benchmarks.md, "PRANCE selector"). On an otherwise idle machine:

    .venv/bin/python scripts/bench_selector.py [--budget 50%] [--iterations 30] [--test-limit 5000]
        [--device cuda --amp] [--output PATH]
    .venv/bin/python scripts/bench_selector.py --iteration-only [--strategies prune] [--device cuda --amp]

For each selector strategy (prune, merge, prune_merge), on the shipped meta-network:
1. trains a budget-conditioned selector at the budget (wall time recorded);
2. Top-1 on held-out test images against the full sub-network, the smallest one and
   every training-free strategy calibrated to the selector's measured GFLOPs;
3. adaptive throughput at batch 64 against the dense full sub-network (interleaved
   rounds, median) and the FLOPs-ideal speedup.
Then one budget-conditioned selector (prune) evaluated at budget x {0.8, 1, 1.2} against
selectors trained for each of those budgets alone (budget_spread 0).
Writes docs/results/bench_selector_cpu.json (or ``--output``).

``--iteration-only``: just the wall time of one PPO iteration per strategy (a rollout of
``--rollout-images`` episodes with their Result-to-Go completions, the full sub-network's
forward on them and the PPO update; see ``iteration_seconds``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prance import flops  # noqa: E402
from prance.budget import calibrate  # noqa: E402
from prance.checkpoint import load_checkpoint  # noqa: E402
from prance.selector.config import SelectorConfig  # noqa: E402
from prance.device import autocast_for, resolve, synchronize  # noqa: E402
from prance.evaluate import evaluate  # noqa: E402
from prance import splits  # noqa: E402
from prance.budget import Budget  # noqa: E402
from prance.selector.train import batches  # noqa: E402
from prance.selector.selector import evaluate_selector  # noqa: E402
from prance.selector.train import train_selector  # noqa: E402
from prance.tokens.strategies import StrategyConfig  # noqa: E402


def throughput(meta, selector, x, budget, rounds=9, amp=False):
    times = {"dense": [], "adaptive": []}
    dev = next(meta.parameters()).device
    x = x.to(dev)

    def dense():
        with autocast_for(dev, amp):
            meta(x)

    with torch.inference_mode():
        for _ in range(2):
            dense()
            selector.run_episode(meta, x, budget, amp=amp)
        for _ in range(rounds):
            synchronize(dev)
            t0 = time.perf_counter()
            dense()
            synchronize(dev)
            times["dense"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ep = selector.run_episode(meta, x, budget, amp=amp)
            synchronize(dev)
            times["adaptive"].append(time.perf_counter() - t0)
    dense, adaptive = statistics.median(times["dense"]), statistics.median(times["adaptive"])
    ideal = flops.count(meta.arch).macs / float(ep.macs.mean())
    return {"batch": x.shape[0], "dense_img_s": x.shape[0] / dense, "adaptive_img_s": x.shape[0] / adaptive,
            "speedup": dense / adaptive, "flops_speedup": ideal, "ratio_to_ideal": (dense / adaptive) / ideal, "schedules": ep.groups}


def iteration_seconds(meta, cfg: SelectorConfig, budget: float, data: dict, extra: int = 2) -> dict:
    """Wall seconds of one PPO iteration of ``cfg`` on the meta-network's device: trainings
    of 1 and of 1 + ``extra`` iterations (same seed, validated once, at their end) differ by
    ``extra`` iterations and nothing else -- the warm-start search, the start's validation
    and the final validation cost both the same -- after one untimed 1-iteration training
    (warm-up)."""

    def train(n: int):
        c = cfg.model_copy(update={"iterations": n, "eval_every": n})
        t0 = time.perf_counter()
        res = train_selector(meta, c, budget, data["train"], data["val"], progress=False)
        return time.perf_counter() - t0, res

    train(1)
    t1, _ = train(1)
    tn, res = train(1 + extra)
    per = (tn - t1) / extra
    return {"strategy": cfg.strategy, "seconds_per_iteration": per, "rollout_images": cfg.rollout_images,
            "rollout_img_s": cfg.rollout_images / per, "warm_start": cfg.warm_start, "timed_iterations": extra,
            "train_1_s": t1, f"train_{1 + extra}_s": tn, "schedules_last_rollout": res.history[-1]["schedules"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", default="50%")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--test-limit", type=int, default=5000)
    p.add_argument("--strategies", default="prune,merge,prune_merge")
    p.add_argument("--no-conditioning", action="store_true")
    p.add_argument("--device", default="cpu", help="where the meta-network runs (the policy and PPO stay on the CPU)")
    p.add_argument("--amp", action="store_true", help="the meta-network's forwards in mixed precision")
    p.add_argument("--iteration-only", action="store_true", help="only the seconds of one PPO iteration per strategy")
    p.add_argument("--rollout-images", type=int, default=256, help="episodes per PPO iteration")
    p.add_argument("--train-limit", type=int, default=4000, help="rollout images")
    p.add_argument("--val-limit", type=int, default=1000, help="validation images")
    p.add_argument("--warm-start", type=float, default=SelectorConfig().warm_start, help="0: PPO from a uniform policy (no static search)")
    p.add_argument("--timed-iterations", type=int, default=4, help="--iteration-only: the iterations the two timed trainings differ by")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: one per core)")
    p.add_argument("--output", help="the JSON record (default docs/results/bench_selector_cpu.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve(args.device)
    base = SelectorConfig(budget=args.budget, iterations=args.iterations, test_limit=None if args.iteration_only else args.test_limit,
                          device=str(dev), amp=args.amp, rollout_images=args.rollout_images,
                          minibatch=min(SelectorConfig().minibatch, args.rollout_images), train_limit=args.train_limit, val_limit=args.val_limit,
                          warm_start=args.warm_start)
    meta, _ = load_checkpoint(base.checkpoint)
    meta.to(dev)
    data = splits.load(meta, splits.SplitSpec.of(base))
    budget = Budget.of(args.budget, meta.arch).gflops
    full = flops.count(meta.arch).gflops
    out = {"command": "python scripts/bench_selector.py " + " ".join(sys.argv[1:]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": str(dev), "amp": args.amp,
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
           "budget_gflops": budget, "full_gflops": full}
    path = Path(args.output) if args.output else ROOT / "docs" / "results" / "bench_selector_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.iteration_only:
        out["iterations"] = []
        for strategy in args.strategies.split(","):
            out["iterations"].append(iteration_seconds(meta, base.model_copy(update={"strategy": strategy}), budget, data, args.timed_iterations))
            print(json.dumps(out["iterations"][-1]), flush=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"written {path}")
        return
    test = data["test"]
    out["test_images"] = test[0].shape[0]
    ref = {}
    for name, sub in (("full", meta.space.largest()), ("smallest", meta.space.smallest())):
        r = evaluate(meta, batches(*test, 500), subnet=sub, device=dev, amp=args.amp, progress=False)
        ref[name] = {"top1": r["top1"], "gflops": r["gflops"]}
    out["reference"] = ref
    print(json.dumps(ref), flush=True)
    rows = []
    for strategy in args.strategies.split(","):
        cfg = base.model_copy(update={"strategy": strategy})
        t0 = time.perf_counter()
        res = train_selector(meta, cfg, budget, data["train"], data["val"], progress=False)
        wall = time.perf_counter() - t0
        m = evaluate_selector(meta, res.selector, batches(*test, 64), budget, progress=False, amp=args.amp)
        free = {}
        for s in ("prune", "merge", "prune_merge", "ppt"):
            try:
                c = calibrate(StrategyConfig(name=s), meta.arch, m["gflops"])
            except Exception as e:  # unreachable at this budget
                free[s] = {"unreachable": str(e)}
                continue
            r = evaluate(meta, batches(*test, 500), plan=c.plan, device=dev, amp=args.amp, progress=False)
            free[s] = {"top1": r["top1"], "gflops": r["gflops"], "params": c.plan.params}
        row = {"strategy": strategy, "train_seconds": wall, "top1": m["top1"], "gflops": m["gflops"],
               "gflops_share": m["gflops"] / full, "token_ratio": m["token_ratio"], "final_token_ratio": m["final_token_ratio"],
               "top1_drop_vs_full": ref["full"]["top1"] - m["top1"], "training_free": free,
               "throughput_b64": throughput(meta, res.selector, test[0][:64], budget, amp=args.amp)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out["selectors"] = rows
    if not args.no_conditioning:
        cond = []
        cfg = base.model_copy(update={"strategy": "prune"})
        shared = train_selector(meta, cfg, budget, data["train"], data["val"], progress=False).selector
        for f in (0.8, 1.0, 1.2):
            b = budget * f
            own = train_selector(meta, cfg.model_copy(update={"budget_spread": 0.0}), b, data["train"], data["val"], progress=False).selector
            m_shared = evaluate_selector(meta, shared, batches(*test, 64), b, progress=False, amp=args.amp)
            m_own = evaluate_selector(meta, own, batches(*test, 64), b, progress=False, amp=args.amp)
            cond.append({"budget_gflops": b, "conditioned": {"top1": m_shared["top1"], "gflops": m_shared["gflops"]},
                         "per_budget": {"top1": m_own["top1"], "gflops": m_own["gflops"]}})
            print(json.dumps(cond[-1]), flush=True)
        out["budget_conditioning"] = cond
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()

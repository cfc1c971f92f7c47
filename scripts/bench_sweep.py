"""Benchmark of the budget sweep: wall time and trials per hour of the default sweep, Tune's
overhead per trial, and what ASHA saves against running every trial to the end.

    python scripts/bench_sweep.py                       # default sweep with ASHA, then the same with FIFO
    python scripts/bench_sweep.py --skip-fifo           # only the first part (about 7 minutes on 2 cores)
    python scripts/bench_sweep.py --preset tiny --set checkpoint=PATH --set 'selector.decision_blocks=[1,2,3]'

Run it on an otherwise idle machine: the numbers are wall-clock times. Writes
docs/results/bench_sweep_cpu.json (the command, the machine, every number) and prints the
table docs/benchmarks.md quotes.

- wall time and trials/hour: the whole `python sweeps/budget_sweep.py` process, from
  start to exit, as a user sees it;
- Tune overhead of a trial, two ways: (a) its wall time on the driver (trial start to
  trial end, the callback's clock) minus the time the trial body spent loading, training
  and evaluating (``body_s``, measured inside the trial), as a share of the trial's wall
  time; (b) stricter, counting the gaps between trials too: the trial slots' capacity
  during ``Tuner.fit`` (fit wall time x concurrent trials, from ``timing.json``) minus the
  trials' body time, spread over the trials;
- ASHA savings: the selector trials' compute (sum of their body time) with ASHA against
  the same sweep with ``scheduler=fifo`` (every trial runs all its iterations), and the
  best score / Top-1 each reached; plus, within the ASHA run, the compute the stopped
  trials would still have needed (their remaining iterations at their own pace).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "sweeps" / "budget_sweep.py"


def slot_overhead(df: pd.DataFrame, timing: dict) -> dict:
    """Everything the trial slots did besides the trials' own work, per trial: Tune's
    scheduling, actor start/reuse, result handling and our MLflow callback included."""
    ran = df[df["status"].isin(["finished", "stopped"]) & df["body_s"].notna()]
    capacity = timing["fit_s"] * timing["slots"]
    idle = max(0.0, capacity - float(ran["body_s"].sum()))
    per_trial = idle / max(1, len(ran))
    return {
        "fit_s": timing["fit_s"], "slots": timing["slots"], "trials": int(len(ran)),
        "slot_seconds": round(capacity, 1), "trial_body_seconds": round(float(ran["body_s"].sum()), 1),
        "overhead_per_trial_s": round(per_trial, 2),
        "overhead_share_of_mean_trial": round(per_trial / (per_trial + float(ran["body_s"].mean())), 4),
        "overhead_share_of_mean_selector_trial": round(
            per_trial / (per_trial + float(ran[ran["method"] == "selector"]["body_s"].mean())), 4) if (ran["method"] == "selector").any() else None,
    }


def run(name: str, storage: Path, extra: list[str]) -> tuple[float, pd.DataFrame, str]:
    cmd = [sys.executable, str(SWEEP), *extra, "--storage", str(storage), "--name", name]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, env={**os.environ, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "local")})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"sweep {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, pd.read_csv(storage / name / "results.csv"), proc.stdout


def overhead(df: pd.DataFrame) -> dict:
    """Tune overhead of the trials that ran to their end, per method."""
    out = {}
    done = df[(df["status"] == "finished") & df["wall_s"].notna() & df["body_s"].notna()]
    for method, g in done.groupby("method"):
        over = (g["wall_s"] - g["body_s"]).clip(lower=0)
        share = over / g["wall_s"]
        out[method] = {
            "trials": int(len(g)),
            "mean_wall_s": round(float(g["wall_s"].mean()), 2),
            "mean_body_s": round(float(g["body_s"].mean()), 2),
            "mean_overhead_s": round(float(over.mean()), 3),
            "mean_overhead_share": round(float(share.mean()), 4),
            "max_overhead_share": round(float(share.max()), 4),
        }
    return out


def selector_compute(df: pd.DataFrame, iterations: int) -> dict:
    sel = df[(df["method"] == "selector") & df["status"].isin(["finished", "stopped"])]
    used = float(sel["body_s"].sum())
    stopped = sel[sel["status"] == "stopped"]
    # a stopped trial's body time covers `iteration` iterations; the rest at the same pace
    remaining = float((stopped["body_s"] / stopped["iteration"] * (iterations - stopped["iteration"])).sum())
    best = sel.loc[sel["score"].idxmax()] if len(sel) else None
    return {
        "selector_trials": int(len(sel)),
        "stopped_by_asha": int(len(stopped)),
        "selector_body_s": round(used, 1),
        "estimated_body_s_without_stopping": round(used + remaining, 1),
        "best_score": None if best is None else round(float(best["score"]), 3),
        "best": None if best is None else f"{best['strategy']}@{best['budget']}: top1 {best['top1']:.2f}%, {best['gflops']:.4g} GFLOPs",
        "best_top1_within_budget_per_combo": {
            f"{s}@{b}": round(float(g[g["within_budget"] == True]["top1"].max()), 2)  # noqa: E712
            for (s, b), g in sel.groupby(["strategy", "budget"]) if (g["within_budget"] == True).any()  # noqa: E712
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--skip-fifo", action="store_true", help="only the ASHA sweep (no savings measurement)")
    p.add_argument("--output", default=str(ROOT / "docs" / "results" / "bench_sweep_cpu.json"))
    args = p.parse_args()
    extra = ["--preset", args.preset] + [a for s in args.set for a in ("--set", s)]

    from prance.config import load_config, parse_overrides
    from prance.sweep.config import SweepConfig

    cfg = load_config(SweepConfig, "sweep", args.preset, parse_overrides(args.set))
    storage = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    record: dict = {
        "command": "python scripts/bench_sweep.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "preset": args.preset,
        "overrides": args.set,
    }
    wall, df, stdout = run("asha", storage, extra)
    trials = df[df["status"].isin(["finished", "stopped"])]
    record["asha"] = {
        "wall_s": round(wall, 1),
        "trials": int(len(trials)),
        "trials_per_hour": round(len(trials) / wall * 3600, 1),
        "tune_overhead_in_trial": overhead(df),
        "tune_overhead_slots": slot_overhead(df, json.loads((storage / "asha" / "timing.json").read_text())[-1]),
        **selector_compute(df, cfg.selector.iterations),
    }
    print(stdout[stdout.find("Best configuration"):], flush=True)
    if not args.skip_fifo:
        wall_f, df_f, _ = run("fifo", storage, extra + ["--set", "scheduler=fifo"])
        record["fifo"] = {"wall_s": round(wall_f, 1), "trials": int(df_f["status"].isin(["finished"]).sum()),
                          **selector_compute(df_f, cfg.selector.iterations)}
        a, f = record["asha"], record["fifo"]
        record["asha_saved"] = {
            "selector_compute_share": round(1 - a["selector_body_s"] / f["selector_body_s"], 3) if f["selector_body_s"] else None,
            "wall_share": round(1 - a["wall_s"] / f["wall_s"], 3),
            "best_score_asha_minus_fifo": None if a["best_score"] is None or f["best_score"] is None else round(a["best_score"] - f["best_score"], 3),
        }
    record["storage"] = str(storage)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

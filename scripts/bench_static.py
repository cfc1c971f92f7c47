"""Selector against the static baseline a user would pick (docs/benchmarks.md, "Selector vs
the best static configuration"). On an otherwise idle machine:

    .venv/bin/python scripts/bench_static.py --checkpoint checkpoints/prance_vit_fmnist.safetensors \
        [--budgets 25% 35% 45%] [--iterations 20]
    .venv/bin/python scripts/bench_static.py --val-limit 2000 --train-limit 4000 \
        --output docs/results/bench_static_supernet_cpu.json   # the default: the supernet

For each budget, on the shipped meta-network and the selector's image split (validation
images for every choice, held-out test images for every reported number):
1. the best static configuration over every width-level combination x every token
   strategy (``prance.static_search``, successive halving on the validation images);
2. a PRANCE selector per selector strategy with the default ``SelectorConfig`` (warm
   start at its best static schedule, best validated policy kept; ``merge_spread`` as the
   default sweep sets it), where it reaches the budget;
3. the full sub-network and the smallest one, for reference.
Writes docs/results/bench_static_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prance import flops, static_search  # noqa: E402
from prance.checkpoint import load_checkpoint  # noqa: E402
from prance.selector.config import SelectorConfig  # noqa: E402
from prance.errors import PranceError  # noqa: E402
from prance.evaluate import evaluate  # noqa: E402
from prance import splits  # noqa: E402
from prance.budget import Budget  # noqa: E402
from prance.selector.pipeline import run_selector  # noqa: E402
from prance.selector.train import batches  # noqa: E402

SELECTORS = ("prune", "merge", "prune_merge")


def main() -> None:
    defaults = SelectorConfig()
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="+", default=["25%", "35%", "45%"])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--merge-spread", choices=["true", "false"], default="true",
                    help="merge / prune_merge selectors merge in every block (the default sweep's setting) or once per stage")
    ap.add_argument("--checkpoint", default=defaults.checkpoint)
    ap.add_argument("--rollouts-from", choices=["auto", "holdout", "train_holdout"], default=defaults.rollouts_from,
                    help="train_holdout: validation and rollouts on the checkpoint's held-out train images, the whole test split "
                         "for numbers; auto (default): train_holdout when the checkpoint held out train images, else holdout")
    ap.add_argument("--val-limit", type=int, default=defaults.val_limit)
    ap.add_argument("--train-limit", type=int, default=defaults.train_limit)
    ap.add_argument("--output", default=str(ROOT / "docs" / "results" / "bench_static_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    base = SelectorConfig(checkpoint=args.checkpoint, rollouts_from=args.rollouts_from, val_limit=args.val_limit,
                          train_limit=args.train_limit, iterations=args.iterations, test_limit=100_000,
                          merge_spread=args.merge_spread == "true")  # test: every image left after val and rollouts
    meta, _ = load_checkpoint(base.checkpoint)
    meta.eval()
    data = splits.load(meta, splits.SplitSpec.of(base))
    dense = flops.gflops(meta.arch)

    def on_test(subnet, plan) -> dict:
        out = evaluate(meta, batches(*data["test"], 256), subnet, plan, progress=False)
        return {"test_top1": out["top1"], "gflops": out["gflops"], "share": out["gflops"] / dense}

    rows = [{"budget": "100%", "method": "full", **on_test(None, None)},
            {"budget": "-", "method": "smallest", **on_test(meta.space.smallest(), None)}]
    for budget in args.budgets:
        g = Budget.of(budget, meta.arch).gflops
        t = time.perf_counter()
        found = static_search.search(meta, g, data["val"])
        rows.append({"budget": budget, "method": "static", "configuration": found.best.describe(), "val_top1": found.top1,
                     "seconds": time.perf_counter() - t, **on_test(found.best.subnet, found.best.plan)})
        print(json.dumps(rows[-1]), flush=True)
        for strategy in SELECTORS:
            cfg = base.model_copy(update={"strategy": strategy, "budget": budget})
            try:
                result = run_selector(cfg, None, None, progress=False)
            except PranceError as e:
                rows.append({"budget": budget, "method": f"selector:{strategy}", "unreachable": str(e)})
                continue
            rows.append({"budget": budget, "method": f"selector:{strategy}", "val_top1": result["top1"],
                         "best_iteration": result.get("iteration", 0), "warm_start": result.get("warm_start", ""),
                         "warm_start_val_top1": result.get("warm_start_top1"),
                         "test_top1": result["test_top1"], "gflops": result["test_gflops"], "share": result["test_gflops"] / dense,
                         "seconds": result["train_seconds"]})
            print(json.dumps(rows[-1]), flush=True)
    record = {
        "command": "python scripts/bench_static.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "checkpoint": base.checkpoint,
        "rollouts_from": splits.SplitSpec.of(base).source(),
        "merge_spread": base.merge_spread,
        "images": {"val": int(data["val"][1].shape[0]), "rollouts": int(data["train"][1].shape[0]), "test": int(data["test"][1].shape[0])},
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{'budget':>6} {'method':<22} {'val%':>6} {'test%':>6} {'GFLOPs':>8} {'share':>6}  configuration")
    for r in rows:
        if "unreachable" in r:
            print(f"{r['budget']:>6} {r['method']:<22} unreachable")
            continue
        val = f"{r['val_top1']:6.2f}" if "val_top1" in r else " " * 6
        print(f"{r['budget']:>6} {r['method']:<22} {val} {r['test_top1']:6.2f} {r['gflops']:8.5f} {r['share']:6.3f}  "
              f"{r.get('configuration') or r.get('warm_start', '')}")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()

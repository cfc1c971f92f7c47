"""How much per-image adaptivity can buy on the supernet, measured with signals simpler than
a PPO policy (docs/benchmarks.md, "Where the per-image headroom goes"):

    .venv/bin/python scripts/experiments/adaptive_headroom.py [--budgets 15% 20% 35%]

Static configurations: the best static configuration (``prance.cascade.ladder``:
``prance.static_search``, all strategies, successive halving on the 2,000 validation
images) at each of a ladder of budgets. Every configuration's logits on the validation images (the supernet's held-out
train images) and the whole test split. Then, per target budget, on the test split:

* ``static``: the best static configuration at the budget;
* ``oracle``: each image gets the cheapest ladder configuration that classifies it right
  (the widest if none does), cheapest-first until the mean GFLOPs reach the budget --
  the issue's headroom, unreachable by any real selector (it looks at the label);
* ``cascade``: run a cheap configuration; when its top softmax probability is below a
  threshold, also run a more expensive one and answer with it (its cost added). The pair
  and threshold are chosen on validation to maximise Top-1 with mean GFLOPs <= budget
  (``prance.cascade.choose`` over this fixed ladder; ``python -m prance search-cascade``
  builds its ladder from multiples of the budget instead).
  A cascade sees the cheap configuration's *output*, more than a selector sees at its
  decision points, so it bounds from above what a confidence-driven selector can reach.

Writes docs/results/adaptive_headroom_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from prance import cascade, flops  # noqa: E402
from prance.checkpoint import load_checkpoint  # noqa: E402
from prance.selector.config import SelectorConfig  # noqa: E402
from prance import splits  # noqa: E402
from prance.budget import Budget  # noqa: E402

LADDER = ["11%", "12%", "15%", "20%", "25%", "35%", "50%"]


def oracle(correct: torch.Tensor, cost: torch.Tensor, budget: float) -> tuple[float, float]:
    """(top1 %, mean cost) when images move cheapest-first to the cheapest right config."""
    n, k = correct.shape
    order = cost.argsort()
    first_right = torch.full((n,), -1)
    for j in reversed(order.tolist()):
        first_right[correct[:, j]] = j
    # start everyone on the cheapest configuration; upgrade the images that need the least
    base = int(order[0])
    need = torch.where(first_right >= 0, cost[first_right.clamp(min=0)] - cost[base], torch.full((n,), float("inf")))
    spent, right = float(cost[base]) * n, correct[:, base].clone()
    for i in need.argsort().tolist():
        extra = float(need[i])
        if extra == float("inf") or spent + extra > budget * n:
            break
        if extra > 0:
            spent += extra
            right[i] = True
    return 100.0 * float(right.float().mean()), spent / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="+", default=["15%", "20%", "35%"])
    ap.add_argument("--checkpoint", default="checkpoints/prance_vit_fmnist_supernet.safetensors")
    ap.add_argument("--output", default=str(ROOT / "docs" / "results" / "adaptive_headroom_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = SelectorConfig(checkpoint=args.checkpoint, rollouts_from="train_holdout", val_limit=2000, train_limit=4000, test_limit=100_000)
    meta, _ = load_checkpoint(cfg.checkpoint)
    meta.eval()
    data = splits.load(meta, splits.SplitSpec.of(cfg))
    dense = flops.gflops(meta.arch)
    # the best static configuration at each share of dense, duplicates dropped, cheapest first
    ladder = cascade.ladder(meta, dense, data["val"], rungs=[Budget.of(b, meta.arch).share for b in LADDER],
                            progress=lambda text: print(text, flush=True))
    full = SimpleNamespace(subnet=None, plan=None, gflops=dense)  # the full sub-network, no token reduction
    ladder.append(full)
    cost = torch.tensor([c.gflops / dense for c in ladder])
    logits = {s: torch.stack([cascade.logits_of(meta, c, data[s][0]) for c in ladder], dim=1) for s in ("val", "test")}  # (N, K, classes)
    y = {s: data[s][1] for s in ("val", "test")}
    correct = {s: logits[s].argmax(-1) == y[s][:, None] for s in ("val", "test")}
    configs = [{"configuration": c.describe() if c is not full else "full", "share": float(cost[i]),
                "val_top1": 100.0 * float(correct["val"][:, i].float().mean()),
                "test_top1": 100.0 * float(correct["test"][:, i].float().mean())} for i, c in enumerate(ladder)]
    rows = []
    for b in args.budgets:
        share = Budget.of(b, meta.arch).share
        fits = [i for i in range(len(ladder)) if cost[i] <= share + 1e-9]
        st = max(fits, key=lambda i: (configs[i]["val_top1"], -cost[i]))
        row = {"budget": b, "static": configs[st]}
        top1, mean = oracle(correct["test"], cost, share)
        row["oracle"] = {"test_top1": top1, "share": mean}
        best = cascade.choose(logits["val"], y["val"], cost.tolist(), share, max_rungs=2)
        if best is not None:
            i, j, t = best.rungs[0], best.rungs[-1], (best.thresholds or (0.0,))[0]
            up = cascade.escalates(logits["test"][:, i], t)  # none when the choice is one rung alone (t = 0)
            pred = torch.where(up, logits["test"][:, j].argmax(-1), logits["test"][:, i].argmax(-1))
            row["cascade"] = {"cheap": configs[i]["configuration"], "expensive": configs[j]["configuration"], "threshold": t,
                              "val_top1": best.top1, "test_top1": 100.0 * float((pred == y["test"]).float().mean()),
                              "share": float(cost[i]) + float(up.float().mean()) * float(cost[j]),
                              "escalated": float(up.float().mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {
        "command": "python scripts/experiments/adaptive_headroom.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "checkpoint": cfg.checkpoint,
        "images": {"val": int(y["val"].shape[0]), "test": int(y["test"].shape[0])},
        "ladder": configs,
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()

"""Mid-network escalation with feature reuse against the best static configuration and the
re-run cascade, at mean budgets (issue 35, part 3):

    .venv/bin/python scripts/experiments/escalation.py [--budgets 15% 20% 35%] \\
        [--cheap "widths=0,0,0,0 merge r=5"] [--checkpoint checkpoints/prance_vit_fmnist_supernet.safetensors]

A cheap static configuration runs to a stage boundary; the head reads the class token
there, and an image whose top-1 probability is below a threshold continues from the same
tokens at a wider uniform width level with no further token reduction; the others finish
the cheap configuration (:mod:`prance.escalation`). Every boundary and every width level
(the widest is the full sub-network) is probed: the cheap prefix runs once, each
continuation from its boundary's tokens. Per image the cost is exact: prefix, the head at
the boundary, and the suffix the image ran.

Per budget, boundary, width level and threshold are chosen on the validation images (the
sweep's: the first ``--val-limit`` train images the supernet's pretraining held out,
:mod:`prance.splits`) by Top-1 with the mean GFLOPs within the budget, no margin held
back; then reported on the test split (the first ``--test-limit`` images, default all
10,000) beside, chosen on the same validation images:

* ``static``: the best static configuration, the sweep's search (mixed widths, each of
  ``--static-strategies`` searched alone, the best by validation Top-1);
* ``cascade``: the sweep's cascade method (:func:`prance.sweep.cascade_trial.search`'s
  settings: its ladder of uniform-width rungs, up to three passes, a budget margin fitted
  on validation halves), each pass from the image again;

with the paired standard error of escalation minus each (same test images). Also the
fixed path the issue quotes: the cheap prefix and the widest suffix after the first
stage, for every image; and every (boundary, width) path for all images, for the table.
``--no-baselines`` skips the static and cascade searches (compare_methods then has them).

Writes docs/results/escalation_cpu.json (``--output``; a run on a subset of the images
belongs in /tmp, not there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from prance import cascade, escalation, flops, splits, static_search  # noqa: E402
from prance.budget import parse_budget, spread  # noqa: E402
from prance.checkpoint import load_checkpoint  # noqa: E402
from prance.errors import PranceError  # noqa: E402
from prance.halving import Halving  # noqa: E402
from prance.paths import check_output_file  # noqa: E402
from prance.sweep.config import CascadeSettings  # noqa: E402

STATIC_STRATEGIES = ["none", "merge", "prune_merge"]  # the default sweep's static methods (static, static_merge, static_prune_merge)


def measured(correct: torch.Tensor, gflops: torch.Tensor, dense: float, budget: float | None = None) -> dict:
    """Top-1 and its SE, per-image GFLOPs (mean, p95, max), shares of dense and of the budget."""
    n = correct.numel()
    p = float(correct.double().mean())
    out = {"test_top1": 100.0 * p, "test_top1_se": 100.0 * math.sqrt(p * (1 - p) / n),
           **{f"test_{k}": v for k, v in spread(gflops.tolist()).items()}}
    out["test_share"] = out["test_gflops"] / dense
    if budget is not None:
        out["mean_over_budget"] = out["test_gflops"] / budget
    return out


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Top-1 of ``a`` minus ``b`` (per-image 0/1 on the same images), points, and its SE."""
    d = a.double() - b.double()
    n = d.numel()
    return {"diff": 100.0 * float(d.mean()), "se": 100.0 * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")}


def static_row(meta, budget: float, val, test, strategies, batch_size: int, uniform_only: bool) -> tuple[dict, torch.Tensor]:
    """The best of the sweep's static rows: each strategy searched alone (none where nothing of it fits the budget)."""
    found = []
    for s in strategies:
        try:
            found.append(static_search.search(meta, budget, val, [s], uniform_only, halving=Halving(), batch_size=batch_size))
        except PranceError:  # e.g. no width alone reaches 15%: the sweep has no such row either
            continue
    if not found:
        raise PranceError(f"no static configuration of {', '.join(strategies)} fits {budget:.4g} GFLOPs")
    best = max(found, key=lambda f: (f.top1, -f.best.gflops))
    correct = cascade.logits_of(meta, best.best, test[0], batch_size).argmax(-1) == test[1]
    n = test[0].shape[0]
    return {"configuration": best.best.describe(), "val_top1": best.top1,
            **measured(correct, torch.full((n,), best.best.gflops, dtype=torch.float64), flops.gflops(meta.arch), budget)}, correct


def cascade_row(meta, budget: float, val, test, batch_size: int) -> tuple[dict, torch.Tensor]:
    s = CascadeSettings()
    ladder = cascade.ladder(meta, budget, val, sorted(set(s.rungs + [1.0])), s.strategies, uniform_only=s.uniform_only,
                            batch_size=batch_size)
    found = cascade.search(meta, budget, val, s.strategies, max_rungs=s.max_rungs, configs=ladder, margin=s.margin,
                           batch_size=batch_size)
    logits, passes = cascade.forward(meta, found.best, test[0], batch_size)
    cost = torch.tensor(found.best.costs(), dtype=torch.float64)[passes - 1]
    correct = logits.argmax(-1) == test[1]
    row = {"configuration": found.best.describe(), "val_top1": found.top1, "val_gflops": found.gflops, "margin": found.margin,
           **measured(correct, cost, flops.gflops(meta.arch), budget), "escalated": float((passes > 1).double().mean())}
    return row, correct


def escalation_row(probes, costs, ys, budget: float, dense: float, paths) -> tuple[dict, torch.Tensor] | tuple[None, None]:
    choice = escalation.choose(probes["val"], costs, ys["val"], budget)
    if choice is None:
        return None, None
    logits, cost, up = escalation.apply(probes["test"], costs, choice.boundary, choice.level, choice.threshold)
    correct = logits.argmax(-1) == ys["test"]
    path = paths[choice.boundary][choice.level]
    t = choice.threshold
    return {"boundary": path.boundary, "level": path.level, "threshold": "always" if t == escalation.ALWAYS else t,
            "val_top1": choice.top1, "val_gflops": choice.gflops, "val_escalated": choice.escalated,
            **measured(correct, cost, dense, budget), "escalated": float(up.double().mean())}, correct


def path_table(probes, costs, ys, paths, dense: float) -> list[dict]:
    """Every (boundary, width) path for all images: what the prefix leaves to be rescued."""
    rows = []
    for b, row in enumerate(paths):
        for k, path in enumerate(row):
            out = {"boundary": path.boundary, "level": path.level, "share": float(costs.always[b, k]) / dense}
            for part in ("val", "test"):
                out[f"{part}_top1"] = 100.0 * float((probes[part].wide[:, b, k].argmax(-1) == ys[part]).double().mean())
            rows.append(out)
    return rows


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/prance_vit_fmnist_supernet.safetensors")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--cheap", default="widths=0,0,0,0 merge r=5", help="the cheap static configuration (as describe() prints it)")
    ap.add_argument("--levels", type=int, nargs="+", help="continuation width levels (default: every level; the widest is the full sub-network)")
    ap.add_argument("--budgets", nargs="+", default=["15%", "20%", "35%"])
    ap.add_argument("--val-limit", type=int, default=3000, help="validation images: the default sweep's 3,000")
    ap.add_argument("--test-limit", type=int, help="only the first N test images (default: all)")
    ap.add_argument("--static-strategies", nargs="+", default=STATIC_STRATEGIES)
    ap.add_argument("--static-uniform-only", action="store_true",
                    help="static search over uniform widths only (12 candidates a strategy, not 256): a quick check, not the sweep's static row")
    ap.add_argument("--no-baselines", action="store_true", help="skip the static and cascade searches")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--output", default=str(ROOT / "docs" / "results" / "escalation_cpu.json"))
    return ap.parse_args(argv)


def load(args):
    meta, _ = load_checkpoint(args.checkpoint)
    meta.eval()
    spec = splits.SplitSpec(args.dataset, args.checkpoint, val_limit=args.val_limit, train_limit=None,
                            test_limit=args.test_limit or 100_000, rollouts_from="train_holdout")
    return meta, splits.load(meta, spec, parts=("val", "test"))


def main(argv=None) -> None:
    args = parse_args(argv)
    check_output_file(args.output, "--output")  # before minutes of work
    torch.set_num_threads(os.cpu_count() or 1)
    say = lambda text: print(f"[escalation] {text}", file=sys.stderr, flush=True)  # noqa: E731
    meta, data = load(args)
    dense = flops.gflops(meta.arch)
    cheap = static_search.parse(args.cheap, meta)
    levels = args.levels if args.levels is not None else list(range(static_search.num_levels(meta.space)))
    paths = [[escalation.continuation(meta, cheap, b, k) for k in levels] for b in escalation.boundaries(meta)]
    costs = escalation.costs(meta, cheap, paths)
    ys = {p: data[p][1] for p in ("val", "test")}
    t0 = time.perf_counter()
    probes = {p: escalation.probe(meta, cheap, paths, data[p][0], args.batch_size) for p in ("val", "test")}
    probe_s = time.perf_counter() - t0
    say(f"probed {len(paths)} boundaries x {len(levels)} widths on {ys['val'].numel()} val + {ys['test'].numel()} test images in {probe_s:.0f} s")
    cheap_correct = probes["test"].cheap.argmax(-1) == ys["test"]
    n_test = ys["test"].numel()
    record = {
        "command": "python scripts/experiments/escalation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "checkpoint": Path(args.checkpoint).name,
        "images": {"val": int(ys["val"].numel()), "test": int(n_test)},
        "dense_gflops": dense,
        "static_search": "uniform widths only" if args.static_uniform_only else "mixed widths (the sweep's)",
        "probe_seconds": probe_s,
        "cheap": {"configuration": cheap.describe(), "share": cheap.gflops / dense,
                  "val_top1": 100.0 * float((probes["val"].cheap.argmax(-1) == ys["val"]).double().mean()),
                  **measured(cheap_correct, torch.full((n_test,), cheap.gflops, dtype=torch.float64), dense)},
        "paths": path_table(probes, costs, ys, paths, dense),
    }
    logits, cost, _ = escalation.apply(probes["test"], costs, 0, len(levels) - 1, escalation.ALWAYS)
    record["fixed_widest_after_stage_1"] = {"boundary": paths[0][-1].boundary, "level": paths[0][-1].level,
                                            **measured(logits.argmax(-1) == ys["test"], cost, dense)}
    record["budgets"] = {}
    for text in args.budgets:
        budget = parse_budget(text, dense)
        rows, correct = {}, {}
        rows["escalation"], correct["escalation"] = escalation_row(probes, costs, ys, budget, dense, paths)
        if not args.no_baselines:
            say(f"{text}: static search")
            rows["static"], correct["static"] = static_row(meta, budget, data["val"], data["test"], args.static_strategies,
                                                        args.batch_size, args.static_uniform_only)
            say(f"{text}: cascade search")
            rows["cascade"], correct["cascade"] = cascade_row(meta, budget, data["val"], data["test"], args.batch_size)
        if correct["escalation"] is not None:
            for other in ("static", "cascade"):
                if other in correct:
                    rows["escalation"][f"vs_{other}"] = paired(correct["escalation"], correct[other])
        record["budgets"][text] = {"budget_gflops": budget, "share": budget / dense, **rows}
        say(f"{text}: " + json.dumps(record["budgets"][text]))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))
    say(f"wrote {args.output}")


def table(record: dict) -> str:
    lines = ["| budget | method | val Top-1 | test Top-1 | test GFLOPs share | mean / budget | escalated | escalation minus it (paired SE) |",
             "|---|---|---|---|---|---|---|---|"]
    for budget, rows in record["budgets"].items():
        esc = rows.get("escalation") or {}
        for method in ("static", "cascade", "escalation"):
            r = rows.get(method)
            if r is None:
                continue
            vs = esc.get(f"vs_{method}")
            vs_text = f"{vs['diff']:+.2f} ± {vs['se']:.2f}" if vs else "-"
            lines.append(f"| {budget} | {method} | {r['val_top1']:.2f} | {r['test_top1']:.2f} ± {r['test_top1_se']:.2f} | "
                         f"{100 * r['test_share']:.1f}% | {r['mean_over_budget']:.3f} | "
                         f"{100 * r.get('escalated', 0.0):.1f}% | {vs_text} |")
    f = record["fixed_widest_after_stage_1"]
    c = record["cheap"]
    lines.append(f"\ncheap `{c['configuration']}`: {c['test_top1']:.2f}% at {100 * c['share']:.1f}%; "
                 f"cheap prefix + widest suffix after block {f['boundary']} for all images: {f['test_top1']:.2f}% at {100 * f['test_share']:.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

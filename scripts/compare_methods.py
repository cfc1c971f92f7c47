"""Every method of a finished sweep against what a user would pick instead, on the sweep's
test images (never used to choose anything):

    .venv/bin/python scripts/compare_methods.py --sweep NAME [--storage runs/sweeps] \\
        [--limit N] [--output docs/results/compare_NAME.json]

For each budget of the sweep, the best row of each method (chosen on the validation
images, as ``prance.sweep.best(storage, name, budget, method)`` picks it) runs on the same
test images, with the dense model beside them. Each row gets:

- Top-1 and its binomial standard error;
- the paired difference to the best static row of the budget (``vs_static``) and its
  standard error (the per-image differences' SE: both ran on the same images, so the
  image-to-image noise cancels);
- GFLOPs per image: mean, p95, max; the mean over the budget (``mean_over_budget``), and
  whether the row meets the budget as a ``mean`` and as a ``cap`` (every image);
- for a cascade or a controller the share of images that ran more than one pass.

Prints a markdown table (stdout) and writes the JSON record. Input mistakes print one
line ``compare_methods: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROG = "compare_methods"


def measure(row, x, y, static_correct=None) -> dict:
    """The row's test numbers on (x, y); ``static_correct`` (per-image 0/1) gives the paired difference."""
    import torch

    from prance.budget import spread

    logits, gflops = row.run(x)
    correct = (logits.argmax(-1) == y).double()
    n = correct.numel()
    p = float(correct.mean())
    out = {"test_top1": 100.0 * p, "test_top1_se": 100.0 * math.sqrt(p * (1 - p) / n), "n_images": n,
           **{f"test_{k}": v for k, v in spread(gflops.tolist()).items()}}
    budget = row.row.get("budget_gflops")
    if budget:
        out["mean_over_budget"] = out["test_gflops"] / float(budget)
        out["meets_mean"] = out["test_gflops"] <= float(budget) * (1 + 1e-9)
        out["meets_cap"] = out["test_gflops_max"] <= float(budget) * (1 + 1e-9)
    first = None  # an adaptive row's cost of an image that runs only its first pass
    if row.cascade is not None:
        first = row.cascade.rungs[0].gflops
    elif getattr(row, "controller", None) is not None:
        first = row.controller.ladder[row.controller.start].gflops + row.controller.decision_gflops
    if first is not None:
        out["escalated"] = float((gflops > first * (1 + 1e-12)).double().mean())
    if static_correct is not None:
        d = correct - static_correct
        out["vs_static"] = 100.0 * float(d.mean())
        out["vs_static_se"] = 100.0 * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return out, correct


def compare(storage: str, name: str, limit: int | None, say) -> dict:
    from prance.errors import PranceError
    from prance.sweep import rows as sweep_rows
    from prance.sweep.methods import METHODS

    df = sweep_rows.read_results(storage, name)
    budgets = list(dict.fromkeys(df.loc[df["method"] != "dense", "budget"].dropna().astype(str)))
    dense_rows = df[(df["method"] == "dense") & df["status"].isin(sweep_rows.DONE)]
    order = [m for m in sorted(METHODS.values(), key=lambda m: m.order) if m.name != "dense"]
    images = None
    out = {"sweep": name, "budgets": {}}
    if len(dense_rows):
        dense = sweep_rows.trial_row(storage, name, int(dense_rows.iloc[0]["trial_number"]))
        images = dense.test_images(limit)
        say(f"dense on {images[0].shape[0]} test images")
        out["dense"] = {"configuration": dense.describe(), "val_top1": dense.top1, **measure(dense, *images)[0]}
    for budget in budgets:
        rows = {}
        for method in order:
            try:
                rows[method.name] = sweep_rows.best(storage, name, budget, method.name)
            except PranceError:  # no finished row of this method within the budget
                continue
        if not rows:
            continue
        if images is None:
            images = next(iter(rows.values())).test_images(limit)
        found = {}
        static_correct = None
        if "static" in rows:
            say(f"{budget} static: {rows['static'].describe()}")
            found["static"], static_correct = measure(rows["static"], *images)
        for method, row in rows.items():
            if method == "static":
                continue
            say(f"{budget} {method}: {row.describe()}")
            found[method] = measure(row, *images, static_correct)[0]
        out["budgets"][budget] = {m: {"trial": rows[m].trial_number, "configuration": rows[m].describe(),
                                      "val_top1": rows[m].top1, "budget_gflops": float(rows[m].row["budget_gflops"]), **found[m]}
                                  for m in rows}
    return out


def table(record: dict) -> str:
    lines = ["| budget | method | val Top-1 | test Top-1 | vs best static | mean GFLOPs / budget | p95 / max GFLOPs | meets | configuration |",
             "|---|---|---|---|---|---|---|---|---|"]
    for budget, rows in record["budgets"].items():
        for method, r in rows.items():
            vs = f"{r['vs_static']:+.2f} ± {r['vs_static_se']:.2f}" if "vs_static" in r else "-"
            meets = "mean+cap" if r.get("meets_cap") else ("mean" if r.get("meets_mean") else "no")
            lines.append(f"| {budget} | {method} | {r['val_top1']:.2f} | {r['test_top1']:.2f} ± {r['test_top1_se']:.2f} | {vs} | "
                         f"{r['mean_over_budget']:.3f} | {r['test_gflops_p95']:.4g} / {r['test_gflops_max']:.4g} | {meets} | "
                         f"`{r['configuration']}` |")
    if "dense" in record:
        d = record["dense"]
        lines.append(f"| 100% | dense | {d['val_top1']:.2f} | {d['test_top1']:.2f} ± {d['test_top1_se']:.2f} | - | - | "
                     f"{d['test_gflops']:.4g} | - | `{d['configuration']}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", required=True, help="the sweep's name (its folder under --storage)")
    p.add_argument("--storage", default=os.environ.get("PRANCE_STORAGE") or "runs/sweeps")
    p.add_argument("--limit", type=int, help="only the first N test images")
    p.add_argument("--output", help="JSON record (default docs/results/compare_<sweep>.json)")
    args = p.parse_args(argv)
    from prance.errors import PranceError
    from prance.paths import check_output_file

    output = Path(args.output or ROOT / "docs" / "results" / f"compare_{args.sweep}.json")
    try:
        if args.limit is not None and args.limit < 1:
            raise PranceError(f"--limit must be at least 1, got {args.limit}")
        check_output_file(output, "--output")
        record = compare(args.storage, args.sweep, args.limit, lambda text: print(f"[compare] {text}", file=sys.stderr, flush=True))
    except PranceError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    record.update(command="python scripts/compare_methods.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

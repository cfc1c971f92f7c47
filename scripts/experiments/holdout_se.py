"""How many hold-out images does validation need? (issue 31; docs/pretraining.md, "Hold-out size")

    python scripts/experiments/holdout_se.py [--checkpoint PATH] [--output PATH]

On the whole hold-out of a checkpoint pretrained with ``holdout_fraction`` (the train
images its pretraining never saw), one pass: the largest, the smallest and 4 seeded random
sub-networks. Reports, per validation size n, the binomial standard error of one Top-1,
the spread measured between disjoint parts of n images, and the standard error of the
*difference* between two sub-networks judged on the same n images (what a search's choice
rests on), from the measured share of images on which they disagree. Writes
docs/results/holdout_se_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prance.checkpoint import load_checkpoint  # noqa: E402
from prance.data import input_spec_for_model  # noqa: E402
from prance.train.export import checkpoint_holdout, correct_per_image  # noqa: E402

SIZES = (1000, 2000, 3000, 4000, 6000)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "prance_vit_fmnist_supernet.safetensors"))
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--output", default=str(ROOT / "docs" / "results" / "holdout_se_cpu.json"))
    args = p.parse_args()
    model, header = load_checkpoint(args.checkpoint)
    held = checkpoint_holdout(header, args.dataset, input_spec_for_model(model.vit))
    if held is None:
        raise SystemExit(f"{args.checkpoint} held out no train images")
    gen = torch.Generator().manual_seed(0)
    subs = {"largest": model.space.largest(), "smallest": model.space.smallest()}
    subs.update({f"random_{i}": model.space.sample(gen) for i in range(4)})
    c = correct_per_image({k: (model, s, None) for k, s in subs.items()}, held, desc="hold-out")
    n_all = len(held)
    out = {"subnets": {k: 100 * float(v.float().mean()) for k, v in c.items()}, "sizes": {}}
    pairs = list(itertools.combinations(subs, 2))
    for n in SIZES:
        if n > n_all:
            continue
        row = {}
        p_hat = float(c["largest"].float().mean())
        row["binomial_se_points"] = 100 * math.sqrt(p_hat * (1 - p_hat) / n)
        parts = n_all // n
        if parts >= 2:  # disjoint consecutive parts, as validation takes the first n
            tops = [[100 * float(c[k][i * n:(i + 1) * n].float().mean()) for i in range(parts)] for k in subs]
            row["spread_between_parts_points"] = statistics.mean(statistics.stdev(t) for t in tops)
            row["parts"] = parts
        # paired: SE of (Top-1 of A - Top-1 of B) on the same n images = sqrt(var(d_i) / n)
        se_diff = []
        for a, b in pairs:
            d = c[a].float() - c[b].float()
            se_diff.append(100 * float(d.std()) / math.sqrt(n))
        row["paired_difference_se_points"] = {"median": statistics.median(se_diff), "max": max(se_diff)}
        out["sizes"][str(n)] = row
    out["disagreement_share"] = {f"{a}|{b}": float((c[a] != c[b]).float().mean()) for a, b in pairs}
    record = {
        "command": "python scripts/experiments/holdout_se.py " + " ".join(sys.argv[1:]),
        "checkpoint": Path(args.checkpoint).name,
        "n_holdout": n_all,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        **out,
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

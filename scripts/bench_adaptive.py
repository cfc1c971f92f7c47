"""Per-image adaptive execution against the dense model (docs/benchmarks.md). On an otherwise
idle machine:

    .venv/bin/python scripts/bench_adaptive.py --model deit_small_patch16_224 --batch-size 64 \\
        [--device cuda --amp] [--budget 50%] [--strategy prune|merge|prune_merge] \\
        [--checkpoint PATH] [--selector PATH] [--batches N] [--json PATH]

The same images run through the dense meta-network (its full sub-network, no token
reduction) and through ``Selector.run_episode`` -- the whole adaptive path: the features, the
policy's forward under the budget mask at every decision, the regrouping and the grouped
sub-batches -- one after the other in interleaved rounds; a warm-up pass over every batch
comes first and is not timed; each batch's time is the median of its rounds, and the
images/s are all images over the sum of those times (data loading and the copy to the
device excluded, as in ``prance eval``).

Policy: with ``--selector`` the trained selector (loaded as ``prance eval --selector``
loads it: on the meta-network it was trained on unless ``--checkpoint`` says otherwise;
greedy, at its training budget unless ``--budget``); otherwise an untrained selector
whose policy *samples* (Gumbel-max with a seeded ``torch.Generator``, one seed per batch,
so every round of a batch runs the same schedules) under the budget mask: diverse
per-image decisions, every image within the budget.

``--model``: a timm name (random initialisation, no download; the meta-network built as
``prance.models.create_meta`` builds it) or ``default``, the shipped
``checkpoints/prance_vit_fmnist.safetensors``. Images: the Fashion-MNIST test split for
the Fashion-MNIST models (``--images auto``), random tensors of the model's input size
otherwise (speed does not depend on them; the JSON says ``"images": "random"``).

Prints one JSON object (``--json PATH`` also writes it): ``speedup`` is adaptive over
dense images/s, ``flops_speedup`` dense GFLOPs over the mean adaptive GFLOPs per image
(the selector's own cost included, as the project counts it), ``ratio`` their quotient,
``schedules_per_batch`` the mean number of distinct per-image schedules in a batch
(``Episode.groups``), ``sub_batches_per_batch`` the stage sub-batches they ran in
(``Episode.sub_batches``). Input mistakes print one line ``bench_adaptive: error: ...`` and
exit with code 2; a progress bar goes to stderr.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROG = "bench_adaptive"
DEFAULT_CHECKPOINT = "checkpoints/prance_vit_fmnist.safetensors"
STRATEGIES = ("prune", "merge", "prune_merge")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line ``bench_adaptive: error: ...``, exit code 2 (before torch loads)."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


def build_parser() -> Parser:
    p = Parser(prog=f"python scripts/{PROG}.py", description="Adaptive per-image execution against the dense model: measured and FLOPs-ideal speedup.")
    p.add_argument("--model", required=True, help="a timm ViT/DeiT name (random init) or 'default' (the shipped checkpoint)")
    p.add_argument("--batch-size", type=_count(1), required=True)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--amp", action="store_true", help="the meta-network's forwards in mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--budget", help="GFLOPs per image (e.g. 2.3) or share of dense (e.g. 50%%); default 50%%, or the selector's own")
    p.add_argument("--strategy", choices=STRATEGIES, help="the token strategy of the random policy (default prune); with --selector, must be its own")
    p.add_argument("--merge-spread", action="store_true", help="random policy: merge in every block of a stage (the default sweep's setting)")
    p.add_argument("--checkpoint", help="a prance .safetensors checkpoint (or a .pt state dict of --model)")
    p.add_argument("--selector", help="a trained selector (.safetensors); default: a seeded random policy")
    p.add_argument("--batches", type=_count(1), default=5, help="timed batches, each of different images (default 5)")
    p.add_argument("--repeats", type=_count(1), default=3, help="timed rounds per batch, median (default 3)")
    p.add_argument("--warmup", type=_count(0), default=1, help="untimed passes over every batch first (default 1)")
    p.add_argument("--images", choices=("auto", "random", "fashion-mnist"), default="auto",
                   help="auto: Fashion-MNIST test images for the Fashion-MNIST models, random tensors otherwise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_count(1), help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also write the JSON object to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--latency-images", type=_count(0), default=20,
                   help="batch-1 latency (median, p95 ms) of dense and adaptive over this many single images (default 20; 0: none)")
    p.add_argument("--profile", type=_count(1), metavar="N",
                   help="after timing, one more adaptive pass over every batch under cProfile: the N functions with the most own time go into the JSON ('profile')")
    return p


def _existing(path: str) -> str:
    """``path`` as given, or relative to the repository root when that is where it is."""
    p = Path(path)
    return str(p if p.exists() or p.is_absolute() else ROOT / p if (ROOT / p).exists() else p)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load(args):
    """(meta-network, its checkpoint or None, selector, selector header or None)."""
    import torch

    from prance.checkpoint import load_checkpoint
    from prance.errors import PranceError
    from prance.models import create_meta
    from prance.selector.selector import Selector
    from prance.selector.store import load_selector, read_selector_header

    header = read_selector_header(_existing(args.selector)) if args.selector else None
    checkpoint = args.checkpoint
    if args.model == "default" and checkpoint is None:
        trained_on = header.get("config", {}).get("checkpoint") if header is not None else None
        checkpoint = trained_on or DEFAULT_CHECKPOINT  # a selector's own meta-network, as `prance eval --selector` takes it
    if checkpoint is not None:
        checkpoint = _existing(checkpoint)
        meta, _ = load_checkpoint(checkpoint, None if args.model == "default" else args.model)
    else:
        torch.manual_seed(args.seed)
        meta = create_meta(args.model)
    if header is not None:
        if args.merge_spread:
            raise PranceError("--merge-spread sets the random policy's action space; a trained selector has its own")
        selector, header = load_selector(_existing(args.selector), meta)
        if args.strategy is not None and args.strategy != selector.actions.strategy:
            raise PranceError(f"--strategy {args.strategy} but selector {args.selector} decides {selector.actions.strategy!r}")
    else:
        blocks = list(meta.space.stage_starts[1:])  # the meta-network's stages (3, 6, 9 of 12 blocks)
        selector = Selector.create(meta, args.strategy or "prune", blocks, seed=args.seed, merge_spread=args.merge_spread)
    return meta.eval(), checkpoint, selector, header


def images_for(args, meta, n: int):
    """``n`` images shaped for ``meta`` and what they are ("fashion-mnist" or "random")."""
    import torch

    from prance.data import build_dataset, input_spec_for_model
    from prance.errors import PranceError

    spec = input_spec_for_model(meta.vit)
    kind = args.images
    if kind == "auto":
        arch = str(meta.vit.pretrained_cfg.get("architecture", ""))
        kind = "fashion-mnist" if args.model == "default" or arch.startswith("prance_vit_fmnist") else "random"
    gen = torch.Generator().manual_seed(args.seed)
    if kind == "random":
        return torch.randn(n, spec.in_chans, *spec.img_size, generator=gen), kind
    ds = build_dataset("fashion-mnist", "test", spec)
    if len(ds) < n:
        raise PranceError(f"--batch-size x --batches = {n} images, but the Fashion-MNIST test split has {len(ds)}")
    x, _ = ds.batch(torch.randperm(len(ds), generator=gen)[:n])
    return x, kind


def measure(meta, selector, batches, budget_gflops: float, greedy: bool, seed: int, dev, amp: bool, warmup: int, repeats: int,
            progress: bool) -> dict:
    """Per batch: the median seconds of the dense forward and of ``Selector.run_episode`` over
    ``repeats`` interleaved rounds (after ``warmup`` untimed passes over every batch), and
    the episode (every round of a batch runs the same schedules)."""
    import torch
    from tqdm import tqdm

    from prance.device import autocast_for, synchronize

    def dense(x) -> float:
        synchronize(dev)
        t0 = time.perf_counter()
        with autocast_for(dev, amp):
            meta(x)
        synchronize(dev)
        return time.perf_counter() - t0

    def adaptive(x, i: int):
        gen = None if greedy else torch.Generator().manual_seed((seed << 20) + i)
        synchronize(dev)
        t0 = time.perf_counter()
        ep = selector.run_episode(meta, x, budget_gflops, greedy=greedy, generator=gen, amp=amp)
        synchronize(dev)
        return time.perf_counter() - t0, ep

    bar = tqdm(total=(warmup + repeats) * len(batches), desc=PROG, unit="round", disable=not progress, leave=False, file=sys.stderr)
    dense_s, adaptive_s, episodes = [], [], []
    with torch.inference_mode():
        for _ in range(warmup):
            for i, x in enumerate(batches):
                dense(x)
                adaptive(x, i)
                bar.update()
        for i, x in enumerate(batches):
            td, ta = [], []
            ep = None
            for r in range(repeats):
                if r % 2 == 0:  # alternate which one goes first
                    td.append(dense(x))
                    t, ep = adaptive(x, i)
                else:
                    t, ep = adaptive(x, i)
                    td.append(dense(x))
                ta.append(t)
                bar.update()
            dense_s.append(statistics.median(td))
            adaptive_s.append(statistics.median(ta))
            episodes.append(ep)
    bar.close()
    return {"dense_s": dense_s, "adaptive_s": adaptive_s, "episodes": episodes}


def profile_adaptive(meta, selector, batches, budget_gflops: float, greedy: bool, seed: int, dev, amp: bool, top: int) -> list[dict]:
    """The ``top`` functions by own time in one cProfile'd adaptive pass over ``batches``
    (the same schedules as the timed rounds): name, calls, seconds and share of the pass."""
    import cProfile
    import pstats

    import torch

    from prance.device import synchronize

    prof = cProfile.Profile()
    with torch.inference_mode():
        prof.enable()
        for i, x in enumerate(batches):
            gen = None if greedy else torch.Generator().manual_seed((seed << 20) + i)
            selector.run_episode(meta, x, budget_gflops, greedy=greedy, generator=gen, amp=amp)
        synchronize(dev)
        prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    total = sum(v[2] for v in stats.values()) or 1.0
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(f).name}:{line}({name})" if f != "~" else name, "calls": v[1], "seconds": v[2], "share": v[2] / total}
            for (f, line, name), v in rows]


def batch1_latency(meta, selector, x, budget_gflops: float, greedy: bool, args, dev) -> dict:
    """``dense_latency_b1_median_ms``, ``..._p95_ms`` and the same for ``adaptive`` (a
    whole episode per image: the policy decides for that image alone), over the first
    ``--latency-images`` images (prance.evaluate.latency_b1, as ``prance eval`` reports it)."""
    import torch

    from prance.device import autocast_for
    from prance.evaluate import latency_b1

    if args.latency_images == 0:
        return {}

    def dense(b):
        with autocast_for(dev, args.amp):
            return meta(b)

    def adaptive(b):
        gen = None if greedy else torch.Generator().manual_seed(args.seed)
        return selector.run_episode(meta, b, budget_gflops, greedy=greedy, generator=gen, amp=args.amp).logits

    found = latency_b1({"dense": dense, "adaptive": adaptive}, x, args.latency_images, dev)
    return {f"{name}_{k}": v for name, row in found.items() for k, v in row.items() if k != "latency_images"} | {
        "latency_images": found["dense"]["latency_images"]}


def run(args) -> dict:
    import torch

    from prance import flops
    from prance.budget import parse_budget, spread
    from prance.device import resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve(args.device)
    meta, checkpoint, selector, header = load(args)
    dense_gflops = flops.count(meta.arch).gflops
    if args.budget is not None:
        budget, budget_text = parse_budget(args.budget, dense_gflops), args.budget
    elif header is not None and header.get("extra", {}).get("budget_gflops"):
        budget = float(header["extra"]["budget_gflops"])
        budget_text = f"{100 * budget / dense_gflops:.4g}%"
    else:
        budget_text = str(header.get("config", {}).get("budget", "50%")) if header is not None else "50%"
        budget = parse_budget(budget_text, dense_gflops)
    selector.check_budget(budget)
    b, n_batches = args.batch_size, args.batches
    x, kind = images_for(args, meta, b * n_batches)
    meta.to(dev)
    batches = [xb.to(dev) for xb in x.split(b)]
    greedy = header is not None
    m = measure(meta, selector, batches, budget, greedy, args.seed, dev, args.amp, args.warmup, args.repeats, not args.quiet)

    profile = profile_adaptive(meta, selector, batches, budget, greedy, args.seed, dev, args.amp, args.profile) if args.profile else None
    latency = batch1_latency(meta, selector, x, budget, greedy, args, dev)
    eps = m["episodes"]
    macs = torch.cat([ep.macs for ep in eps])
    per_image = spread((macs / 1e9).tolist())
    n = int(macs.numel())
    adaptive_gflops = float(macs.mean()) / 1e9
    dense_img_s = n / sum(m["dense_s"])
    adaptive_img_s = n / sum(m["adaptive_s"])
    speedup = adaptive_img_s / dense_img_s
    flops_speedup = dense_gflops / adaptive_gflops
    groups = [int(ep.groups) for ep in eps]
    distinct = [int(torch.unique(ep.actions.flatten(1), dim=0).shape[0]) for ep in eps]
    arch = str(meta.vit.pretrained_cfg.get("architecture", args.model))
    return {
        "model": args.model,
        "architecture": arch,
        "checkpoint": checkpoint,
        "device": str(dev),
        "amp": bool(args.amp),
        "batch_size": b,
        "batches": n_batches,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "images": kind,
        "n_images": n,
        "strategy": selector.actions.strategy,
        "merge_spread": selector.actions.merge_spread,
        "policy": "selector" if greedy else "random",
        "selector": args.selector,
        "greedy": greedy,
        "seed": args.seed,
        "budget": budget_text,
        "budget_gflops": budget,
        "dense_gflops": dense_gflops,
        "adaptive_gflops": adaptive_gflops,
        "adaptive_gflops_share": adaptive_gflops / dense_gflops,
        "selector_overhead_gflops": selector.overhead_macs / 1e9,
        "max_gflops": float(macs.max()) / 1e9,
        "adaptive_gflops_p95": per_image["gflops_p95"],
        "within_budget": float((macs <= budget * 1e9 * (1 + 1e-9) + 1e-3).double().mean()),
        "token_ratio": float(torch.cat([ep.token_ratio for ep in eps]).mean()),
        "final_token_ratio": float(torch.cat([ep.final_token_ratio for ep in eps]).mean()),
        "dense_img_s": dense_img_s,
        "adaptive_img_s": adaptive_img_s,
        "speedup": speedup,
        "flops_speedup": flops_speedup,
        "ratio": speedup / flops_speedup,
        "schedules_per_batch": sum(groups) / len(groups),
        "sub_batches_per_batch": sum(int(ep.sub_batches) for ep in eps) / len(eps),
        "distinct_schedules_per_batch": sum(distinct) / len(distinct),
        "schedules": groups,
        **latency,
        "dense_s_per_batch": m["dense_s"],
        "adaptive_s_per_batch": m["adaptive_s"],
        "command": f"python scripts/{PROG}.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "platform": platform.platform(),
        **({"profile": profile} if profile is not None else {}),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from prance.errors import PranceError

    try:
        record = run(args)
    except PranceError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    text = json.dumps(record, indent=2)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

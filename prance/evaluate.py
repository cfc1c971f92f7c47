"""Evaluation: Top-1 on a dataset, analytic GFLOPs and token ratios, measured throughput;
and the strategy benchmark (every strategy on the same batch, same budget).

Metric names come from :mod:`prance.tracking`, their one home, and are used by the CLI,
MLflow and results tables alike. ``top1`` is a percentage.
"""

from __future__ import annotations

import statistics
import time
from typing import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from prance import flops, tracking
from prance.budget import calibrate
from prance.device import autocast_for, resolve, synchronize
from prance.errors import PranceError
from prance.models.meta import MetaViT
from prance.models.subnet import SubNet
from prance.tokens.state import TokenPlan
from prance.tokens.strategies import StrategyConfig, build_plan

def plan_for(model: MetaViT, cfg: StrategyConfig, budget_gflops: float | None = None, subnet: SubNet | None = None) -> tuple[StrategyConfig, TokenPlan]:
    """The plan of ``cfg``, calibrated to ``budget_gflops`` when one is given."""
    if budget_gflops is None:
        return cfg, build_plan(cfg, model.arch)
    c = calibrate(cfg, model.arch, budget_gflops, subnet)
    return c.config, c.plan


@torch.inference_mode()
def evaluate(
    model: MetaViT,
    batches: Iterable[tuple[Tensor, Tensor]],
    subnet: SubNet | None = None,
    plan: TokenPlan | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
) -> dict:
    """Top-1 (%), GFLOPs per image, token ratios and images/s of the model's forwards
    (data loading excluded) over ``batches``."""
    device = resolve(device)
    model = model.to(device).eval()
    report = flops.count(model.arch, subnet, plan)
    correct = n = 0
    seconds = 0.0
    for x, y in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False, delay=2):
        x = x.to(device, non_blocking=True)
        synchronize(device)
        t0 = time.perf_counter()
        with autocast_for(device, amp):
            logits = model(x, subnet, plan)
        synchronize(device)
        seconds += time.perf_counter() - t0
        correct += int((logits.argmax(dim=-1).cpu() == y).sum())
        n += len(y)
    if n == 0:
        raise PranceError("no images to evaluate")
    return {
        tracking.TOP1: 100.0 * correct / n,
        tracking.GFLOPS: report.gflops,
        tracking.TOKEN_RATIO: report.token_ratio,
        tracking.FINAL_TOKEN_RATIO: report.final_token_ratio,
        tracking.THROUGHPUT: n / seconds,
        "n_images": n,
    }


LATENCY_IMAGES = 50  # single images timed for the batch-1 latency
LATENCY_WARMUP = 3


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linearly interpolated (as torch.quantile)."""
    return float(torch.quantile(torch.tensor(list(values), dtype=torch.float64), q))


def time_ms(fn, x: Tensor, device: torch.device) -> float:
    """Wall milliseconds of one ``fn(x)``, the device synchronised around it."""
    synchronize(device)
    t0 = time.perf_counter()
    fn(x)
    synchronize(device)
    return 1000.0 * (time.perf_counter() - t0)


@torch.inference_mode()
def latency_b1(fns: dict, images: Tensor, runs: int = LATENCY_IMAGES, device: str | torch.device = "cpu") -> dict[str, dict]:
    """Batch-1 latency of each ``fns[name]`` (images -> logits, whatever it decides per
    image): median and p95 milliseconds over ``runs`` single images (the first ``runs`` of
    ``images``, each image timed under every function in turn so that drifting load hits
    them alike), after a few warm-up images."""
    device = resolve(device)
    if images.shape[0] == 0 or runs < 1:
        raise PranceError("batch-1 latency needs at least one image")
    images = images[:runs].to(device)
    for i in range(min(LATENCY_WARMUP, images.shape[0])):
        for fn in fns.values():
            fn(images[i : i + 1])
    ms: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(images.shape[0]):
        for name, fn in fns.items():
            ms[name].append(time_ms(fn, images[i : i + 1], device))
    return {name: {"latency_b1_median_ms": statistics.median(v), "latency_b1_p95_ms": percentile(v, 0.95),
                   "latency_images": len(v)} for name, v in ms.items()}


@torch.inference_mode()
def bench(
    model: MetaViT,
    images: Tensor,
    strategies: list[str],
    budget_gflops: float | None = None,
    base: StrategyConfig | None = None,
    warmup: int = 2,
    repeats: int = 7,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
    latency_runs: int = LATENCY_IMAGES,
) -> list[dict]:
    """Throughput of every strategy on the same batch (each calibrated to the budget when
    one is given). Rounds are interleaved -- one timed forward of each strategy per round
    -- so that drifting machine load hits all strategies alike; the median is reported.
    ``speedup`` is against the dense model, ``flops_speedup`` the FLOPs-ideal speedup.
    With ``latency_runs`` > 0, each row also has the batch-1 latency (:func:`latency_b1`)
    over that many of the images."""
    device = resolve(device)
    model = model.to(device).eval()
    images = images.to(device)
    base = base or StrategyConfig()
    names = ["none"] + [s for s in strategies if s != "none"]
    plans = {}
    for name in names:
        cfg = StrategyConfig(**{**base.__dict__, "name": name, "r": None, "keep": None}) if name != base.name else base
        plans[name] = plan_for(model, cfg, budget_gflops if name != "none" else None)
    times: dict[str, list[float]] = {name: [] for name in names}

    def run(plan: TokenPlan) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with autocast_for(device, amp):
            model(images, None, plan)
        synchronize(device)
        return time.perf_counter() - t0

    for _ in range(warmup):
        for name in names:
            run(plans[name][1])
    for _ in tqdm(range(repeats), desc="bench", unit="round", disable=not progress, leave=False, delay=2):
        for name in names:
            times[name].append(run(plans[name][1]))

    latency = {}
    if latency_runs > 0:
        def forward(plan):
            def fn(x):
                with autocast_for(device, amp):
                    return model(x, None, plan)
            return fn

        latency = latency_b1({name: forward(plans[name][1]) for name in names}, images, latency_runs, device)
    rows = []
    bsz = images.shape[0]
    dense = flops.count(model.arch)
    dense_ips = bsz / statistics.median(times["none"])
    for name in names:
        if name not in strategies:
            continue
        cfg, plan = plans[name]
        report = flops.count(model.arch, None, plan)
        ips = bsz / statistics.median(times[name])
        rows.append(
            {
                "strategy": name,
                "params": plan.params,
                "gflops": report.gflops,
                "token_ratio": report.token_ratio,
                "final_token_ratio": report.final_token_ratio,
                "throughput_img_s": ips,
                "speedup": ips / dense_ips,
                "flops_speedup": dense.gflops / report.gflops,
                **latency.get(name, {}),
            }
        )
    return rows

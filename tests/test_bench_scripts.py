"""The benchmark scripts end to end, as real processes on this machine: ``scripts/bench_adaptive.py``
on the shipped meta-network (batch 8, 2 batches, real Fashion-MNIST images) and its one-line
input errors; ``scripts/bench_gpu.sh``'s CPU fallback writing every record. One torch
thread, as in tests/test_cli.py (tiny models on few cores wait on thread hand-offs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not installed in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
ADAPTIVE_KEYS = {
    "model", "device", "batch_size", "amp", "strategy", "budget", "speedup", "flops_speedup", "ratio", "schedules_per_batch",
    "adaptive_img_s", "dense_img_s", "adaptive_gflops", "dense_gflops", "date", "torch", "cpu", "gpu", "images",
}


def run(*args: object, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def bench_adaptive(*args: object) -> subprocess.CompletedProcess:
    return run(sys.executable, ROOT / "scripts" / "bench_adaptive.py", *args)


def check_adaptive(record: dict, strategy: str, batch: int, batches: int) -> None:
    assert ADAPTIVE_KEYS <= record.keys(), ADAPTIVE_KEYS - record.keys()
    assert record["device"] == "cpu" and record["gpu"] is None and record["amp"] is False
    assert record["strategy"] == strategy and record["budget"] == "50%" and record["policy"] == "random"
    assert record["batch_size"] == batch and record["n_images"] == batch * batches
    assert record["ratio"] == pytest.approx(record["speedup"] / record["flops_speedup"], rel=1e-9)
    assert record["speedup"] == pytest.approx(record["adaptive_img_s"] / record["dense_img_s"], rel=1e-9)
    assert record["flops_speedup"] == pytest.approx(record["dense_gflops"] / record["adaptive_gflops"], rel=1e-9)
    assert record["flops_speedup"] > 1  # at 50%: every image within the budget, the selector's cost included
    assert record["within_budget"] == 1.0 and record["max_gflops"] <= record["budget_gflops"] * (1 + 1e-9)
    assert record["schedules_per_batch"] >= 1 and len(record["schedules"]) == batches
    assert record["dense_img_s"] > 0 and record["adaptive_img_s"] > 0
    # per-image numbers: the GFLOPs spread and the batch-1 latency of both paths
    assert 0 < record["adaptive_gflops_p95"] <= record["max_gflops"]
    assert record["latency_images"] == min(20, record["n_images"])
    for path in ("dense", "adaptive"):
        assert 0 < record[f"{path}_latency_b1_median_ms"] <= record[f"{path}_latency_b1_p95_ms"]


@needs_fmnist
@pytest.mark.slow
def test_bench_adaptive_on_the_default_model(tmp_path: Path) -> None:
    out = tmp_path / "adaptive.json"
    proc = bench_adaptive("--model", "default", "--batch-size", 8, "--batches", 2, "--repeats", 1, "--strategy", "merge",
                          "--threads", 1, "--profile", 5, "--json", out)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == printed
    check_adaptive(printed, "merge", 8, 2)
    assert printed["images"] == "fashion-mnist" and printed["architecture"] == "prance_vit_fmnist"
    # the random policy samples: the 8 images of a batch do not all run one schedule
    assert printed["distinct_schedules_per_batch"] > 1
    # --profile: the 5 functions with the most own time of one more adaptive pass, most first
    shares = [row["share"] for row in printed["profile"]]
    assert len(shares) == 5 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    assert any("linear" in row["function"] for row in printed["profile"])  # the blocks' matmuls are there


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "default", "--batch-size", "0"], "--batch-size: must be >= 1"),
        pytest.param(["--model", "default", "--batch-size", "2", "--device", "cuda"], "device 'cuda' is not available",
                     marks=[pytest.mark.slow, pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")]),
    ],
    ids=["batch-size", "cuda"],
)
def test_bench_adaptive_bad_input_is_one_line_exit_2(args: list[str], message: str) -> None:
    proc = bench_adaptive(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bench_adaptive: error: ") and message in proc.stderr, proc.stderr


@needs_fmnist
@pytest.mark.slow
def test_bench_gpu_cpu_fallback_writes_every_record(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    proc = run("bash", ROOT / "scripts" / "bench_gpu.sh", out, env={"PYTHON": sys.executable, "BENCH_GPU_FALLBACK": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {"strategies_prance_vit_fmnist_cpu_b8.json", "adaptive_default_prune_cpu_b8.json", "pretrain_cpu.json",
                "selector_iteration_cpu.json", "bench_gpu_cpu.json"}
    assert {p.name for p in out.iterdir()} == expected
    records = {name: json.loads((out / name).read_text()) for name in expected}
    assert all(r["device"] == "cpu" for r in records.values())
    assert sorted(records["bench_gpu_cpu.json"]["files"]) == sorted(expected - {"bench_gpu_cpu.json"})
    check_adaptive(records["adaptive_default_prune_cpu_b8.json"], "prune", 8, 2)
    strategies = [row["strategy"] for row in records["strategies_prance_vit_fmnist_cpu_b8.json"]["rows"]]
    assert strategies == ["none", "prune", "merge", "prune_merge", "ppt"]
    assert records["pretrain_cpu.json"]["weight_sharing"]["images_per_s"]["meta_largest"] > 0
    (it,) = records["selector_iteration_cpu.json"]["iterations"]
    assert it["strategy"] == "prune" and it["rollout_images"] == 16 and it["train_1_s"] > 0

"""End-to-end tests of the ``python -m prance`` commands (flops, eval, bench,
search-static) on real files and real Fashion-MNIST images: through ``prance.cli.main``
in this process, and a few as a real ``python -m prance`` subprocess (each pays ~5 s of
torch/timm imports). Small cases: the 4-block ``prance_vit_micro`` (and
``prance_vit_fmnist`` for FLOPs), 200-image subsets, batch 8 and two timed rounds for bench.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import call_main

from prance import flops
from prance.checkpoint import save_checkpoint
from prance.data import FASHION_MNIST_CLASSES, load_fashion_mnist, seeded_subset
from prance.models import create_meta
from prance.tokens import STRATEGIES

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not installed in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
MICRO = "prance_vit_micro"
FMNIST = "prance_vit_fmnist"
EVAL_KEYS = {"top1", "gflops", "token_ratio", "final_token_ratio", "throughput_img_s", "n_images"}
BENCH_KEYS = {"strategy", "gflops", "throughput_img_s", "speedup", "flops_speedup"}


def prance_subprocess(*args: object, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python -m prance ARGS`` as a real process and capture its output.

    One torch thread: on small CPU machines torch's default of one thread per core makes
    every op of these tiny models wait on thread hand-offs (about 100x slower here), which
    would only slow the tests down; the results do not depend on it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "prance", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def prance(*args: object, timeout: float = 180) -> subprocess.CompletedProcess:
    """``prance.cli.main(ARGS)`` in this process, its exit code and output captured as a
    subprocess would give them: the same entry point without ~5 s of imports per call
    (a few tests below still run the real ``python -m prance``). An uncaught exception
    propagates and fails the test, as a traceback would."""
    from prance.cli import main

    code, out, err = call_main(main, [str(a) for a in args])
    return subprocess.CompletedProcess(["prance", *map(str, args)], code, out, err)


def json_out(proc: subprocess.CompletedProcess):
    """The one JSON value a successful ``--json`` run prints, after checking it succeeded."""
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1, proc.stdout  # one line
    return json.loads(proc.stdout)  # raises on anything but exactly one JSON value


def dense_gflops(model: str) -> float:
    return flops.gflops(create_meta(model).arch)


def rigged_checkpoint(path: Path, cls: int) -> Path:
    """A micro checkpoint whose head ignores the image and always predicts ``cls``: its
    Top-1 on any labelled set is exactly the share of ``cls`` in it."""
    model = create_meta(MICRO)
    with torch.no_grad():
        model.vit.head.weight.zero_()
        model.vit.head.bias.zero_()
        model.vit.head.bias[cls] = 10.0
    return save_checkpoint(path, model, MICRO, info={"rigged_class": cls})


# ------------------------------------------------------------------------------ flops


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_flops_json_per_strategy(strategy: str) -> None:
    out = json_out(prance("flops", "--model", FMNIST, "--strategy", strategy, "--json"))
    assert isinstance(out, dict)
    assert {"gflops", "gflops_reference", "token_ratio", "final_token_ratio"} <= set(out)
    assert out["strategy"] == strategy and out["model"] == FMNIST
    # the analytic count agrees with FlopCounterMode on a real forward
    assert abs(out["gflops"] - out["gflops_reference"]) <= 0.01 * out["gflops_reference"]
    dense = dense_gflops(FMNIST)
    if strategy == "none":
        assert out["gflops"] == pytest.approx(dense, rel=1e-12)
        assert out["token_ratio"] == out["final_token_ratio"] == 1.0
    else:
        assert out["gflops"] < dense
        assert 0 < out["final_token_ratio"] < 1
        assert out["final_token_ratio"] <= out["token_ratio"] < 1


def test_flops_budget_share_of_dense() -> None:
    out = json_out(prance("flops", "--model", FMNIST, "--strategy", "merge", "--budget", "60%", "--json"))
    dense = dense_gflops(FMNIST)
    assert out["gflops"] <= 0.6 * dense
    assert out["gflops"] > 0.3 * dense  # calibrated close to the budget, not to nothing
    assert abs(out["gflops"] - out["gflops_reference"]) <= 0.01 * out["gflops_reference"]
    assert out["params"]["r"] >= 1


# ------------------------------------------------------------------------------- eval


@needs_fmnist
@pytest.mark.slow
def test_eval_fashion_mnist_json() -> None:
    out = json_out(prance_subprocess("eval", "--model", MICRO, "--dataset", "fashion-mnist", "--limit", 200, "--strategy", "merge", "--json"))
    assert EVAL_KEYS <= set(out)
    assert out["n_images"] == 200
    assert 0 <= out["top1"] <= 100
    assert (out["top1"] * 2) == int(out["top1"] * 2)  # a count out of 200 images
    assert out["gflops"] < dense_gflops(MICRO)
    assert 0 < out["final_token_ratio"] <= out["token_ratio"] < 1
    assert out["throughput_img_s"] > 0
    assert out["strategy"] == "merge"


@needs_fmnist
@pytest.mark.slow
def test_eval_from_checkpoint(tmp_path: Path) -> None:
    cls = 3  # Dress
    ckpt = rigged_checkpoint(tmp_path / "rigged.safetensors", cls)
    # no --model: the checkpoint's header names it
    out = json_out(prance("eval", "--checkpoint", ckpt, "--limit", 200, "--strategy", "merge", "--batch-size", 64, "--json"))
    assert out["n_images"] == 200
    # the CLI evaluates the subset seeded_subset draws with the default --seed 0
    _, labels = load_fashion_mnist("test")
    chosen = labels[seeded_subset(labels, 200, 0).indices]
    expected = 100.0 * int((chosen == cls).sum()) / 200
    assert 0 < expected < 100
    assert out["top1"] == pytest.approx(expected)


def _image_folder(root: Path) -> dict[str, dict[str, int]]:
    """Write 24 real Fashion-MNIST test images as PNGs into root/{train,val}/<class>/;
    returns the number of images per split and class."""
    from PIL import Image

    images, labels = load_fashion_mnist("test")
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for i in range(24):
        split = "train" if i % 2 == 0 else "val"
        label = int(labels[i])
        name = f"{label}_{FASHION_MNIST_CLASSES[label].replace('/', '-').replace(' ', '_')}"
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].numpy(), mode="L").save(folder / f"{i:03d}.png")
        counts[split][name] = counts[split].get(name, 0) + 1
    return counts


@needs_fmnist
@pytest.mark.slow
def test_eval_image_folder(tmp_path: Path) -> None:
    counts = _image_folder(tmp_path / "fmnist_png")
    val = counts["val"]
    n_val = sum(val.values())
    assert n_val == 12 and len(val) >= 2
    # ImageFolder numbers the classes in sorted folder order: rig the head to predict the
    # class of the first folder, so Top-1 must be exactly that folder's share of val/
    first = sorted(val)[0]
    ckpt = rigged_checkpoint(tmp_path / "rigged.safetensors", 0)
    out = json_out(
        prance(
            "eval", "--model", MICRO, "--checkpoint", ckpt, "--dataset", f"imagefolder:{tmp_path / 'fmnist_png'}",
            "--strategy", "prune", "--batch-size", 8, "--json",
        )
    )  # fmt: skip
    assert EVAL_KEYS <= set(out)
    assert out["n_images"] == n_val  # the val/ split, not train/
    assert out["top1"] == pytest.approx(100.0 * val[first] / n_val)


# ------------------------------------------------------------------------------ bench


BENCH_ARGS = ("--model", MICRO, "--strategies", "none,prune,merge,prune_merge,ppt", "--budget", "70%",
              "--batch-size", 8, "--repeats", 2, "--warmup", 1)  # fmt: skip


@needs_fmnist
@pytest.mark.slow
def test_bench_json() -> None:
    rows = json_out(prance("bench", *BENCH_ARGS, "--json"))
    assert isinstance(rows, list)
    assert [r["strategy"] for r in rows] == ["none", "prune", "merge", "prune_merge", "ppt"]
    dense = dense_gflops(MICRO)
    for row in rows:
        assert BENCH_KEYS <= set(row), row
        assert row["throughput_img_s"] > 0 and row["speedup"] > 0
        assert row["flops_speedup"] == pytest.approx(dense / row["gflops"])
    none = rows[0]
    assert none["speedup"] == 1 and none["flops_speedup"] == 1
    assert none["gflops"] == pytest.approx(dense)
    for row in rows[1:]:
        assert row["gflops"] <= 0.7 * dense, row
        assert row["flops_speedup"] > 1


@pytest.mark.slow
def test_bench_table() -> None:
    proc = prance("bench", *BENCH_ARGS, "--dataset", "random")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 + 5
    assert "strategy" in lines[0] and "speedup" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["none", "prune", "merge", "prune_merge", "ppt"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(proc.stdout)


# -------------------------------------------------------------------------- bad input


class _WritesMarker:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import builtins

        return (builtins.open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    model = create_meta(MICRO)
    good = save_checkpoint(root / "good.safetensors", model, MICRO)
    (root / "corrupt.safetensors").write_bytes(good.read_bytes()[:1000])  # truncated
    torch.save({"model": model.vit.state_dict(), "payload": _WritesMarker(root / "PWNED")}, root / "evil.pt")
    return root


M = ("--model", MICRO)
BAD_INPUTS = {
    "unknown_model": ("flops", "--model", "no_such_vit"),
    "unknown_strategy_flops": ("flops", *M, "--strategy", "squeeze"),
    "unknown_strategy_bench": ("bench", *M, "--strategies", "none,squeeze", "--dataset", "random"),
    "r_out_of_range": ("flops", *M, "--strategy", "merge", "--r", 999),
    "keep_above_1": ("eval", *M, "--strategy", "prune", "--keep", 1.5, "--limit", 8),
    "keep_0": ("flops", *M, "--strategy", "prune_merge", "--keep", 0),
    "budget_unreachable": ("flops", *M, "--strategy", "merge", "--budget", 0.0001),
    "budget_garbage": ("bench", *M, "--budget", "abc", "--dataset", "random"),
    "missing_dataset_folder": ("eval", *M, "--dataset", "imagefolder:/nonexistent/prance-images"),
    "unknown_dataset": ("eval", *M, "--dataset", "cifar-11"),
    "missing_checkpoint": ("eval", "--checkpoint", "{tmp}/missing.safetensors"),
    "corrupt_checkpoint": ("flops", "--checkpoint", "{tmp}/corrupt.safetensors"),
    "malicious_pickle": ("eval", *M, "--checkpoint", "{tmp}/evil.pt", "--limit", 8),
    "unknown_option": ("flops", *M, "--frobnicate"),
    "batch_size_0": ("eval", *M, "--batch-size", 0),
    "missing_cuda_device": ("bench", *M, "--device", "cuda:7", "--dataset", "random"),
    "selector_missing_cuda_device": ("train-selector", "--device", "cuda:7"),
    "r_given_to_prune": ("flops", *M, "--strategy", "prune", "--r", 2),
}
NO_CUDA_7 = pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")


@pytest.mark.parametrize(
    "case", [pytest.param(k, marks=NO_CUDA_7) if "cuda" in k else k for k in BAD_INPUTS]
)
def test_bad_input_is_one_line_exit_2(case: str, bad_files: Path) -> None:
    args = [str(a).replace("{tmp}", str(bad_files)) for a in BAD_INPUTS[case]]
    proc = (prance_subprocess if case == "malicious_pickle" else prance)(*args)  # one real process: nothing runs on load
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("prance: error: ") and len(lines[0]) > len("prance: error: ") + 10
    if case == "malicious_pickle":
        assert "refusing to load" in lines[0]
        assert not (bad_files / "PWNED").exists()
    if case == "missing_checkpoint":
        assert "not found" in lines[0]


def test_empty_strategy_list_is_an_error(capsys: pytest.CaptureFixture) -> None:
    """``--strategies ,`` used to crash the table printer with a TypeError traceback.
    (In-process, since the argument check comes before any model work.)"""
    from prance.cli import main

    assert main(["bench", "--model", MICRO, "--strategies", ",", "--dataset", "random"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("prance: error: --strategies") and captured.err.count("\n") == 1


# Numeric options out of their domain, refused in-process (each is checked before any image
# is read, so a subprocess per case would only add its ~3 s of imports).
OUT_OF_DOMAIN = {
    "threshold_negative": ("flops", *M, "--strategy", "ppt", "--threshold=-1"),
    "threshold_nan": ("flops", *M, "--strategy", "ppt", "--threshold", "nan"),
    "threshold_inf": ("bench", *M, "--strategies", "ppt", "--threshold", "inf", "--dataset", "random"),
    "keep_nan": ("flops", *M, "--strategy", "prune", "--keep", "nan"),
    "budget_nan": ("flops", *M, "--strategy", "merge", "--budget", "nan"),
    "budget_inf_percent": ("flops", *M, "--strategy", "merge", "--budget", "inf%"),
    "r_negative": ("flops", *M, "--strategy", "merge", "--r=-1"),
    "locs_repeated": ("flops", *M, "--strategy", "prune", "--locs", "1,1"),
    "locs_negative": ("flops", *M, "--strategy", "prune", "--locs=-1"),
    "workers_negative": ("eval", *M, "--workers=-1", "--limit", 8),
    "warmup_negative": ("bench", *M, "--warmup=-1", "--dataset", "random"),
    "repeats_0": ("bench", *M, "--repeats", 0, "--dataset", "random"),
    "reference_batch_0": ("flops", *M, "--reference-batch", 0),
    "limit_0": ("eval", *M, "--limit", 0),
}


@pytest.mark.parametrize("case", OUT_OF_DOMAIN)
def test_numeric_options_out_of_domain_are_refused(case: str, capsys: pytest.CaptureFixture) -> None:
    from prance.cli import main

    assert main([str(a) for a in OUT_OF_DOMAIN[case]]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("prance: error: ") and captured.err.count("\n") == 1, captured.err


# ----------------------------------------------------------------------- search-static


@needs_fmnist
def test_search_static_json(micro_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    """The best static configuration, chosen on validation images, reported on test images."""
    from prance.cli import main

    args = ["search-static", "--checkpoint", str(micro_checkpoint), "--budget", "60%", "--strategies", "none,merge,prune",
            "--val-limit", 120, "--train-limit", 50, "--test-limit", 200, "--json"]
    assert main([str(a) for a in args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gflops"] <= out["budget_gflops"] and out["test_gflops"] == out["gflops"]
    assert out["val_images"] == 120 and out["test_n_images"] == 200
    assert out["configuration"].startswith("widths=") and out["static"]["strategy"] in ("none", "merge", "prune")
    assert out["ranked"][0]["description"] == out["configuration"] and out["ranked"][0]["top1"] == pytest.approx(out["top1"])
    assert out["candidates"] >= len(out["ranked"]) and out["forwards"] > 0


@pytest.mark.parametrize("command", ["search-static", "search-cascade"])
def test_search_defaults_are_the_default_sweeps_split(command: str) -> None:
    """At their defaults, the searches choose on the default sweep's validation images, so
    search-static gives the sweep's static row (its 2,000 images against the sweep's 3,000
    chose another configuration at 20%)."""
    from prance.cli import build_parser, search_split
    from prance.config import load_config
    from prance.splits import SplitSpec
    from prance.sweep.config import SweepConfig

    sweep = load_config(SweepConfig, "sweep", "default")
    trial = SplitSpec.of_settings(sweep.dataset, sweep.checkpoint, sweep.selector.model_dump())
    search = search_split(build_parser().parse_args([command, "--budget", "20%"]), command)
    assert (search.dataset, search.checkpoint, search.val_limit, search.train_limit, search.seed, search.source()) == \
        (trial.dataset, trial.checkpoint, trial.val_limit, trial.train_limit, trial.seed, trial.source())
    given = search_split(build_parser().parse_args([command, "--budget", "20%", "--val-limit", "500"]), command)
    assert given.val_limit == 500 and given.train_limit == trial.train_limit


@pytest.mark.parametrize("extra, message", [
    ([], "--budget is required"),
    (["--budget", "60%", "--eta", 1], "--eta"),
    (["--budget", "60%", "--strategies", "none,squeeze"], "unknown token strategy"),
    (["--budget", "1%"], "no static configuration"),
    (["--budget", "60%", "--val-limit", 0], "--val-limit"),
])
def test_search_static_bad_input(micro_checkpoint: Path, capsys: pytest.CaptureFixture, extra, message) -> None:
    from prance.cli import main

    args = ["search-static", "--checkpoint", str(micro_checkpoint), "--val-limit", 50, "--train-limit", 50, "--test-limit", 50, *extra]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prance: error: ") and err.count("\n") == 1 and message in err, err


# ---------------------------------------------------------------------- search-cascade


@needs_fmnist
def test_search_cascade_json(micro_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    """The best cascade at a mean budget, beside the best static configuration, on test images."""
    from prance.cli import main

    args = ["search-cascade", "--checkpoint", str(micro_checkpoint), "--budget", "50%", "--strategies", "none,merge",
            "--rungs", "0.6,2", "--first-images", 30, "--val-limit", 120, "--train-limit", 50, "--test-limit", 200, "--json"]
    assert main([str(a) for a in args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gflops"] <= out["budget_gflops"] * (1 + 1e-9) and out["top1"] >= out["static_top1"]
    assert out["val_images"] == 120 and out["test_n_images"] == 200 and 0 <= out["test_escalated"] <= 1
    assert out["static_test_gflops"] <= out["budget_gflops"] and out["configuration"] == out["cascade"]["best"]["description"]
    assert len(out["cascade"]["ladder"]) >= 2 and out["test_throughput_img_s"] > 0


@pytest.mark.parametrize("extra, message", [
    ([], "--budget is required"),
    (["--budget", "60%", "--rungs", "a,b"], "--rungs"),
    (["--budget", "60%", "--rungs", "0,1"], "--rungs"),
    (["--budget", "1%"], "no static configuration"),
])
def test_search_cascade_bad_input(micro_checkpoint: Path, capsys: pytest.CaptureFixture, extra, message) -> None:
    from prance.cli import main

    args = ["search-cascade", "--checkpoint", str(micro_checkpoint), "--val-limit", 50, "--train-limit", 50, "--test-limit", 50, *extra]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prance: error: ") and err.count("\n") == 1 and message in err, err

"""The ``deit_s_imagenet`` sweep preset (DeiT-S on an ImageNet-style folder, 8 GPUs): it
loads and validates, its budgets are reachable on DeiT-S, its ``timm:`` alternative fails in
one line offline, and it runs end to end on CPU, offline, as users run it
(``sweeps/budget_sweep.py --preset deit_s_imagenet`` with overrides, a subprocess): on a
small folder of real JPEG files, with a freshly initialised ``deit_tiny_patch16_224``
meta-network, on a local Ray, tracked in MLflow on sqlite."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from prance.config import CONFIG_ROOT, load_config
from prance.sweep.config import SWEEP_STRATEGIES, SweepConfig
from prance.train.config import PretrainConfig

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "sweeps" / "budget_sweep.py"
PRESET = "deit_s_imagenet"
METRICS = ["top1", "gflops", "token_ratio", "final_token_ratio", "throughput_img_s"]
CLASSES = 3


def test_preset_loads_validates_and_names_deit_s_on_an_image_folder():
    cfg = load_config(SweepConfig, "sweep", PRESET)
    assert cfg.dataset == "imagefolder:/data/imagenet"
    assert cfg.budgets == ["50%", "65%", "80%"]
    assert {SWEEP_STRATEGIES[s][0] for s in cfg.strategies} == {"selector", "training_free", "static"}
    assert cfg.use_gpu and 0 < cfg.gpus_per_trial < 1 and cfg.max_concurrent_trials == int(8 / cfg.gpus_per_trial)
    assert cfg.selector.amp and "device" not in cfg.selector.model_fields_set  # the sweep sets the device
    assert cfg.storage.startswith("s3://")
    # the checkpoint is where `sweeps/pretrain.py --preset deit_s_imagenet --storage <folder>`
    # leaves its best epoch, and that preset makes DeiT-S weight-sharing
    pretrain = load_config(PretrainConfig, "pretrain", PRESET)
    assert pretrain.model == "deit_small_patch16_224" and pretrain.dataset == cfg.dataset
    assert Path(cfg.checkpoint).parts[-2:] == (pretrain.name, "best.safetensors")
    assert "deit_small_patch16_224" in (CONFIG_ROOT / "sweep" / f"{PRESET}.yaml").read_text()
    timm = load_config(SweepConfig, "sweep", PRESET, {"checkpoint": "timm:deit_small_patch16_224"})
    assert timm.checkpoint == "timm:deit_small_patch16_224"


def test_every_budget_x_strategy_of_the_preset_is_reachable_on_deit_s():
    """What the sweep's plan decides (prance.sweep.plan), on DeiT-S's architecture: no
    combo of the preset would be left unreachable."""
    from prance import flops
    from prance.models import create_meta
    from prance.budget import parse_budget
    from prance.sweep.methods import METHODS

    cfg = load_config(SweepConfig, "sweep", PRESET)
    meta = create_meta("deit_small_patch16_224")
    dense = flops.gflops(meta.arch)
    for name in cfg.strategies:
        method, token = SWEEP_STRATEGIES[name]
        low = METHODS[method].lowest(meta, token, cfg)
        for budget in cfg.budgets:
            assert low <= parse_budget(budget, dense), (name, budget, low / dense)


def test_timm_checkpoint_offline_is_one_line_exit_2(tmp_path):
    """``checkpoint=timm:NAME`` downloads timm's weights; with no network and an empty
    cache the sweep stops in one line before Ray and MLflow."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "TORCH_HOME": str(tmp_path / "torch")}  # an empty cache: nothing to fall back on
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, str(SWEEP), "--preset", PRESET, "--set", "checkpoint=timm:deit_tiny_patch16_224",
         "--set", "use_gpu=false",  # this machine may have no GPU: that check would come first
         "--storage", str(tmp_path / "runs"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("budget_sweep: error:")]
    assert len(errors) == 1 and "could not download pretrained weights for model 'deit_tiny_patch16_224'" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()

    from prance.checkpoint import load_checkpoint
    from prance.errors import PranceError

    with pytest.raises(PranceError, match="names no model"):
        load_checkpoint("timm:")


# ------------------------------------------------------------------ end to end, on CPU


def write_jpeg_folder(root: Path, train: int = 8, val: int = 8, seed: int = 0) -> Path:
    """``root/{train,val}/class<c>/<i>.jpg``: 224x224 JPEG files, a colour and a stripe
    direction per class, with pixel noise (so no two images are the same)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = [(200, 40, 40), (40, 180, 60), (50, 70, 210)]
    yy, xx = np.mgrid[0:224, 0:224]
    for split, n in (("train", train), ("val", val)):
        for c, colour in enumerate(colours[:CLASSES]):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            stripes = ((xx, yy, xx + yy)[c] // (16 + 8 * c)) % 2
            for i in range(n):
                img = np.array(colour) * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 20, (224, 224, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def tiny_deit_checkpoint(path: Path, folder: Path) -> Path:
    """A freshly initialised ``deit_tiny_patch16_224`` meta-network with a 3-class head,
    the head fitted (ridge least squares) to the random features of the folder's train
    images, so that Top-1 on its val images means something; saved with save_checkpoint."""
    from prance.checkpoint import save_checkpoint
    from prance.data import build_dataset, input_spec_for_model, make_loader
    from prance.models import create_meta

    torch.manual_seed(0)
    meta = create_meta("deit_tiny_patch16_224", num_classes=CLASSES)
    vit = meta.vit
    xs, ys = zip(*make_loader(build_dataset(f"imagefolder:{folder}", "train", input_spec_for_model(vit)), batch_size=32))
    with torch.no_grad():
        feats = vit.forward_head(vit.forward_features(torch.cat(xs)), pre_logits=True)
        a = torch.cat([feats, torch.ones(len(feats), 1)], dim=1)
        target = torch.nn.functional.one_hot(torch.cat(ys), CLASSES).float() * 2 - 1
        w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1]), a.T @ target)
        vit.head.weight.copy_(w[:-1].T)
        vit.head.bias.copy_(w[-1])
    return save_checkpoint(path, meta, "deit_tiny_patch16_224", {"num_classes": CLASSES})


@pytest.mark.slow
def test_preset_runs_end_to_end_on_cpu_on_a_jpeg_folder(tmp_path):
    from mlflow import MlflowClient

    data = write_jpeg_folder(tmp_path / "imagenet")
    checkpoint = tiny_deit_checkpoint(tmp_path / "deit_tiny.safetensors", data)
    strategies = ["merge", "free_merge", "static_merge"]  # a selector, a training-free strategy, a static baseline
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = {
        "checkpoint": checkpoint, "dataset": f"imagefolder:{data}",
        "use_gpu": "false", "cpus_per_trial": 1, "max_concurrent_trials": 2,  # 2 CPU cores, no GPU
        "strategies": f"[{', '.join(strategies)}]", "trials_per_combo": 1,
        # 24 val/ images: 8 validate, 16 are rollouts
        "selector.val_limit": 8, "selector.train_limit": 16, "selector.iterations": 2, "selector.eval_every": 1,
        "selector.rollout_images": 8, "selector.minibatch": 8, "selector.ppo_epochs": 1, "selector.batch_size": 8,
        "selector.static_first_images": 4, "selector.static_images": 16,
        "space.rollout_images": "{choices: [8]}", "space.ppo_epochs": "{low: 1, high: 2}",
        "static.first_images": 4, "static.uniform_only": "true", "grace_period": 1, "startup_trials": 1,
    }
    args = ["--preset", PRESET, *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")],
            "--storage", str(tmp_path / "runs"), "--name", "e2e", "--mlflow-uri", uri]
    proc = subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Best configuration per budget x strategy" in proc.stdout

    df = pd.read_csv(tmp_path / "runs" / "e2e" / "results.csv")
    budgets = ["50%", "65%", "80%"]  # the preset's
    assert len(df) == 1 + len(budgets) * len(strategies)
    assert sorted(zip(df["strategy"], df["budget"].astype(str))) == sorted(
        [("dense", "100%")] + [(s, b) for s in strategies for b in budgets])
    assert set(df["status"]) <= {"finished", "stopped"}, df[["trial_number", "strategy", "status"]]
    assert set(df["method"]) == {"dense", "selector", "training_free", "static"}
    for col in METRICS:
        assert all(math.isfinite(v) for v in df[col]), col
    dense = df[df["method"] == "dense"].iloc[0]
    assert dense["top1"] > 100 / CLASSES + 20  # the fitted head: the folder's labels reach the trials
    compressed = df[df["method"] != "dense"]
    for b in budgets:
        assert compressed[compressed["budget"] == b]["budget_gflops"].to_numpy() == pytest.approx(float(b[:-1]) / 100 * dense["gflops"])
    assert (compressed["gflops"] < dense["gflops"]).all()
    assert (compressed["gflops"] <= compressed["budget_gflops"] * (1 + 1e-6)).all() and compressed["within_budget"].all()
    assert ((compressed["token_ratio"] > 0) & (compressed["token_ratio"] <= 1)).all()

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("prance-sweep-e2e")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trial_runs = [r for r in runs if r.data.tags.get("prance.kind") == "sweep-trial"]
    assert len(trial_runs) == len(df) and all(r.info.status == "FINISHED" for r in runs)
    assert len([r for r in runs if r.data.tags.get("prance.kind") == "sweep-summary"]) == 1
    for r in trial_runs:
        row = df[df["trial_number"] == int(r.data.tags["prance.trial_number"])].iloc[0]
        assert r.info.run_id == row["mlflow_run_id"] and r.data.tags["strategy"] == row["strategy"]
        assert r.data.metrics["top1"] == pytest.approx(row["top1"]) and r.data.metrics["gflops"] == pytest.approx(row["gflops"])
        if r.data.tags["method"] == "selector":
            # the preset's mixed precision, and the device the sweep chose (no GPU here)
            assert r.data.params["amp"] == "True" and r.data.params["device"] == "cpu"
            assert r.data.params["checkpoint"] == str(checkpoint) and r.data.params["dataset"] == f"imagefolder:{data}"

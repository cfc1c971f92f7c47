"""Meta-network pretraining: the sandwich step, the schedule, and real Ray Train runs
(2 CPU workers, DDP over gloo) of the smoke preset with checkpoints, resume and MLflow."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prance.checkpoint import load_checkpoint
from prance.config import PretrainConfig, load_config
from prance.data import FASHION_MNIST_SPEC, fashion_mnist, make_loader, seeded_subset
from prance.errors import PranceError
from prance.evaluate import evaluate
from prance.models import create_meta
from prance.train.optim import adamw, lr_at
from prance.train.sandwich import sample_plan, sandwich, sandwich_step, soft_cross_entropy

ROOT = Path(__file__).resolve().parent.parent


def test_sandwich_step_updates_weights_shared_by_largest_and_smallest():
    torch.manual_seed(0)
    model = create_meta("prance_vit_micro").train()
    space = model.space
    largest, smallest = space.largest(), space.smallest()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    qkv = model.vit.blocks[0].attn.qkv.weight
    before = qkv.detach().clone()

    # gradients of the smallest alone reach only its slice; of the largest, everything
    grads = {}
    for name, subs in {"smallest": [smallest], "largest": [largest]}.items():
        opt.zero_grad()
        sandwich_step(model, x, y, subs, [None])
        grads[name] = qkv.grad.clone()
    h, hd, e = smallest.heads[0], model.arch.head_dim, smallest.embed[0]
    assert grads["smallest"][: h * hd, :e].abs().sum() > 0
    assert grads["smallest"][: h * hd, e:].abs().sum() == 0
    assert grads["largest"][:, e:].abs().sum() > 0

    opt.zero_grad()
    losses = sandwich_step(model, x, y, [largest, smallest], [None, None])
    opt.step()
    assert len(losses) == 2 and all(l > 0 for l in losses)
    shared = (qkv.detach() - before)[: h * hd, :e]
    assert shared.abs().sum() > 0  # the slice both sub-networks use moved
    # and the step combined both: it differs from the largest's gradient alone
    combined = (before - qkv.detach()) / 0.1
    assert not torch.allclose(combined, grads["largest"], atol=1e-7)


def test_sandwich_order_plans_and_distillation_loss():
    model = create_meta("prance_vit_micro")
    g = torch.Generator().manual_seed(0)
    subs = sandwich(model.space, 2, g)
    assert subs[0] == model.space.largest() and subs[1] == model.space.smallest() and len(subs) == 4
    plan = sample_plan(model.arch, ["prune", "merge"], 0.5, g)
    assert plan is not None and plan.name in ("prune", "merge")
    assert sample_plan(model.arch, [], 0.5, g) is None
    t = torch.randn(4, 10)
    # distillation loss is minimised by the teacher's own logits
    assert soft_cross_entropy(t, t) < soft_cross_entropy(torch.zeros(4, 10), t)


def test_lr_schedule_and_weight_decay_groups():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)
    opt = adamw(create_meta("prance_vit_micro"), 1e-3, 0.05)
    decay, no_decay = opt.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(PranceError, match="unknown key 'epoch'"):
        load_config(PretrainConfig, "pretrain", "smoke", {"epoch": 3})
    with pytest.raises(PranceError, match="lr"):
        load_config(PretrainConfig, "pretrain", "smoke", {"lr": -1})
    with pytest.raises(PranceError, match="unknown preset"):
        load_config(PretrainConfig, "pretrain", "nope")
    assert load_config(PretrainConfig, "pretrain", "default").model == "prance_vit_fmnist"


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "sweeps" / "pretrain.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    storage = tmp_path_factory.mktemp("pretrain")
    first = _run("--preset", "smoke", "--storage", str(storage), "--num-workers", "2")
    return storage, first


@pytest.mark.slow
def test_two_worker_smoke_run_gives_a_checkpoint_that_loads_and_evaluates(smoke_run):
    storage, proc = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stdout + proc.stderr  # really two DDP workers
    best = storage / "smoke" / "best.safetensors"
    model, header = load_checkpoint(best)
    assert header["model"] == "prance_vit_micro" and header["info"]["epoch"] in (0, 1)
    ds = seeded_subset(fashion_mnist("test", FASHION_MNIST_SPEC), 64, 0)
    result = evaluate(model, make_loader(ds, 32), progress=False)
    assert result["n_images"] == 64 and 0 <= result["top1"] <= 100
    # MLflow holds the run, FINISHED, with per-epoch metrics and the checkpoint location
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    run_id = (storage / "smoke" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint"] == str(best)
    assert len(client.get_metric_history(run_id, "top1_largest")) == 2


@pytest.mark.slow
def test_resume_continues_from_the_saved_epoch(smoke_run):
    storage, first = smoke_run
    assert first.returncode == 0
    again = _run("--preset", "smoke", "--storage", str(storage))
    assert again.returncode == 2 and "--resume" in again.stderr
    proc = _run("--preset", "smoke", "--storage", str(storage), "--resume", "--epochs", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "epoch 3/3" in out and "epoch 1/3" not in out  # continued, did not start over
    epochs = sorted(json.loads(p.read_text())["epoch"] for p in (storage / "smoke").glob("checkpoint_*/metrics.json"))
    assert epochs[-1] == 2
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    run_id = (storage / "smoke" / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "FINISHED"  # the same run, reopened and closed
    assert len(client.get_metric_history(run_id, "top1_largest")) == 3


@pytest.mark.slow
def test_resume_with_another_architecture_is_refused(smoke_run):
    storage, first = smoke_run
    proc = _run("--preset", "smoke", "--storage", str(storage), "--resume", "--set", "model=prance_vit_fmnist")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("pretrain: error: cannot resume") and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--preset", "nope"], "unknown preset"),
        (["--preset", "smoke", "--set", "model=not_a_model"], "unknown model"),
        (["--preset", "smoke", "--set", "dataset=imagefolder:/nonexistent"], "does not exist"),
        (["--preset", "smoke", "--num-workers", "8"], "the cluster has"),
        (["--preset", "smoke", "--set", "epoch=1"], "unknown key"),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, args, message):
    proc = _run(*args, "--storage", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("pretrain: error:") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*/checkpoint_*"))

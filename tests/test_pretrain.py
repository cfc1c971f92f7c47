"""Meta-network pretraining: the sandwich step, the schedule, and real Ray Train runs
(2 CPU workers, DDP over gloo) of the smoke preset with checkpoints, resume and MLflow."""

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from prance.checkpoint import load_checkpoint
from prance.config import load_config
from prance.train.config import PretrainConfig
from prance.data import FASHION_MNIST_SPEC, fashion_mnist, make_loader, seeded_subset
from prance.errors import PranceError
from prance.evaluate import evaluate
from prance.models import create_meta
from prance.train.optim import adamw, lr_at
from conftest import ray_workers
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


def test_width_fractions_define_the_space_and_bad_ones_are_one_line():
    from prance import flops
    from prance.models.subnet import SubnetSpace

    arch = create_meta("prance_vit_fmnist").arch
    assert SubnetSpace.from_fractions(arch) == SubnetSpace.default(arch)
    w = load_config(PretrainConfig, "pretrain", "supernet").widths
    space = SubnetSpace.from_fractions(arch, w.heads, w.mlp, w.embed)
    assert space.heads == (2, 3, 4) and space.mlp == (96, 192, 288, 384) and space.embed == (48, 64, 80, 96)
    assert space.largest() == create_meta("prance_vit_fmnist").full_subnet
    share = flops.gflops(arch, space.smallest()) / flops.gflops(arch)
    assert share <= 0.26  # low budgets are reachable by widths (issue 11: at most ~25%)
    with pytest.raises(PranceError, match="include 1.0"):
        load_config(PretrainConfig, "pretrain", "smoke", {"widths": {"mlp": [0.25, 0.5]}})
    with pytest.raises(PranceError, match="heads fractions"):
        load_config(PretrainConfig, "pretrain", "smoke", {"widths": {"heads": [0, 1.0]}})


def test_space_record_covers_levels_and_random_subnets(micro_checkpoint):
    from prance.static_search import level_subnet, num_levels
    from prance.train.export import space_record

    model, _ = load_checkpoint(micro_checkpoint)
    ds = seeded_subset(fashion_mnist("test", FASHION_MNIST_SPEC), 64, 0)
    rec = space_record(model, ds, n_random=3)
    rows = {r["name"]: r for r in rec["subnets"]}
    levels = num_levels(model.space)
    assert list(rows) == [f"level_{i}" for i in range(levels)] + ["random_0", "random_1", "random_2"]
    stages = len(model.space.stage_starts)
    assert level_subnet(model.space, (0,) * stages) == model.space.smallest()
    assert rows[f"level_{levels - 1}"]["gflops_share"] == pytest.approx(1.0)
    assert rows["level_0"]["gflops_share"] < 1.0
    for r in rows.values():
        assert r["gflops_share_prune_keep0.5"] < r["gflops_share"]  # pruning really ran
    tops = sorted(rows[f"random_{i}"]["top1"] for i in range(3))
    assert rec["random_top1"] == {"median": tops[1], "worst": tops[0]}
    again = space_record(model, ds, n_random=3)
    assert [r["subnet"] for r in again["subnets"]] == [r["subnet"] for r in rec["subnets"]]  # seeded


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "sweeps" / "pretrain.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke run with two DDP workers, one of them SIGKILLed in the middle of the
    second epoch (after the first epoch's checkpoint): Ray Train restarts the workers from
    that checkpoint (``max_failures``) and the run completes."""
    storage = tmp_path_factory.mktemp("pretrain")
    # more steps per epoch than the preset, so that the second epoch lasts long enough to be cut
    args = [sys.executable, str(ROOT / "sweeps" / "pretrain.py"), "--preset", "smoke", "--storage", str(storage),
            "--num-workers", "2", "--set", "train_limit=8192", "--set", "steps_per_epoch=200"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    killed = None
    from prance.train.launch import checkpoints_in

    while proc.poll() is None and killed is None:  # the first checkpoint reported: epoch 2 has begun
        if checkpoints_in(storage / "smoke") and any("Reporting training result 1" in ln for ln in lines):
            workers = ray_workers(proc.pid, "ray::RayTrainWorker")
            if len(workers) == 2:
                workers[1].kill()
                killed = workers[1].pid
        time.sleep(0.05)
    proc.wait(timeout=600)
    reader.join(timeout=30)
    out = "".join(lines)
    return storage, subprocess.CompletedProcess(args, proc.returncode, out, out), killed


@pytest.mark.slow
def test_two_worker_smoke_run_gives_a_checkpoint_that_loads_and_evaluates(smoke_run):
    storage, proc, killed = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stdout + proc.stderr  # really two DDP workers
    # the killed worker: the run went on from the epoch-1 checkpoint, each epoch trained once
    assert killed is not None
    assert re.search(r"[Rr]estart|[Ff]ailure|died", proc.stdout), proc.stdout[-3000:]  # Ray saw the worker go
    best = storage / "smoke" / "best.safetensors"
    model, header = load_checkpoint(best)
    assert header["model"] == "prance_vit_micro" and header["info"]["epoch"] in (0, 1)
    assert model.space.mlp[0] < create_meta("prance_vit_micro").space.mlp[0]  # the preset's wider space travels
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
    assert sorted(h.step for h in client.get_metric_history(run_id, "top1_largest")) == [0, 1]  # each epoch once


@pytest.mark.slow
def test_resume_continues_from_the_saved_epoch(smoke_run):
    storage, first, _ = smoke_run
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
def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(smoke_run, tmp_path, capsys):
    """A node lost while writing its checkpoint leaves a truncated file: resuming skips it,
    says so, and continues from the newest checkpoint that reads back whole; with none, one
    line (no traceback) and nothing starts."""
    from prance.train.launch import check_inputs, checkpoints_in
    from prance.train.worker import MODEL_FILE, STATE_FILE

    storage, first, _ = smoke_run
    assert first.returncode == 0
    copy = tmp_path / "smoke"
    shutil.copytree(storage / "smoke", copy)
    found = checkpoints_in(copy)
    assert len(found) >= 2
    newest = found[-1] / MODEL_FILE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    cfg = load_config(PretrainConfig, "pretrain", "smoke", {"storage": str(tmp_path)})
    assert check_inputs(cfg, resume=True) == found[-2]
    assert f"skipping unreadable checkpoint {found[-1].name}" in capsys.readouterr().err
    for folder in found:
        (folder / STATE_FILE).write_bytes(b"PK\x03\x04 not a zip any more")
    with pytest.raises(PranceError, match="every checkpoint .* is unreadable"):
        check_inputs(cfg, resume=True)


@pytest.mark.slow
def test_resume_with_another_architecture_is_refused(smoke_run):
    storage, first, _ = smoke_run
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
        (["--preset", "smoke", "--set", "init_from=/nonexistent.safetensors"], "not found"),
        (["--preset", "smoke", "--set", "init_from=timm:prance_vit_fmnist.base"], "is a prance_vit_fmnist"),  # a shipped one, by name
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, args, message):
    proc = _run(*args, "--storage", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("pretrain: error:") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*/checkpoint_*"))


@pytest.mark.slow
def test_init_from_starts_the_run_from_the_given_weights(tmp_path):
    """``init_from`` (OFA-style shrinking): the run starts from the checkpoint's weights,
    not from the seeded initialisation; with a vanishing learning rate they come back."""
    from prance.checkpoint import save_checkpoint

    torch.manual_seed(123)  # not the run's seed: a fresh initialisation would differ
    start = create_meta("prance_vit_micro")
    init = save_checkpoint(tmp_path / "start.safetensors", start, "prance_vit_micro")
    proc = _run("--preset", "smoke", "--storage", str(tmp_path / "runs"), "--num-workers", "1", "--epochs", "1",
                "--set", f"init_from={init}", "--set", "lr=1e-12", "--set", "min_lr=0", "--set", "weight_decay=0",
                "--set", "best_by=top1_sandwich")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained, header = load_checkpoint(tmp_path / "runs" / "smoke" / "best.safetensors")
    assert header["info"]["config"]["init_from"] == str(init)
    assert "top1_sandwich" in header["info"]["metrics"]
    torch.manual_seed(0)
    fresh = create_meta("prance_vit_micro").vit.state_dict()
    got = trained.vit.state_dict()
    for name, value in start.vit.state_dict().items():
        assert torch.allclose(got[name], value, atol=1e-6), name
    assert any(not torch.allclose(got[k], fresh[k]) for k in got)


@pytest.mark.slow
def test_a_resumable_state_in_safetensors_continues_bit_identically(tmp_path):
    """A run cut after its first epoch, its state carried as safetensors only (what a
    session commits to git: ``--export-resume``), continued in a fresh run
    (``--resume-from``): the second epoch's weights and optimizer state equal, bit for
    bit, those of the run that was never interrupted."""
    from prance.checkpoint import load_tensor_state
    from prance.train.launch import checkpoints_in
    from prance.train.worker import MODEL_FILE, load_train_state

    whole = _run("--preset", "smoke", "--num-workers", "1", "--storage", str(tmp_path / "a"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    first, second = checkpoints_in(tmp_path / "a" / "smoke")
    # the session ends after epoch 1: only that checkpoint survives, exported as a resumable state
    shutil.copytree(first, tmp_path / "cut" / "smoke" / first.name)
    state = tmp_path / "git" / "resume"
    cut = _run("--preset", "smoke", "--storage", str(tmp_path / "cut"), "--export-only", "--export-resume", str(state))
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert sorted(p.name for p in state.iterdir()) == ["metrics.json", "model.safetensors", "train_state.safetensors"]
    assert load_tensor_state(state / "train_state.safetensors")["epoch"] == 0
    # the next session: a new run from that state
    again = _run("--preset", "smoke", "--num-workers", "1", "--storage", str(tmp_path / "b"), "--resume-from", str(state))
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "epoch 2/2" in out and "epoch 1/2" not in out  # continued, did not start over
    resumed = checkpoints_in(tmp_path / "b" / "smoke")[-1]
    want, got = load_checkpoint(second / MODEL_FILE)[0].vit.state_dict(), load_checkpoint(resumed / MODEL_FILE)[0].vit.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    s_want, s_got = load_train_state(second), load_train_state(resumed)
    assert s_want["step"] == s_got["step"] and s_want["epoch"] == s_got["epoch"] == 1
    for pid, slots in s_want["optimizer"]["state"].items():
        assert all(torch.equal(v, s_got["optimizer"]["state"][pid][k]) for k, v in slots.items())
    # a state that has nothing left to train, or another architecture, is refused in one line
    done = _run("--preset", "smoke", "--num-workers", "1", "--storage", str(tmp_path / "c"), "--resume-from", str(state), "--epochs", "1")
    assert done.returncode == 2 and "nothing left to train" in done.stderr and "Traceback" not in done.stderr


def test_image_folder_pretraining_feeds_workers_from_persistent_one_thread_loader_processes(tmp_path):
    """Issue 36 part 4, on a generated JPEG folder: ``loader_workers`` (default: the worker's
    CPUs but one) reaches the DataLoader, whose processes persist across epochs, keep 4
    batches ready and run one torch thread each (asked of a real loader process); a GPU
    worker's CPUs are Ray's ``resources_per_worker``."""
    from test_shared_data import jpeg_folder

    from prance.data import one_thread_worker
    from prance.train.launch import _trainer
    from prance.train.worker import _build_worker

    jpeg_folder(tmp_path / "t", per_class=6)
    (tmp_path / "t" / "val").rename(tmp_path / "train")
    jpeg_folder(tmp_path, per_class=4)
    cfg = PretrainConfig(model="prance_vit_micro", dataset=f"imagefolder:{tmp_path}", batch_size=4, augment=False, eval_limit=8)
    model = create_meta(cfg.model)
    for config, processes in (({"cpus": 3}, 2), ({"cpus": 3, "loader_workers": 1}, 1)):
        w = _build_worker(cfg, config, model, None, torch.device("cpu"), 0, 1)
        for loader in (w.loader, w.eval_loader):
            assert loader.num_workers == processes and loader.persistent_workers and loader.prefetch_factor == 4
            assert loader.worker_init_fn is one_thread_worker and not loader.pin_memory  # pinned on CUDA only
    x, y = next(iter(w.loader))
    assert x.shape[0] == 4 and x.dtype == torch.float32

    class Threads(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(1), torch.get_num_threads()

    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # what a loader process would inherit without one_thread_worker
        _, threads = next(iter(make_loader(Threads(), batch_size=2, num_workers=1)))
    finally:
        torch.set_num_threads(torch_threads)
    assert threads.tolist() == [1, 1]
    trainer = _trainer(cfg.model_copy(update={"use_gpu": True, "num_workers": 2, "loader_workers": 5}), "/tmp/unused", 6, {})
    assert trainer.scaling_config.resources_per_worker == {"CPU": 6} and trainer.scaling_config.use_gpu
    assert trainer.train_loop_config["loader_workers"] == 5 and trainer.train_loop_config["cpus"] == 6

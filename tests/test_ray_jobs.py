"""`ray job submit` against a real cluster started with `ray start --head` on loopback
(token authentication on, the conftest ray_cluster fixture): the tiny budget sweep and the
pretraining smoke preset both run to SUCCEEDED and leave their results in --storage."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import sweep_runs, tiny_args


@pytest.mark.slow
def test_budget_sweep_as_a_ray_job(ray_cluster, micro_checkpoint, tmp_path):
    status, out = ray_cluster.submit("python", "sweeps/budget_sweep.py", *tiny_args(micro_checkpoint, "--set", "budgets=[55%]"),
                                     "--storage", str(tmp_path), "--name", "job", submission_id="prance-sweep-test")
    assert status == "SUCCEEDED", out[-4000:]
    assert "Connecting to existing Ray cluster" in out  # the job joined the cluster, it did not start its own Ray
    lines = [line for line in out.splitlines() if line.startswith(("done in", "MLflow UI"))]
    assert len(lines) == 2, out[-3000:]
    df = pd.read_csv(tmp_path / "job" / "results.csv")
    assert set(df["status"]) <= {"finished", "stopped", "unreachable"} and (df["status"] == "finished").sum() >= 4
    _, runs = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "job")
    assert runs and all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_pretrain_smoke_as_a_ray_job(ray_cluster, tmp_path):
    status, out = ray_cluster.submit("python", "sweeps/pretrain.py", "--preset", "smoke", "--storage", str(tmp_path),
                                     submission_id="prance-pretrain-test")
    assert status == "SUCCEEDED", out[-4000:]
    assert (tmp_path / "smoke" / "best.safetensors").is_file()
    assert "world_size=2" in out  # two Ray Train workers on the cluster

"""More than one Ray node (issue 36 part 8): a two-node cluster on this machine, built with
Ray's own multi-node test utility (``ray.cluster_utils.Cluster``), runs the budget sweep and
a pretraining job at once from drivers on the head node. As on the cluster YAMLs' head
(``resources: {CPU: 0}``), the head has no CPU, so every trial, training worker and Ray
task is forced onto the other node. Storage is ``s3://`` on a local S3-compatible server
(moto's server mode) and MLflow is a real ``mlflow server``. The test asserts that the
trials and the training worker ran on the worker node; that results, checkpoints and MLflow
runs are complete in the bucket and the server; that the drivers' folders (working folder
and home) hold nothing a trial wrote and that no file in the bucket names them; and that
the export of the pretraining run fetches its best checkpoint and MLflow run id from the
bucket into a third folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from prance.sweep.rows import FETCHED

from conftest import ROOT, MlflowServer, free_port, sweep_runs, tiny_args

BUCKET = "prance-test"
TRIAL_OUTPUTS = ("selector.safetensors", "model.safetensors", "train_state.safetensors", "result.json", "params.json",
                 "progress.csv", "metrics.json")


def _moto_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3-compatible server (a real HTTP server, `moto_server` from PyPI) on a free
    loopback port: (its process, its endpoint URL)."""
    port = free_port()
    log = open(folder / "moto.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
    return proc, f"http://127.0.0.1:{port}"


def _wait_for(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start")
            time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """The endpoint of moto's server with the test's bucket, named in this process's
    environment (pyarrow and boto3 read AWS_ENDPOINT_URL): set before the Ray nodes start,
    whose workers inherit it, as a cluster's nodes get their credentials from the machine."""
    proc, endpoint = _moto_server(tmp_path)
    try:
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        _wait_for(endpoint, proc, "moto_server")
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        _stop(proc)


@pytest.fixture
def two_nodes(s3, monkeypatch):
    """(a head node without CPUs, a worker node with 2 CPUs) on this machine, in a private
    temp dir. Its address is not written to Ray's machine-wide address file, so that no
    other ``ray.init()`` on this machine joins it."""
    import ray._private.utils
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    temp = tempfile.mkdtemp(prefix="rayn-", dir="/tmp")
    common = {"include_dashboard": False, "object_store_memory": 150 * 1024 * 1024}
    cluster = None
    try:
        for attempt in range(3):  # Ray gives a node 30 s to register (hard-coded): an overloaded machine can miss it
            try:
                cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                                  head_node_args={"num_cpus": 0, "temp_dir": temp, "dashboard_port": free_port(), **common})
                worker = cluster.add_node(num_cpus=2, **common)
                break
            except Exception as e:
                if cluster is not None:
                    cluster.shutdown()
                    cluster = None
                if attempt == 2 or "timed out during startup" not in str(e):
                    raise
        yield cluster, worker
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _placements(cluster) -> dict[str, set[str]]:
    """Actor class name -> the node ids its actors ran on (dead ones included), from the GCS."""
    out: dict[str, set[str]] = {}
    for actor in cluster.global_state.actor_table(None).values():
        out.setdefault(actor["ActorClassName"], set()).add(actor["Address"]["NodeID"])
    return out


def _bucket_files(prefix: str) -> dict[str, int]:
    """path -> size of every file under s3://BUCKET/prefix."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    return {i.path.removeprefix(f"{BUCKET}/"): i.size for i in infos if i.type == pyarrow.fs.FileType.File}


def _bucket_text(path: str) -> str:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}/{path}")
    with fs.open_input_stream(root) as f:
        return f.read().decode(errors="replace")


def _driver(script: str, args: list[str], folder: Path, env: dict) -> subprocess.Popen:
    """A driver started on the head node with its own working folder and home (its output in
    ``folder``/driver.out and driver.err)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "driver.out", "w") as out, open(folder / "driver.err", "w") as err:
        return subprocess.Popen([sys.executable, str(ROOT / "sweeps" / script), *args], cwd=folder,
                                env={**env, "HOME": str(folder)}, stdout=out, stderr=err)


def _finish(proc: subprocess.Popen, folder: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, (folder / "driver.out").read_text(),
                                       (folder / "driver.err").read_text())


@pytest.fixture
def mlflow(tmp_path_factory):
    """A real `mlflow server`, launched before the Ray nodes start and waited for after them
    (each takes tens of seconds on a busy machine)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.launch()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_sweep_and_pretraining_on_two_nodes_with_s3_storage_and_an_mlflow_server(tmp_path, micro_checkpoint, monkeypatch, mlflow,
                                                                                  two_nodes):
    cluster, worker = two_nodes
    mlflow.wait()
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
    token = Path.home() / ".ray" / "auth_token"  # the nodes' token where Ray's token auth is on: the drivers' own HOME lacks it
    if token.exists():
        env.setdefault("RAY_AUTH_TOKEN_PATH", str(token))
    # both drivers at once, as two jobs on one cluster: the training worker takes one of the node's CPUs
    sweep = _driver("budget_sweep.py", tiny_args(micro_checkpoint, "--set", "budgets=[55%]", "--set", "strategies=[prune]",
                                                 "--storage", f"s3://{BUCKET}/sweeps", "--name", "mn", "--mlflow-uri", mlflow.uri),
                    tmp_path / "sweep-driver", env)
    pre = _driver("pretrain.py", ["--preset", "smoke", "--num-workers", "1", "--set", "cpus_per_worker=1", "--storage",
                                  f"s3://{BUCKET}/pretrain", "--name", "mn", "--mlflow-uri", mlflow.uri], tmp_path / "pretrain-driver", env)
    sweep, pre = _finish(sweep, tmp_path / "sweep-driver"), _finish(pre, tmp_path / "pretrain-driver")
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert pre.returncode == 0, pre.stdout[-3000:] + pre.stderr[-3000:]
    placed = _placements(cluster)
    _check_sweep(tmp_path / "sweep-driver", mlflow.uri, placed, worker.node_id)
    _check_pretraining(tmp_path, mlflow.uri, placed, worker.node_id, monkeypatch)
    for folder in ("sweep-driver", "pretrain-driver"):
        _check_nothing_through_the_driver(tmp_path / folder)


def _check_sweep(driver: Path, uri: str, placed: dict, worker_node: str) -> None:
    assert placed.get("ImplicitFunc") == {worker_node}, placed  # every Tune trial on the worker node
    files = _bucket_files("sweeps/mn")
    df = pd.read_csv(driver / "runs" / "sweeps" / "mn" / "results.csv")
    assert "sweeps/mn/results.csv" in files  # the report is copied to the bucket too
    trials = df[df["status"] != "unreachable"]
    assert set(trials["status"]) == {"finished"} and set(trials["method"]) == {"dense", "selector"}, trials
    selectors = trials[trials["method"] == "selector"]
    for path in selectors["selector_path"]:  # each trained selector is a file in the bucket
        assert path.startswith(f"s3://{BUCKET}/sweeps/mn/") and files.get(path.removeprefix("s3://").removeprefix(f"{BUCKET}/"), 0) > 0
    trial_folders = {p.split("/")[2] for p in files if p.count("/") >= 3 and p.endswith("/result.json")}
    assert len(trial_folders) == len(trials)  # every trial's results are in the bucket
    for folder in trial_folders:
        assert _bucket_text(f"sweeps/mn/{folder}/result.json").strip()
    client, runs = sweep_runs(uri, "mn")
    trial_runs = [r for r in runs if r.data.tags.get("prance.kind") == "sweep-trial"]
    assert len(trial_runs) == len(trials) and all(r.info.status == "FINISHED" and "top1" in r.data.metrics for r in trial_runs)
    assert list((driver / "runs" / "sweeps" / "mn" / FETCHED).glob("*selector.safetensors"))  # read from the bucket to log the model
    selector_runs = [r for r in trial_runs if r.data.params.get("method") == "selector"]
    assert selector_runs and all(any(a.path.endswith("selector.safetensors") for a in _artifacts(client, r.info.run_id))
                                 for r in selector_runs)


def _artifacts(client, run_id: str, path: str | None = None) -> list:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a]
    return out


def _check_pretraining(tmp_path: Path, uri: str, placed: dict, worker_node: str, monkeypatch) -> None:
    from mlflow import MlflowClient

    from prance.config import load_config
    from prance.train.config import PretrainConfig
    from prance.train.export import export_run
    from prance.train.launch import run_dir_of

    assert placed.get("RayTrainWorker") == {worker_node}, placed
    files = _bucket_files("pretrain/mn")
    checkpoints = {p.split("/")[2] for p in files if p.count("/") >= 3 and p.split("/")[2].startswith("checkpoint_")}
    assert len(checkpoints) == 2  # keep_checkpoints of the smoke preset, each complete
    for c in checkpoints:
        assert {f"pretrain/mn/{c}/{f}" for f in ("model.safetensors", "train_state.safetensors", "metrics.json")} <= set(files)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("prance-pretrain").experiment_id])
    run = next(r for r in runs if r.info.run_name == "pretrain-mn")
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint"].startswith(f"s3://{BUCKET}/pretrain/mn/checkpoint_")
    assert len(client.get_metric_history(run.info.run_id, "top1_largest")) == 2  # both epochs logged by the worker
    # the export, from a folder of its own: the best checkpoint comes from the bucket
    elsewhere = tmp_path / "export"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(PretrainConfig, "pretrain", "smoke", {"storage": f"s3://{BUCKET}/pretrain", "name": "mn", "mlflow_uri": uri})
    run_dir = run_dir_of(cfg)
    assert run_dir.is_relative_to(elsewhere) and (run_dir / "best.safetensors").is_file()
    record = export_run(run_dir, elsewhere / "m.safetensors", "export", cfg.dataset, mlflow_uri=uri, n_random=1, limit=64)
    assert record["best_epoch"] in (0, 1) and (elsewhere / "m.json").is_file()
    # its MLflow run id was kept beside the checkpoints: the record has both epochs from the server
    assert [e["epoch"] for e in record["epochs"]] == [0, 1] and record["wall_time_s"] > 0


def _check_nothing_through_the_driver(folder: Path) -> None:
    """The driver's folder (its working folder and home) holds no file a trial or worker
    writes, and no file in the bucket names it (trial configs, Tune's and Train's state)."""
    fetched = folder / "runs" / "sweeps" / "mn" / FETCHED  # what the driver read back from the bucket, not a trial's
    written = [p for p in folder.rglob("*") if p.is_file() and p.name not in ("driver.out", "driver.err")
               and not p.is_relative_to(fetched)]
    assert not [p for p in written if p.name in TRIAL_OUTPUTS or "checkpoint_" in str(p)], written
    for path in _bucket_files(""):
        if path.endswith((".json", ".csv", ".txt", ".pkl", ".yaml")):
            assert str(folder) not in _bucket_text(path), path

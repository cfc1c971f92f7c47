import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# A bare ray.init() joins the cluster of the last `ray start` on this machine when there is
# one; tests start their own local Ray instead (the ray_cluster fixture gives a cluster).
os.environ.setdefault("RAY_ADDRESS", "local")


def pytest_report_header(config):
    """Name the environment at the top of the run, so that a failure says where it ran."""
    from importlib.metadata import version

    names = ["torch", "torchvision", "timm", "ray", "mlflow", "optuna"]
    return "prance stack: " + ", ".join(f"{n} {version(n)}" for n in names)


@pytest.fixture
def random_images():
    """``random_images(model, n, seed)``: a seeded batch shaped for a MetaViT's input."""

    def make(model, n=3, seed=0):
        pe = model.vit.patch_embed
        return torch.randn(n, model.vit.in_chans, *pe.img_size, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture(scope="module")
def decisive_micro():
    """A micro meta-network with decisive weights (x3), so that static configurations
    disagree on images; one per test module."""
    from prance.models import create_meta

    torch.manual_seed(0)
    m = create_meta("prance_vit_micro").eval()
    with torch.no_grad():
        for p in m.vit.parameters():
            p.mul_(3.0)
    return m


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory) -> Path:
    """A freshly initialised micro meta-network (4 blocks, 16 patches) as a checkpoint."""
    from prance.checkpoint import save_checkpoint
    from prance.models import create_meta

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "micro.safetensors", create_meta("prance_vit_micro"), "prance_vit_micro")


# ---------------------------------------------------------------------------- Ray cluster

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    address: str  # the GCS address (host:port)
    dashboard: str  # http://127.0.0.1:PORT, for `ray job submit --address`
    env: dict  # the environment a client of this cluster needs (token auth, PATH)

    def ray(self, *args: str, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this cluster."""
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def submit(self, *entrypoint: str, submission_id: str, timeout: float = 300) -> tuple[str, str]:
        """`ray job submit --working-dir . -- <entrypoint>` from the repository root, waiting
        for the job to end; returns (its status as `ray job status` tells it, the output)."""
        proc = self.ray("job", "submit", "--address", self.dashboard, "--working-dir", ".", "--submission-id", submission_id,
                        "--", *entrypoint, timeout=timeout)
        status = self.ray("job", "status", "--address", self.dashboard, submission_id, timeout=60)
        text = status.stdout + status.stderr
        word = next((w for w in ("succeeded", "failed", "stopped") if f"Job '{submission_id}' {w}" in text
                     or f"Job '{submission_id}' was {w}" in text), "unknown")
        return word.upper(), proc.stdout + proc.stderr + text


@pytest.fixture(scope="session")
def ray_cluster():
    """A real single-node Ray cluster started with `ray start --head` on loopback, with
    token authentication (Ray >= 2.59 turns it on: clients need RAY_AUTH_MODE=token), on
    free ports and in a private temp dir (so that no other `ray.init()` on this machine
    joins it). Stopped after the session by ending the `ray start --block` process group
    it runs in -- never with `ray stop`, which would end every Ray instance on the machine."""
    temp = Path(tempfile.mkdtemp(prefix="rayt-", dir="/tmp"))
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--num-cpus", "2", "--temp-dir", str(temp), "--disable-usage-stats"]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp)
    cluster = RayCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}: {(temp / 'ray-start.log').read_text()[-3000:]}")
            up = cluster.ray("job", "list", "--address", cluster.dashboard, timeout=60)
            if up.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray cluster did not come up: {up.stderr[-2000:]}")
            time.sleep(2)
        yield cluster
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` ends its Ray processes on SIGTERM
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is still shutting down in that group
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


# ------------------------------------------------------------------------- chaos helpers


def ray_workers(root_pid: int, title: str) -> list:
    """The live processes under ``root_pid`` (a driver this test started) whose process
    title starts with ``title`` (Ray sets it: ``ray::ImplicitFunc.train`` is a Tune trial,
    ``ray::RayTrainWorker`` a Ray Train worker)."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in children:
        try:
            if " ".join(p.cmdline()).startswith(title):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def descendants(root_pid: int) -> list:
    import psutil

    try:
        return psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def reap(processes: list, grace_s: float = 15.0) -> None:
    """Wait for processes a killed driver leaves behind (Ray's reaper ends them), then
    SIGKILL what is still there: only processes this test started."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def call_main(main, args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of an entry point's ``main(args)`` run in this process
    (argparse's usage errors caught as their exit code), with one torch thread: the same
    entry point as a subprocess, without its seconds of imports."""
    import contextlib
    import io

    import torch

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------- sweeps (test_sweep, test_ray_jobs)


def tiny_args(checkpoint: Path, *more: str) -> list[str]:
    """The tiny sweep preset on the micro checkpoint: ``sweeps/budget_sweep.py`` arguments."""
    # the micro model has 4 blocks: the selector decides before blocks 1, 2, 3
    return ["--preset", "tiny", "--set", f"checkpoint={checkpoint}", "--set", "selector.decision_blocks=[1,2,3]", *more]


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def sweep_runs(uri: str, name: str):
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(f"prance-sweep-{name}")
    assert exp is not None
    return client, client.search_runs([exp.experiment_id], max_results=1000)


# ------------------------------------------------------------- an MLflow server (test_sweep, test_multinode)


class MlflowServer:
    """A real `mlflow server` on a free loopback port (sqlite backend, proxied artifacts)
    that a test can stop and start again on the same port and database."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        self.launch()
        self.wait()

    def launch(self) -> None:
        """Start the server process without waiting for it (:meth:`wait` does)."""
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}", "--artifacts-destination",
               str(self.folder / "artifacts"), "--workers", "1"]
        log = open(self.folder / "server.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder)

    def wait(self) -> None:
        """Until the launched server answers; stopped and the test failed when it does not in time."""
        deadline = time.monotonic() + 240  # minutes on a loaded 2-core machine, seconds on an idle one
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()  # no server left behind, listening after the test gave up on it
                    pytest.fail(f"mlflow server did not start: {(self.folder / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()

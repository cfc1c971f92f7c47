"""The multi-node guard (prance/train/placement.py): a local storage path or a node-local
MLflow store on a cluster of several nodes must not pass silently."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from prance.errors import PranceError
from prance.train.placement import (
    autoscaler_max_nodes,
    check_shared_locations,
    is_network_fs,
    mount_of,
    shared_location_problems,
)

MOUNTS = """\
proc /proc proc rw,relatime 0 0
/dev/nvme0n1p1 / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
10.0.0.2:/export /mnt/shared nfs4 rw,relatime,vers=4.1 0 0
/dev/nvme1n1 /mnt/shared/scratch xfs rw,relatime 0 0
my-bucket /mnt/gcs fuse.gcsfuse rw,nosuid,nodev,relatime,user_id=1000 0 0
s3fs /mnt/s3 fuse.s3fs rw,nosuid,nodev 0 0
lxcfs /var/lib/lxcfs fuse.lxcfs rw,nosuid,nodev 0 0
//nas/share /mnt/my\\040nas cifs rw,relatime 0 0
/dev/sdb1 /data ext4 rw 0 0
fs0:/data /data nfs rw 0 0
"""


def problems(storage, uri="http://10.0.0.5:5000", n=3):
    return shared_location_problems(storage, uri, n, mounts_text=MOUNTS)


def test_one_node_never_has_problems():
    assert shared_location_problems("/tmp/runs", "sqlite:////tmp/mlflow.db", 1, mounts_text=MOUNTS) == ([], [])
    assert shared_location_problems("memory:///x", "http://127.0.0.1:5000", 0, mounts_text=MOUNTS) == ([], [])


def test_local_storage_on_several_nodes_is_an_error():
    errors, warnings = problems("/home/ray/runs/sweep")
    assert warnings == [] and len(errors) == 1
    e = errors[0]
    assert "storage /home/ray/runs/sweep is on this node's local disk (ext4 mounted at /)" in e
    assert "may scale to 3 nodes" in e and "s3://" in e and "NFS" in e and "\n" not in e


@pytest.mark.parametrize(
    "storage",
    ["/mnt/shared/prance", "/mnt/shared", "/mnt/gcs/runs", "/mnt/s3/x/y", "/mnt/my nas/prance", "/data/prance", "file:///mnt/shared/prance"],
)
def test_network_filesystems_are_shared(storage):
    assert problems(storage) == ([], [])


@pytest.mark.parametrize(
    "storage, fstype",
    [
        ("/mnt/shared/scratch/runs", "xfs"),  # a local disk mounted inside the NFS tree: the deeper mount wins
        ("/mnt/sharedX/runs", "ext4"),  # a prefix of the name is not the mount
        ("/var/lib/lxcfs/x", "fuse.lxcfs"),  # a FUSE filesystem that is local
        ("/dev/shm/runs", "tmpfs"),
        ("file:///home/ray/runs", "ext4"),
    ],
)
def test_local_filesystems_are_refused(storage, fstype):
    errors, _ = problems(storage)
    assert len(errors) == 1 and f"({fstype} mounted at" in errors[0]


def test_relative_storage_is_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mounts = f"/dev/vda / ext4 rw 0 0\nnfs:/x {tmp_path} nfs rw 0 0\n"
    assert shared_location_problems("runs/sweep", "", 4, mounts_text=mounts) == ([], [])
    errors, _ = shared_location_problems("../elsewhere", "", 4, mounts_text=mounts)
    assert errors and str(tmp_path.parent / "elsewhere") in errors[0]


def test_the_last_of_two_mounts_on_one_point_wins():
    mounts = "/dev/vda / ext4 rw 0 0\n/dev/vdb /mnt/x ext4 rw 0 0\nnfs:/x /mnt/x nfs4 rw 0 0\n"
    assert mount_of("/mnt/x/runs", mounts) == ("/mnt/x", "nfs4")
    assert mount_of("/elsewhere", mounts) == ("/", "ext4")


@pytest.mark.parametrize("storage", ["s3://bucket/prance", "gs://bucket/prance", "gcs://b/p", "hdfs://nn:8020/p", "abfss://c@a.dfs.core.windows.net/p"])
def test_object_stores_are_shared(storage):
    assert problems(storage) == ([], [])


def test_in_memory_storage_is_an_error_and_an_unknown_scheme_a_warning():
    errors, _ = problems("memory:///runs")
    assert len(errors) == 1 and "one process's memory" in errors[0]
    errors, warnings = problems("ftp://host/runs")
    assert errors == [] and len(warnings) == 1 and "cannot tell whether storage ftp://host/runs is shared" in warnings[0]


@pytest.mark.parametrize("uri", ["sqlite:////home/ray/mlflow.db", "sqlite:///mlflow.db", "file:///home/ray/mlruns", "mlruns"])
def test_node_local_tracking_stores_warn(uri):
    errors, warnings = problems("s3://b/p", uri)
    assert errors == [] and len(warnings) == 1
    w = warnings[0]
    assert uri in w and "lost with `ray down`" in w and "scripts/mlflow_server.sh" in w and "\n" not in w


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "http://localhost:5000", "http://0.0.0.0:5000", "https://127.0.1.1"])
def test_loopback_tracking_servers_warn(uri):
    errors, warnings = problems("s3://b/p", uri, n=4)
    assert errors == [] and len(warnings) == 1
    assert "loopback" in warnings[0] and "other 3 node(s)" in warnings[0]


@pytest.mark.parametrize("uri", ["http://10.0.0.5:5000", "https://mlflow.example.com", "postgresql://u@db/mlflow", "databricks", ""])
def test_shared_tracking_stores_pass(uri):
    assert problems("s3://b/p", uri) == ([], [])


def test_errors_and_warnings_together():
    errors, warnings = problems("/home/ray/runs", "sqlite:////home/ray/mlflow.db", n=2)
    assert len(errors) == 1 and len(warnings) == 1


def test_network_fs_types():
    assert all(is_network_fs(t) for t in ("nfs", "nfs4", "cifs", "lustre", "fuse.gcsfuse", "fuse.s3fs", "fuse.rclone", "fuse"))
    assert not any(is_network_fs(t) for t in ("ext4", "xfs", "btrfs", "overlay", "tmpfs", "zfs", "fuse.lxcfs", "fuse.fuse-overlayfs", "unknown"))


def test_mount_of_reads_this_machines_proc_mounts():
    if not Path("/proc/mounts").is_file():
        pytest.skip("no /proc/mounts")
    point, fstype = mount_of("/")
    assert point == "/" and fstype != "unknown"


def test_check_prints_warnings_and_raises_the_first_error(capsys, tmp_path):
    with pytest.raises(PranceError) as e:
        check_shared_locations(str(tmp_path / "runs"), "sqlite:////tmp/m.db", num_nodes=3)
    # tmp_path lies on this machine's local disk (a CI runner has no network filesystem there)
    assert "is on this node's local disk" in str(e.value)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: MLflow tracking URI sqlite:////tmp/m.db")

    check_shared_locations("s3://b/p", "http://localhost:5000", num_nodes=2)
    assert capsys.readouterr().err.startswith("warning: MLflow tracking URI http://localhost:5000 names this node's loopback")
    check_shared_locations(str(tmp_path), "sqlite:////tmp/m.db", num_nodes=1)
    assert capsys.readouterr().err == ""


def test_autoscaler_maximum_comes_from_the_launchers_bootstrap_config(tmp_path):
    path = tmp_path / "ray_bootstrap_config.yaml"
    assert autoscaler_max_nodes(path) == 0  # not a launcher's head node
    path.write_text(json.dumps({"cluster_name": "prance-aws", "max_workers": 6}))
    assert autoscaler_max_nodes(path) == 7
    path.write_text("not json")
    assert autoscaler_max_nodes(path) == 0


# ---- sweeps/pretrain.py reads the cluster's runtime-env variables ---------------------------


def _pretrain_main():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sweeps"))
    try:
        import pretrain
    finally:
        sys.path.pop(0)
    return pretrain.main


def test_pretrain_takes_storage_from_the_environment_and_flags_win(tmp_path, monkeypatch, capsys):
    main = _pretrain_main()
    monkeypatch.setenv("PRANCE_STORAGE", str(tmp_path / "from-env"))
    monkeypatch.setenv("PRANCE_MLFLOW_URI", "http://10.0.0.5:5000")
    out = str(tmp_path / "x.safetensors")
    assert main(["--preset", "smoke", "--export-only", "--export", out]) == 2
    assert f"no finished run in {tmp_path / 'from-env'}" in capsys.readouterr().err
    assert main(["--preset", "smoke", "--storage", str(tmp_path / "flag"), "--export-only", "--export", out]) == 2
    assert f"no finished run in {tmp_path / 'flag'}" in capsys.readouterr().err
    assert main(["--preset", "smoke", "--set", f"storage={tmp_path / 'set'}", "--export-only", "--export", out]) == 2
    assert f"no finished run in {tmp_path / 'set'}" in capsys.readouterr().err
    assert os.environ["PRANCE_STORAGE"].endswith("from-env")


# ---- with a real two-node Ray cluster (one machine, two raylets) ----------------------------


def test_a_real_two_node_cluster_refuses_local_storage(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from prance.train.placement import cluster_node_count

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        assert cluster_node_count() == 2
        with pytest.raises(PranceError, match="may scale to 2 nodes"):
            check_shared_locations(str(tmp_path / "runs"), "http://10.0.0.5:5000")
        check_shared_locations("s3://bucket/prance", "sqlite:////tmp/mlflow.db")
        err = capsys.readouterr().err.splitlines()  # Ray's own INFO lines may come first
        assert any(line.startswith("warning: MLflow tracking URI sqlite:////tmp/mlflow.db is a sqlite database") for line in err), err
    finally:
        ray.shutdown()
        cluster.shutdown()

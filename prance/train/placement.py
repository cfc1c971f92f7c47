"""Where a multi-node run may keep its files: checks for the storage path and the MLflow URI.

On a cluster of several Ray nodes, Tune trials and Ray Train workers run on whichever node
has room and write their checkpoints to ``storage``; the driver (on the head node) writes
the results and logs to MLflow. A local folder then means each node fills its own disk:
results miss the trials of the other nodes and resuming cannot find their checkpoints.
A sqlite tracking URI means the runs land on the head node's disk only and are lost with
``ray down``; a loopback ``http://127.0.0.1`` server cannot be reached from other nodes.

``shared_location_problems`` is the pure decision (tested offline); ``check_shared_locations``
asks the running Ray cluster how many nodes it has and reports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from prance.errors import PranceError

# Filesystem types (the third column of /proc/mounts) that every node can mount.
NETWORK_FS_TYPES = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs",
        "ceph", "cephfs", "orangefs", "pvfs2", "afs", "ocfs2", "gfs2", "wekafs", "panfs", "davfs",
        "fuse",  # plain "fuse": mountpoint-s3 and other object-store daemons
    }
)
# FUSE subtypes ("fuse.<name>") that are local to one machine; any other fuse.<name>
# (gcsfuse, s3fs, rclone, sshfs, juicefs, goofys, blobfuse2, ceph-fuse, ...) counts as shared.
LOCAL_FUSE_SUBTYPES = frozenset(
    {"lxcfs", "gvfsd-fuse", "portal", "xdg-document-portal", "fuse-overlayfs", "squashfuse",
     "appimagefs", "bindfs", "encfs", "gocryptfs", "snapfuse", "ntfs-3g", "exfat"}
)
# Storage URI schemes every node reaches over the network (pyarrow / fsspec filesystems).
SHARED_SCHEMES = frozenset(
    {"s3", "s3a", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az", "adl", "wasb", "wasbs", "oss", "r2"}
)
LOOPBACK_HOSTS = frozenset({"localhost", "::1", "0.0.0.0", "ip6-localhost"})  # and 127.*
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # written by `ray up` on the head node

FIX_STORAGE = "use s3://BUCKET/PATH, gs://BUCKET/PATH or a network filesystem (NFS) mounted at the same path on every node"
FIX_MLFLOW = "start the head-node server (bash scripts/mlflow_server.sh, docs/cluster.md) or use a managed tracking URI"


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(esc, ch)
    return field


def mount_of(path: str | os.PathLike, mounts_text: str | None = None) -> tuple[str, str]:
    """``(mount point, filesystem type)`` of the mount that holds ``path`` (which need not exist).

    ``mounts_text`` is the content of /proc/mounts (read when None). The longest mount point
    that is a prefix of the resolved path wins; of equal ones the last (mounted on top).
    """
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return ("/", "unknown")
    target = str(Path(path).expanduser().resolve())
    best = ("/", "unknown")
    best_len = -1
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape(fields[1]), fields[2]
        inside = point == "/" or target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best_len:
            best, best_len = (point, fstype), len(point)
    return best


def is_network_fs(fstype: str) -> bool:
    if fstype in NETWORK_FS_TYPES:
        return True
    if fstype.startswith("fuse."):
        return fstype.removeprefix("fuse.") not in LOCAL_FUSE_SUBTYPES
    return False


def _storage_problems(storage: str, num_nodes: int, mounts_text: str | None) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    warnings: list[str] = []
    parsed = urlparse(storage)
    scheme = parsed.scheme.lower() if "://" in storage else ""
    if scheme in SHARED_SCHEMES:
        return errors, warnings
    if scheme in ("memory", "mock"):
        errors.append(f"storage {storage} is in one process's memory; with {num_nodes} Ray nodes {FIX_STORAGE}")
        return errors, warnings
    if scheme not in ("", "file"):
        warnings.append(f"cannot tell whether storage {storage} is shared by all {num_nodes} Ray nodes ({scheme}:// is not a known shared filesystem)")
        return errors, warnings
    path = parsed.path if scheme == "file" else storage
    point, fstype = mount_of(path, mounts_text)
    if not is_network_fs(fstype):
        resolved = Path(path).expanduser().resolve()
        errors.append(
            f"storage {resolved} is on this node's local disk ({fstype} mounted at {point}) but the Ray cluster has or may "
            f"scale to {num_nodes} nodes: trials on other nodes would keep their checkpoints on their own disks; {FIX_STORAGE}"
        )
    return errors, warnings


def _mlflow_problems(uri: str, num_nodes: int) -> list[str]:
    if not uri:
        return []
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if uri.split(":", 1)[0] in ("databricks", "databricks-uc"):  # managed; "databricks" has no "://"
        return []
    if scheme == "sqlite" or scheme == "file" or "://" not in uri:
        where = "a sqlite database" if scheme == "sqlite" else "a local folder"
        return [
            f"MLflow tracking URI {uri} is {where} on the node that runs the driver: with {num_nodes} Ray nodes the runs "
            f"stay on that node's disk and are lost with `ray down`; {FIX_MLFLOW}"
        ]
    host = (parsed.hostname or "").lower()
    if scheme in ("http", "https") and (host in LOOPBACK_HOSTS or host.startswith("127.")):
        return [
            f"MLflow tracking URI {uri} names this node's loopback address: Ray workers on the other "
            f"{num_nodes - 1} node(s) cannot log to it; use the head node's private address (scripts/mlflow_server.sh prints it)"
        ]
    return []


def shared_location_problems(
    storage: str, mlflow_uri: str, num_nodes: int, *, mounts_text: str | None = None
) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for a run on ``num_nodes`` Ray nodes; both empty on one node.

    Errors: a storage path on a local (non-network) filesystem, or an in-memory one.
    Warnings: a sqlite / local-folder / loopback MLflow URI, an unknown storage scheme.
    ``mounts_text``: the content of /proc/mounts (read from this machine when None).
    """
    if num_nodes <= 1:
        return [], []
    errors, warnings = _storage_problems(storage, num_nodes, mounts_text)
    warnings += _mlflow_problems(mlflow_uri, num_nodes)
    return errors, warnings


def autoscaler_max_nodes(bootstrap_config: str | os.PathLike = BOOTSTRAP_CONFIG) -> int:
    """How many nodes the cluster launcher may scale to (head + max_workers); 0 when this
    machine is not a launcher's head node (no ``~/ray_bootstrap_config.yaml``)."""
    path = Path(bootstrap_config).expanduser()
    try:
        config = json.loads(path.read_text())  # `ray up` writes it as JSON
    except (OSError, ValueError):
        return 0
    try:
        return 1 + int(config.get("max_workers", 0))
    except (TypeError, ValueError, AttributeError):
        return 0


def cluster_node_count() -> int:
    """Alive nodes of the connected Ray cluster, or the autoscaler's maximum if larger
    (GPU workers with min_workers 0 join only after the run has started). Needs ray.init()."""
    import ray

    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    return max(alive, autoscaler_max_nodes())


def check_shared_locations(storage: str, mlflow_uri: str, num_nodes: int | None = None) -> None:
    """Print ``warning: ...`` lines to stderr; raise PranceError with the first error.

    ``num_nodes``: taken from the running Ray cluster when None (Ray must be initialised).
    """
    n = cluster_node_count() if num_nodes is None else num_nodes
    errors, warnings = shared_location_problems(storage, mlflow_uri, n)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if errors:
        raise PranceError(errors[0])

"""One storage rule for pretraining and the sweep: file:// URLs are local folders."""

from pathlib import Path

import pytest

from prance import storage
from prance.train.config import PretrainConfig
from prance.errors import PranceError
from prance.sweep import store
from prance.train import launch


def test_file_urls_are_local_and_others_remote(tmp_path: Path) -> None:
    assert not storage.is_remote(str(tmp_path)) and not storage.is_remote(f"file://{tmp_path}")
    assert storage.is_remote("s3://bucket/runs") and storage.is_remote("gs://b/x")
    assert storage.local_path(f"file://{tmp_path}") == tmp_path.resolve() == storage.local_path(str(tmp_path))
    assert storage.absolute("s3://bucket/runs/") == "s3://bucket/runs"
    assert store.absolute_storage(f"file://{tmp_path}") == str(tmp_path.resolve())


def test_pretraining_reads_a_file_url_storage_as_its_local_folder(tmp_path: Path) -> None:
    cfg = PretrainConfig(storage=f"file://{tmp_path}", name="run")
    # a local folder without a finished run: the message names the folder (s3:// would say "needs a local folder")
    with pytest.raises(PranceError, match="best.safetensors is missing") as e:
        launch.run_dir_of(cfg)
    assert str(tmp_path / "run") in str(e.value)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.safetensors").write_bytes(b"")
    assert launch.run_dir_of(cfg) == tmp_path.resolve() / "run"


def test_the_best_checkpoint_of_a_run_on_remote_storage_is_fetched_before_exporting(tmp_path: Path) -> None:
    """fetch_best reads the run through pyarrow (here a file:// URI, the same code path as
    s3:// and gs://), picks the checkpoint with the best metric, and writes it to the local
    folder as best.safetensors; a run without checkpoints is one PranceError."""
    import json

    from prance.train.worker import MODEL_FILE

    remote = tmp_path / "bucket" / "run"
    for i, top1 in enumerate([50.0, 70.0, 60.0]):
        folder = remote / f"checkpoint_00000{i}"
        folder.mkdir(parents=True)
        (folder / MODEL_FILE).write_bytes(f"weights of epoch {i}".encode())
        (folder / "metrics.json").write_text(json.dumps({"epoch": i, "top1_largest": top1}))
    (remote / "checkpoint_000009").mkdir()  # one being written: no metrics.json yet
    got = launch.fetch_best(f"file://{remote}", "top1_largest", tmp_path / "local")
    assert got == tmp_path / "local" / "best.safetensors" and got.read_bytes() == b"weights of epoch 1"
    with pytest.raises(PranceError, match="no finished run"):
        launch.fetch_best(f"file://{tmp_path / 'bucket' / 'empty'}", "top1_largest", tmp_path / "other")
    # the run folder of s3:// storage is a local staging folder, never a mangled "s3:/..." path
    cfg = PretrainConfig(storage="s3://bucket/prance", name="run")
    assert launch.staging_dir(cfg).is_absolute() and "s3:" not in str(launch.staging_dir(cfg))


def test_a_file_on_remote_storage_is_fetched_whole(tmp_path: Path) -> None:
    """storage.fetch copies a URI (file:// here, the pyarrow path of s3:// and gs://, which
    tests/test_multinode.py reads from a real S3 server) to a local file; an unreadable URI is
    one PranceError and leaves no partial file; local_file leaves local paths local."""
    remote = tmp_path / "bucket" / "t0001-prune" / "checkpoint_000002"
    remote.mkdir(parents=True)
    (remote / "selector.safetensors").write_bytes(b"a selector")
    got = storage.fetch(f"file://{remote}/selector.safetensors", tmp_path / "fetched" / "s.safetensors")
    assert got == tmp_path / "fetched" / "s.safetensors" and got.read_bytes() == b"a selector"
    with pytest.raises(PranceError, match="cannot read file://.*nope.safetensors") as e:
        storage.fetch(f"file://{remote}/nope.safetensors", tmp_path / "fetched" / "n.safetensors")
    assert "\n" not in str(e.value) and sorted(p.name for p in (tmp_path / "fetched").iterdir()) == ["s.safetensors"]
    local = str(remote / "selector.safetensors")
    assert storage.local_file(local, tmp_path / "x") == local == storage.local_file(f"file://{local}", tmp_path / "x")
    assert not (tmp_path / "x").exists()

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

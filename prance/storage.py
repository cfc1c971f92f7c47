"""Where runs keep their files: a local folder (a path, or a ``file://`` URL) or remote
storage that Ray and pyarrow reach by URL (``s3://``, ``gs://``, ...). One rule for the
pretraining and the sweep."""

from __future__ import annotations

from pathlib import Path


def is_remote(storage: str) -> bool:
    """A URL other than ``file://``."""
    return "://" in storage and not storage.startswith("file://")


def local_path(storage: str) -> Path:
    """The absolute folder of local ``storage`` (a path or a ``file://`` URL)."""
    return Path(storage.removeprefix("file://")).expanduser().resolve()


def absolute(storage: str) -> str:
    """Remote storage as given (no trailing slash), local storage as an absolute path."""
    return storage.rstrip("/") if is_remote(storage) else str(local_path(storage))

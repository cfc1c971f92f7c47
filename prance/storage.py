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


def fetch(uri: str, dest: Path, fs=None) -> Path:
    """Copy the file at ``uri`` (on remote storage: any URI pyarrow reads; with ``fs``, a
    pyarrow filesystem, a path on it) to ``dest``, written whole or not at all; PranceError
    naming ``uri`` when it cannot be read."""
    import shutil

    import pyarrow.fs

    from prance.errors import PranceError

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        fs, path = (fs, uri) if fs is not None else pyarrow.fs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (OSError, ValueError) as e:  # missing file, unreachable endpoint, no credentials, bad URI
        tmp.unlink(missing_ok=True)
        raise PranceError(f"cannot read {uri}: {type(e).__name__}: {e}") from None
    tmp.replace(dest)
    return dest


def local_file(path: str, folder: Path) -> str:
    """A local path of the file at ``path``: itself (a ``file://`` URL as its path) when local,
    else fetched once into ``folder``, named after its last three path parts (on a sweep's
    storage: the trial's folder, its checkpoint folder, the file)."""
    if not is_remote(path):
        return str(local_path(path)) if path.startswith("file://") else path
    dest = Path(folder) / "_".join(path.rstrip("/").split("/")[-3:])
    return str(dest if dest.is_file() else fetch(path, dest))


def write_text(uri: str, text: str) -> None:
    """Write ``text`` as the file at ``uri`` on remote storage; PranceError naming ``uri``."""
    import pyarrow.fs

    from prance.errors import PranceError

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        fs.create_dir(path.rsplit("/", 1)[0])
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
    except (OSError, ValueError) as e:
        raise PranceError(f"cannot write {uri}: {type(e).__name__}: {e}") from None

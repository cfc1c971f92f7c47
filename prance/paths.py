"""Output paths checked before any work starts, one rule for every command.

A command that writes a file or a folder at the end (a selector, a benchmark record, a
sweep's storage, an MLflow sqlite database) calls :func:`check_output_dir` or
:func:`check_output_file` first, so that an unwritable path (``/proc/...``, a folder
under a regular file, a read-only disk) is one line ``error: ...`` before minutes of
work, not a traceback after them. The check creates the missing folders, writes and
removes a probe file, then removes the folders it created: it leaves nothing behind.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from prance.errors import PranceError


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def check_output_dir(path: str | os.PathLike, what: str, shown: str | os.PathLike | None = None) -> Path:
    """``path`` is (or can become) a folder this process can write files in; PranceError
    naming ``what`` (e.g. ``--output``) and ``shown`` (default ``path``) when not.
    Returns the absolute path."""
    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise PranceError(f"{what} {path}: is a file, not a folder" if shown is None else f"{what} {shown}: {folder} is a file, not a folder")
    path = path if shown is None else shown
    missing: list[Path] = []
    probe_root = folder
    while not probe_root.exists():
        missing.append(probe_root)
        probe_root = probe_root.parent
    if not probe_root.is_dir():
        raise PranceError(f"{what} {path}: {probe_root} is a file, not a folder")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        probe = folder / f".prance-write-check-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PranceError(f"{what} {path} is not writable ({_reason(e)})") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
    return folder


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` can be written as a file (its folder is writable, it is not a folder, an
    existing file there is writable); PranceError naming ``what`` when not."""
    file = Path(path).expanduser().absolute()
    if file.is_dir():
        raise PranceError(f"{what} {path}: is a folder, not a file")
    check_output_dir(file.parent, what, shown=path)
    if file.exists() and not os.access(file, os.W_OK):
        raise PranceError(f"{what} {path} is not writable (permission denied)")
    return file

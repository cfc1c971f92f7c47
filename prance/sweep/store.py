"""The sweep folder: ``<storage>/<name>/`` holds Ray Tune's experiment (trials, searcher
and scheduler state), ``sweep.json`` (the settings a resume continues with) and the
report (``results.csv``, ``pareto.png``). With remote storage (s3://, gs://) the report
is written to ``runs/sweeps/<name>/`` locally and copied there too."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prance.errors import PranceError
from prance.storage import absolute as absolute_storage
from prance.storage import is_remote

SWEEP_FILE = "sweep.json"
LOCAL_ROOT = Path("runs/sweeps")


def default_name(source: str) -> str:
    stem = Path(source).stem if source else "sweep"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def experiment_path(storage: str, name: str) -> str:
    return f"{absolute_storage(storage)}/{name}"


def report_folder(storage: str, name: str) -> Path:
    """Where results.csv and pareto.png are written on this machine."""
    if is_remote(storage):
        return (LOCAL_ROOT / name).resolve()
    return Path(experiment_path(storage, name))


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def write_settings(storage: str, name: str, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str)
    if is_remote(storage):
        fs, path = _fs(f"{experiment_path(storage, name)}/{SWEEP_FILE}")
        fs.create_dir(path.rsplit("/", 1)[0])
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
        return
    folder = Path(experiment_path(storage, name))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (SWEEP_FILE + ".tmp")
    tmp.write_text(text)
    tmp.replace(folder / SWEEP_FILE)


def read_settings(storage: str, name: str) -> dict | None:
    try:
        if is_remote(storage):
            fs, path = _fs(f"{experiment_path(storage, name)}/{SWEEP_FILE}")
            with fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        path = Path(experiment_path(storage, name)) / SWEEP_FILE
        return json.loads(path.read_text()) if path.is_file() else None
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise PranceError(f"{experiment_path(storage, name)}/{SWEEP_FILE} is corrupt ({e})") from None


TUNE_STATE = "tuner.pkl"  # Ray Tune writes it when fit() starts: what Tuner.restore needs


def has_tune_state(storage: str, name: str) -> bool:
    """Whether a local sweep folder holds Tune's experiment (its trials were started)."""
    return (Path(experiment_path(storage, name)) / TUNE_STATE).is_file()


def latest_sweep(storage: str) -> str:
    """The most recently created sweep in a local storage folder that started its trials
    (a sweep that stopped before has nothing to resume and must not hide one that has)."""
    if is_remote(storage):
        raise PranceError("with remote --storage, --resume needs --name (the sweep to continue)")
    root = Path(absolute_storage(storage))
    found, unstarted = [], []
    for f in root.glob(f"*/{SWEEP_FILE}"):
        try:
            created = json.loads(f.read_text()).get("created", 0)
        except (OSError, ValueError):
            continue
        (found if (f.parent / TUNE_STATE).is_file() else unstarted).append((created, f.parent.name))
    if not found:
        never = f" ({', '.join(n for _, n in sorted(unstarted))} never started its trials)" if unstarted else ""
        raise PranceError(f"nothing to resume: no sweep in {root}{never}")
    return max(found)[1]


def remove_unstarted(storage: str, name: str) -> None:
    """Remove the folder of a new sweep that failed before Tune wrote anything into it
    (only ``sweep.json`` and empty folders): nothing of value is lost."""
    if is_remote(storage):
        return
    import shutil

    folder = Path(experiment_path(storage, name))
    if not folder.is_dir():
        return
    files = [p for p in folder.rglob("*") if p.is_file()]
    if all(p.name in (SWEEP_FILE, SWEEP_FILE + ".tmp") for p in files):
        shutil.rmtree(folder, ignore_errors=True)


def exists(storage: str, name: str) -> bool:
    if read_settings(storage, name) is not None:
        return True
    if is_remote(storage):
        return False
    return any(Path(experiment_path(storage, name)).glob("*")) if Path(experiment_path(storage, name)).is_dir() else False


def publish(storage: str, name: str, files: list[Path]) -> None:
    """Copy report files into remote storage (local storage already holds them)."""
    if not is_remote(storage):
        return
    fs, base = _fs(experiment_path(storage, name))
    for f in files:
        with fs.open_output_stream(f"{base}/{f.name}") as out:
            out.write(f.read_bytes())


def append_timing(folder: Path, session: dict) -> Path:
    """``timing.json``: per driver session, the Tuner.fit wall time and the trial slots
    (what scripts/bench_sweep.py derives Tune's overhead from)."""
    path = folder / "timing.json"
    sessions = json.loads(path.read_text()) if path.is_file() else []
    sessions.append({**session, "at": time.strftime("%Y-%m-%d %H:%M:%S")})
    path.write_text(json.dumps(sessions, indent=2) + "\n")
    return path


def check_tune_state(storage: str, name: str) -> None:
    """Before Ray starts: PranceError when the newest Tune experiment state of a local
    sweep folder does not parse (a truncated copy, a disk that filled up)."""
    if is_remote(storage):
        return  # Tune reads it itself; its error is reported when the restore fails
    folder = Path(experiment_path(storage, name))
    states = sorted(folder.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return
    try:
        json.loads(states[-1].read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PranceError(f"cannot resume sweep {name}: Tune's saved state {states[-1]} is unreadable ({type(e).__name__}: "
                          f"{str(e)[:120]}); results.csv in {folder} keeps the trials that finished") from None

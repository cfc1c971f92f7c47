"""A sweep's MLflow runs, driven from the Ray driver only (no trial talks to MLflow).

One experiment per sweep; one parent run (created when the sweep starts, found again
on resume; at the end it holds the summary: the results table and the plot); one run per
Tune trial, nested under the parent (``mlflow.parentRunId``) and found again by its tags
(sweep id + trial number) so that a resumed sweep reuses it instead of creating a
duplicate. Every run records the images it read as MLflow dataset inputs (a record of
the split, :func:`prance.splits.inputs`: no copy of the images). Every run a session opened is closed
by the end of that session: FINISHED, FAILED, or KILLED when the sweep was interrupted
(and reopened when the resumed sweep runs that trial again).

An MLflow server that stops answering does not stop the sweep: every write is an
operation (plain data naming its trial by number, not by run id) queued in order and
retried (``flush``) once the server answers again; the driver waits for it at the end
(:meth:`SweepRuns.drain`). The queue is kept on disk while it is not empty
(``<sweep folder>/mlflow_queue/``: ``queue.jsonl`` and copies of the selector files
waiting for their upload), so that a driver killed during an outage loses nothing: the
resumed sweep replays it first. Per-iteration metrics are written once per step: a
trial restored from an older checkpoint than its last logged step does not log that
step again, and a replayed write does not either.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from prance import tracking
from prance.errors import PranceError, first_line
from prance.selector.store import SELECTOR_FILE

TRIAL_KIND = "sweep-trial"
SUMMARY_KIND = "sweep-summary"
TAG_NUMBER = "prance.trial_number"
STEP_METRIC = "score"  # every trial report carries it: its history tells the last step logged
RETRY_EVERY_S = 5.0  # while the server is away, how often a write checks whether it is back
QUEUE_FOLDER = "mlflow_queue"  # in the sweep's folder, while writes wait for the server
QUEUE_FILE = "queue.jsonl"


def _plain(value: Any) -> Any:
    """A JSON value for a numpy scalar or anything else a queued write holds."""
    return value.item() if hasattr(value, "item") else str(value)


class SweepRuns:
    def __init__(self, uri: str, experiment_id: str, sweep_id: str, queue_dir: str | os.PathLike | None = None):
        """``queue_dir``: where writes waiting for the server are kept (none: memory only);
        writes an earlier driver left there are loaded, to be replayed first."""
        self.uri, self.experiment_id, self.sweep_id = uri, experiment_id, sweep_id
        self.run_ids: dict[int, str] = {}  # trial number -> run id
        self.status: dict[int, str] = {}  # trial number -> MLflow status
        self.tags: dict[int, dict] = {}
        self.last_step: dict[int, int] = {}  # trial number -> last per-iteration step logged
        self.queue_dir = Path(queue_dir) if queue_dir is not None else None
        self.pending: list[dict] = self._load()  # writes waiting for the server, in order
        self.offline_since: float | None = time.monotonic() if self.pending else None
        self._next_try = 0.0
        self._stash: Path | None = None  # copies of artifact folders whose upload waits (no queue_dir)
        self.parent_id: str | None = None  # the sweep's parent run (open_parent): every trial run nests under it
        self.refresh()

    # ------------------------------------------------------------ the queue on disk
    @property
    def _queue_file(self) -> Path | None:
        return self.queue_dir / QUEUE_FILE if self.queue_dir is not None else None

    def _load(self) -> list[dict]:
        path = self._queue_file
        if path is None or not path.is_file():
            return []
        ops = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                ops.append(json.loads(line))
            except ValueError:  # the line being written when the driver died
                print(f"warning: {path}:{n} is not a complete queued MLflow write: skipped", file=sys.stderr, flush=True)
        return ops

    def _save(self) -> None:
        """The queue on disk as it is in memory (atomically); gone once it is empty."""
        path = self._queue_file
        if path is None:
            return
        if not self.pending:
            if path.is_file():
                path.unlink()
            shutil.rmtree(path.parent / "artifacts", ignore_errors=True)
            try:
                path.parent.rmdir()
            except OSError:
                pass
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            for op in self.pending:
                f.write(json.dumps(op, default=_plain) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    # ------------------------------------------------------------ writes, in order
    def _write(self, op: dict) -> None:
        """Apply ``op`` now, or queue it behind earlier writes while the server is away."""
        if self.pending and not self.flush():
            self._queue(op)
            return
        try:
            self._apply(op)
        except Exception as e:
            if tracking.is_reachable(self.uri):
                raise  # the server answers: a real error, not an outage
            self._queue(op)
            self._went_offline(e)

    def _queue(self, op: dict) -> None:
        self.pending.append(op)
        self._save()

    @staticmethod
    def _what(op: dict) -> str:
        return f"{op['op']} of trial {op.get('trial')}" + (f" at step {op['step']}" if op["op"] == "metrics" else "")

    def _went_offline(self, error: Exception) -> None:
        if self.offline_since is None:
            self.offline_since = time.monotonic()
            where = f" (kept in {self.queue_dir} until then)" if self.queue_dir is not None else ""
            print(f"warning: MLflow at {self.uri} stopped answering ({first_line(error, 160)}); the sweep goes on and writes its "
                  f"runs when it is back{where}", file=sys.stderr, flush=True)
        self._next_try = time.monotonic() + RETRY_EVERY_S

    def flush(self, force: bool = False) -> bool:
        """Replay the queued writes in order; True when none is left."""
        if not self.pending:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        if not tracking.is_reachable(self.uri):
            self._next_try = time.monotonic() + RETRY_EVERY_S
            return False
        while self.pending:
            op = self.pending[0]
            try:
                self._apply(op)
            except Exception as e:
                if not tracking.is_reachable(self.uri):
                    self._went_offline(e)
                    return False
                print(f"warning: MLflow write dropped ({self._what(op)}): {first_line(e)}", file=sys.stderr, flush=True)
            self.pending.pop(0)
            self._save()
        away = time.monotonic() - (self.offline_since or time.monotonic())
        print(f"[sweep] MLflow at {self.uri} answers again after {away:.0f}s: queued writes done", flush=True)
        self.offline_since = None
        return True

    def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the queued writes; PranceError when the server stays away."""
        deadline = time.monotonic() + timeout_s
        while not self.flush(force=True):
            if time.monotonic() > deadline:
                kept = f" (kept in {self.queue_dir})" if self.queue_dir is not None else ""
                raise PranceError(
                    f"MLflow at {self.uri} has not answered for {time.monotonic() - (self.offline_since or 0):.0f}s: "
                    f"{len(self.pending)} write(s) to the trials' runs are not in MLflow{kept}")
            time.sleep(min(RETRY_EVERY_S, max(0.1, deadline - time.monotonic())))

    def _stashed(self, folder: Path, name: str) -> Path:
        """A private folder holding a copy of ``folder/name``: beside the queue on disk,
        so that an upload still waiting when the driver dies is there on resume."""
        if self.queue_dir is not None:
            dest = self.queue_dir / "artifacts" / uuid.uuid4().hex[:12]
            dest.mkdir(parents=True)
        else:
            if self._stash is None:
                self._stash = Path(tempfile.mkdtemp(prefix="prance-mlflow-queue-"))
            dest = Path(tempfile.mkdtemp(dir=self._stash))
        shutil.copy2(folder / name, dest / name)
        return dest

    def _apply(self, op: dict) -> None:
        """Do one write. A write for a trial whose run does not exist does nothing (its
        run was never created: the end of the session writes it whole)."""
        kind, number = op["op"], op.get("trial")
        if kind == "create":
            if number not in self.run_ids:
                run = tracking.client(self.uri).create_run(self.experiment_id, run_name=op["run_name"], tags=op["tags"])
                self.run_ids[number] = run.info.run_id
            return
        run_id = self.run_ids.get(number)
        if kind == "artifact":
            if run_id is not None and Path(op["folder"]).is_dir():
                tracking.log_artifacts(self.uri, run_id, op["folder"], op["path"])
            shutil.rmtree(op["folder"], ignore_errors=True)
            return
        if run_id is None:
            return
        if kind == "params":
            tracking.log_batch(self.uri, run_id, params=op["params"])
        elif kind == "reopen":
            if number not in self.last_step:
                self.last_step[number] = self._logged_steps(run_id)
            tracking.set_status(self.uri, run_id, "RUNNING")
            parent = {tracking.PARENT_RUN_ID: op["parent"]} if op.get("parent") else {}  # a run made before runs nested
            tracking.log_batch(self.uri, run_id, tags={tracking.TAG_STATUS: "running", tracking.TAG_TRIAL: op["trial_id"], **parent})
        elif kind == "inputs":
            tracking.log_inputs(self.uri, run_id, op["datasets"])
        elif kind == "metrics":
            if number not in self.last_step:
                self.last_step[number] = self._logged_steps(run_id)
            if op["step"] <= self.last_step[number]:
                return
            tracking.log_batch(self.uri, run_id, metrics=op["metrics"], step=op["step"])
            self.last_step[number] = op["step"]
        elif kind == "final":
            tracking.log_batch(self.uri, run_id, metrics=op["metrics"], tags=op["tags"], step=op["step"])
        elif kind == "status":
            tracking.set_status(self.uri, run_id, op["status"])
        else:
            raise ValueError(f"unknown queued MLflow write {kind!r}")

    # ------------------------------------------------------------------- reading
    def refresh(self) -> None:
        runs = tracking.find_runs(self.uri, self.experiment_id, {tracking.TAG_SWEEP: self.sweep_id, tracking.TAG_KIND: TRIAL_KIND})
        runs.sort(key=lambda r: r.info.start_time or 0)
        for run in runs:
            number = int(run.data.tags[TAG_NUMBER])
            self.run_ids.setdefault(number, run.info.run_id)  # the oldest, were there ever two
            if self.run_ids[number] == run.info.run_id:
                self.status[number] = run.info.status
                self.tags[number] = dict(run.data.tags)

    def _logged_steps(self, run_id: str) -> int:
        return tracking.last_step(self.uri, run_id, STEP_METRIC)

    # ------------------------------------------------------------------ the runs
    def open_parent(self, name: str, params: dict[str, Any], inputs: list[dict] | None = None) -> str:
        """The sweep's parent run, RUNNING: created with the sweep's settings as params and
        ``inputs`` (:func:`prance.splits.inputs` records) when the sweep starts, found again
        by its tags on resume (the same parent, whatever session). Trial runs opened after
        this nest under it; it becomes the summary run at the end (:meth:`summary`)."""
        found = tracking.find_runs(self.uri, self.experiment_id, {tracking.TAG_SWEEP: self.sweep_id, tracking.TAG_KIND: SUMMARY_KIND})
        if found:
            self.parent_id = found[0].info.run_id
            tracking.set_status(self.uri, self.parent_id, "RUNNING")
        else:
            run = tracking.client(self.uri).create_run(self.experiment_id, run_name=name,
                                                       tags={tracking.TAG_KIND: SUMMARY_KIND, tracking.TAG_SWEEP: self.sweep_id})
            self.parent_id = run.info.run_id
            tracking.log_batch(self.uri, self.parent_id, params=params)
        tracking.log_inputs(self.uri, self.parent_id, inputs or [])
        return self.parent_id

    def open(self, number: int, trial_id: str, run_name: str, params: dict[str, Any], tags: dict[str, Any],
             inputs: list[dict] | None = None) -> None:
        """The trial's run, RUNNING: created with its params, tags (nested under the parent
        run, when one is open) and dataset ``inputs``, or reopened (a retried trial, or a
        resumed sweep)."""
        parent = {tracking.PARENT_RUN_ID: self.parent_id} if self.parent_id else {}
        if number not in self.run_ids:
            all_tags = {tracking.TAG_KIND: TRIAL_KIND, tracking.TAG_SWEEP: self.sweep_id, tracking.TAG_TRIAL: trial_id,
                        TAG_NUMBER: str(number), **parent, **{k: str(v) for k, v in tags.items()}}
            self._write({"op": "create", "trial": number, "run_name": run_name, "tags": all_tags})
            self._write({"op": "params", "trial": number, "params": {k: str(v)[:6000] for k, v in params.items()}})
            self.last_step.setdefault(number, -1)
        else:
            self._write({"op": "reopen", "trial": number, "trial_id": trial_id, "parent": self.parent_id})
        if inputs:
            self._write({"op": "inputs", "trial": number, "datasets": list(inputs)})
        self.status[number] = "RUNNING"

    def log(self, number: int, metrics: dict[str, Any], step: int) -> None:
        """Per-iteration metrics; a step already logged (a trial restored from an older
        checkpoint) is not logged again."""
        self._write({"op": "metrics", "trial": number, "metrics": dict(metrics), "step": int(step)})

    def close(self, number: int, status: str, outcome: str, metrics: dict[str, Any] | None = None,
              tags: dict[str, Any] | None = None, step: int = 0, artifacts: Path | None = None) -> None:
        """Final metrics, the artifacts folder, ``prance.status`` = outcome, then the run status."""
        if number not in self.run_ids and not self.pending:
            return
        self._write({"op": "final", "trial": number, "metrics": dict(metrics or {}),
                     "tags": {tracking.TAG_STATUS: outcome, **{k: str(v) for k, v in (tags or {}).items()}}, "step": int(step)})
        if artifacts is not None:
            # the selector only (its training state is for resuming, not for MLflow), copied:
            # the trial's checkpoint folder may be gone when a queued upload runs
            self._write({"op": "artifact", "trial": number, "folder": str(self._stashed(artifacts, SELECTOR_FILE)),
                         "path": "selector"})
        self._write({"op": "status", "trial": number, "status": status})
        self.status[number] = status
        self.tags.setdefault(number, {})[tracking.TAG_STATUS] = outcome

    def close_running(self, outcome: str = "interrupted") -> list[int]:
        """KILLED for every run of the sweep still RUNNING (its trial was interrupted)."""
        self.refresh()
        closed = []
        for number, status in list(self.status.items()):
            if status == "RUNNING":
                self.close(number, "KILLED", outcome)
                closed.append(number)
        return closed

    def reconcile(self, number: int, run_name: str, params: dict[str, Any], tags: dict[str, Any], metrics: dict[str, Any],
                  outcome: str, step: int, inputs: list[dict] | None = None) -> bool:
        """Make the run of a trial that Tune knows as ended say so: created with its final
        metrics when no run was ever written for it, closed when it was left RUNNING or
        KILLED (the driver died between the trial's end and its callback). True when
        something was written."""
        status = "FAILED" if outcome == "error" else "FINISHED"
        if number in self.run_ids and self.status.get(number) == status:
            return False
        if number not in self.run_ids:
            self.open(number, str(tags.get(tracking.TAG_TRIAL, "")), run_name, params,
                      {k: v for k, v in tags.items() if k != tracking.TAG_TRIAL}, inputs)
        self.log(number, metrics, step)  # a step already logged is not logged again
        self.close(number, status, outcome, step=step)
        return True

    def outcome(self, number: int) -> str | None:
        return self.tags.get(number, {}).get(tracking.TAG_STATUS)

    def summary(self, name: str, params: dict[str, Any], files: list[Path], metrics: dict[str, Any], tags: dict[str, Any]) -> str:
        """The sweep's parent run (:meth:`open_parent`, created here when it was not)
        with the summary: metrics, tags, the files; FINISHED."""
        run_id = self.parent_id or self.open_parent(name, params)
        tracking.log_batch(self.uri, run_id, metrics=metrics, tags=tags)
        for f in files:
            tracking.log_artifact(self.uri, run_id, f)
        tracking.set_status(self.uri, run_id, "FINISHED")
        return run_id

"""A sweep's MLflow runs, driven from the Ray driver only (no trial talks to MLflow).

One experiment per sweep; one run per Tune trial, found again by its tags (sweep id +
trial number) so that a resumed sweep reuses it instead of creating a duplicate; one
summary run with the results table and the plot. Every run a session opened is closed
by the end of that session: FINISHED, FAILED, or KILLED when the sweep was interrupted
(and reopened when the resumed sweep runs that trial again).

An MLflow server that stops answering does not stop the sweep: every write is an
operation queued in order and retried (``flush``) once the server answers again; the
driver waits for it at the end (:meth:`SweepRuns.drain`). Per-iteration metrics are
written once per step: a trial restored from an older checkpoint than its last logged
step does not log that step again.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from prance import tracking
from prance.errors import PranceError, first_line
from prance.selector.store import SELECTOR_FILE

TRIAL_KIND = "sweep-trial"
SUMMARY_KIND = "sweep-summary"
TAG_NUMBER = "prance.trial_number"
STEP_METRIC = "score"  # every trial report carries it: its history tells the last step logged
RETRY_EVERY_S = 5.0  # while the server is away, how often a write checks whether it is back


class SweepRuns:
    def __init__(self, uri: str, experiment_id: str, sweep_id: str):
        self.uri, self.experiment_id, self.sweep_id = uri, experiment_id, sweep_id
        self.run_ids: dict[int, str] = {}  # trial number -> run id
        self.status: dict[int, str] = {}  # trial number -> MLflow status
        self.tags: dict[int, dict] = {}
        self.last_step: dict[int, int] = {}  # trial number -> last per-iteration step logged
        self.pending: list[tuple[str, Callable[[], None]]] = []  # writes waiting for the server, in order
        self.offline_since: float | None = None
        self._next_try = 0.0
        self._stash: Path | None = None  # copies of artifact folders whose upload waits
        self.refresh()

    # ------------------------------------------------------------ writes, in order
    def _write(self, what: str, op: Callable[[], None]) -> None:
        """Run ``op`` now, or queue it behind earlier writes while the server is away."""
        if self.pending and not self.flush():
            self.pending.append((what, op))
            return
        try:
            op()
        except Exception as e:
            if tracking.is_reachable(self.uri):
                raise  # the server answers: a real error, not an outage
            self.pending.append((what, op))
            self._went_offline(e)

    def _went_offline(self, error: Exception) -> None:
        if self.offline_since is None:
            self.offline_since = time.monotonic()
            print(f"warning: MLflow at {self.uri} stopped answering ({first_line(error, 160)}); the sweep goes on and writes its "
                  "runs when it is back", file=sys.stderr, flush=True)
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
            what, op = self.pending[0]
            try:
                op()
            except Exception as e:
                if tracking.is_reachable(self.uri):
                    print(f"warning: MLflow write dropped ({what}): {e}", file=sys.stderr, flush=True)
                    self.pending.pop(0)
                    continue
                self._went_offline(e)
                return False
            self.pending.pop(0)
        away = time.monotonic() - (self.offline_since or time.monotonic())
        print(f"[sweep] MLflow at {self.uri} answers again after {away:.0f}s: queued writes done", flush=True)
        self.offline_since = None
        return True

    def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the queued writes; PranceError when the server stays away."""
        deadline = time.monotonic() + timeout_s
        while not self.flush(force=True):
            if time.monotonic() > deadline:
                raise PranceError(
                    f"MLflow at {self.uri} has not answered for {time.monotonic() - (self.offline_since or 0):.0f}s: "
                    f"{len(self.pending)} write(s) to the trials' runs are not in MLflow")
            time.sleep(min(RETRY_EVERY_S, max(0.1, deadline - time.monotonic())))

    def _stashed(self, folder: Path, name: str) -> Path:
        """A private folder holding a copy of ``folder/name``."""
        if self._stash is None:
            self._stash = Path(tempfile.mkdtemp(prefix="prance-mlflow-queue-"))
        dest = Path(tempfile.mkdtemp(dir=self._stash))
        shutil.copy2(folder / name, dest / name)
        return dest

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
    def open(self, number: int, trial_id: str, run_name: str, params: dict[str, Any], tags: dict[str, Any]) -> None:
        """The trial's run, RUNNING: created with its params and tags, or reopened (a
        retried trial, or a resumed sweep)."""
        if number not in self.run_ids:
            all_tags = {tracking.TAG_KIND: TRIAL_KIND, tracking.TAG_SWEEP: self.sweep_id, tracking.TAG_TRIAL: trial_id,
                        TAG_NUMBER: str(number), **{k: str(v) for k, v in tags.items()}}

            def create() -> None:
                if number in self.run_ids:
                    return
                run = tracking.client(self.uri).create_run(self.experiment_id, run_name=run_name, tags=all_tags)
                self.run_ids[number] = run.info.run_id

            self._write(f"create run of trial {number}", create)
            self._write(f"params of trial {number}", lambda: tracking.log_batch(self.uri, self.run_ids[number], params=params))
            self.last_step.setdefault(number, -1)
        else:
            run_id = self.run_ids[number]

            def reopen() -> None:
                if number not in self.last_step:
                    self.last_step[number] = self._logged_steps(run_id)
                tracking.set_status(self.uri, run_id, "RUNNING")
                tracking.log_batch(self.uri, run_id, tags={tracking.TAG_STATUS: "running", tracking.TAG_TRIAL: trial_id})

            self._write(f"reopen run of trial {number}", reopen)
        self.status[number] = "RUNNING"

    def log(self, number: int, metrics: dict[str, Any], step: int) -> None:
        """Per-iteration metrics; a step already logged (a trial restored from an older
        checkpoint) is not logged again."""

        def write() -> None:
            if number not in self.run_ids:
                return
            if number not in self.last_step:
                self.last_step[number] = self._logged_steps(self.run_ids[number])
            if step <= self.last_step[number]:
                return
            tracking.log_batch(self.uri, self.run_ids[number], metrics=metrics, step=step)
            self.last_step[number] = step

        self._write(f"metrics of trial {number} at step {step}", write)

    def close(self, number: int, status: str, outcome: str, metrics: dict[str, Any] | None = None,
              tags: dict[str, Any] | None = None, step: int = 0, artifacts: Path | None = None) -> None:
        """Final metrics, the artifacts folder, ``prance.status`` = outcome, then the run status."""
        if number not in self.run_ids and not self.pending:
            return

        def final() -> None:
            if number in self.run_ids:
                tracking.log_batch(self.uri, self.run_ids[number], metrics=metrics or {},
                                   tags={tracking.TAG_STATUS: outcome, **(tags or {})}, step=step)

        self._write(f"final metrics of trial {number}", final)
        if artifacts is not None:
            # the selector only (its training state is for resuming, not for MLflow), copied:
            # the trial's checkpoint folder may be gone when a queued upload runs
            folder = self._stashed(artifacts, SELECTOR_FILE)

            def upload() -> None:
                if number in self.run_ids:
                    tracking.log_artifacts(self.uri, self.run_ids[number], folder, "selector")
                shutil.rmtree(folder, ignore_errors=True)

            self._write(f"selector artifact of trial {number}", upload)
        self._write(f"status of trial {number}",
                    lambda: tracking.set_status(self.uri, self.run_ids[number], status) if number in self.run_ids else None)
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
                  outcome: str, step: int) -> bool:
        """Make the run of a trial that Tune knows as ended say so: created with its final
        metrics when no run was ever written for it, closed when it was left RUNNING or
        KILLED (the driver died between the trial's end and its callback). True when
        something was written."""
        status = "FAILED" if outcome == "error" else "FINISHED"
        if number in self.run_ids and self.status.get(number) == status:
            return False
        if number not in self.run_ids:
            self.open(number, str(tags.get(tracking.TAG_TRIAL, "")), run_name, params,
                      {k: v for k, v in tags.items() if k != tracking.TAG_TRIAL})
        self.log(number, metrics, step)  # a step already logged is not logged again
        self.close(number, status, outcome, step=step)
        return True

    def outcome(self, number: int) -> str | None:
        return self.tags.get(number, {}).get(tracking.TAG_STATUS)

    def summary(self, name: str, params: dict[str, Any], files: list[Path], metrics: dict[str, Any], tags: dict[str, Any]) -> str:
        """The sweep's summary run (created once, updated on resume), FINISHED."""
        found = tracking.find_runs(self.uri, self.experiment_id, {tracking.TAG_SWEEP: self.sweep_id, tracking.TAG_KIND: SUMMARY_KIND})
        if found:
            run_id = found[0].info.run_id
            tracking.set_status(self.uri, run_id, "RUNNING")
        else:
            run = tracking.client(self.uri).create_run(
                self.experiment_id, run_name=f"{name}-summary",
                tags={tracking.TAG_KIND: SUMMARY_KIND, tracking.TAG_SWEEP: self.sweep_id})
            run_id = run.info.run_id
            tracking.log_batch(self.uri, run_id, params=params)
        tracking.log_batch(self.uri, run_id, metrics=metrics, tags=tags)
        for f in files:
            tracking.log_artifact(self.uri, run_id, f)
        tracking.set_status(self.uri, run_id, "FINISHED")
        return run_id

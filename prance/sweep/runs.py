"""A sweep's MLflow runs, driven from the Ray driver only (no trial talks to MLflow).

One experiment per sweep; one run per Tune trial, found again by its tags (sweep id +
trial number) so that a resumed sweep reuses it instead of creating a duplicate; one
summary run with the results table and the plot. Every run a session opened is closed
by the end of that session: FINISHED, FAILED, or KILLED when the sweep was interrupted
(and reopened when the resumed sweep runs that trial again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prance import tracking

TRIAL_KIND = "sweep-trial"
SUMMARY_KIND = "sweep-summary"
TAG_NUMBER = "prance.trial_number"


class SweepRuns:
    def __init__(self, uri: str, experiment_id: str, sweep_id: str):
        self.uri, self.experiment_id, self.sweep_id = uri, experiment_id, sweep_id
        self.run_ids: dict[int, str] = {}  # trial number -> run id
        self.status: dict[int, str] = {}  # trial number -> MLflow status
        self.tags: dict[int, dict] = {}
        self.refresh()

    def refresh(self) -> None:
        runs = tracking.find_runs(self.uri, self.experiment_id, {tracking.TAG_SWEEP: self.sweep_id, tracking.TAG_KIND: TRIAL_KIND})
        runs.sort(key=lambda r: r.info.start_time or 0)
        for run in runs:
            number = int(run.data.tags[TAG_NUMBER])
            self.run_ids.setdefault(number, run.info.run_id)  # the oldest, were there ever two
            if self.run_ids[number] == run.info.run_id:
                self.status[number] = run.info.status
                self.tags[number] = dict(run.data.tags)

    def open(self, number: int, trial_id: str, run_name: str, params: dict[str, Any], tags: dict[str, Any]) -> str:
        """The trial's run, RUNNING: created with its params and tags, or reopened."""
        run_id = self.run_ids.get(number)
        if run_id is None:
            all_tags = {tracking.TAG_KIND: TRIAL_KIND, tracking.TAG_SWEEP: self.sweep_id, tracking.TAG_TRIAL: trial_id,
                        TAG_NUMBER: str(number), **{k: str(v) for k, v in tags.items()}}
            run = tracking.client(self.uri).create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            run_id = run.info.run_id
            tracking.log_batch(self.uri, run_id, params=params)
            self.run_ids[number] = run_id
        else:
            tracking.set_status(self.uri, run_id, "RUNNING")
            tracking.log_batch(self.uri, run_id, tags={tracking.TAG_STATUS: "running", tracking.TAG_TRIAL: trial_id})
        self.status[number] = "RUNNING"
        return run_id

    def log(self, number: int, metrics: dict[str, Any], step: int) -> None:
        if number in self.run_ids:
            tracking.log_batch(self.uri, self.run_ids[number], metrics=metrics, step=step)

    def close(self, number: int, status: str, outcome: str, metrics: dict[str, Any] | None = None,
              tags: dict[str, Any] | None = None, step: int = 0, artifacts: Path | None = None) -> None:
        """Final metrics, the artifacts folder, ``prance.status`` = outcome, then the run status."""
        run_id = self.run_ids.get(number)
        if run_id is None:
            return
        tracking.log_batch(self.uri, run_id, metrics=metrics or {}, tags={tracking.TAG_STATUS: outcome, **(tags or {})}, step=step)
        if artifacts is not None:
            tracking.log_artifacts(self.uri, run_id, artifacts, "selector")
        tracking.set_status(self.uri, run_id, status)
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

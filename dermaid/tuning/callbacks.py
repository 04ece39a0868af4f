"""The Tune callback of a search (it runs in the tuning driver): keeps DIR/results.csv current while trials
run, logs trial starts and ends to DIR/trials.log, and frees the worker placement groups of trials Tune
stopped. Imported only once Ray is in use (it subclasses ray.tune.Callback)."""

from __future__ import annotations

import datetime as _dt
import time

from ray.tune import Callback

from dermaid.files import exists, join, read_text, write_text
from dermaid.tuning.layout import TRIALS_LOG
from dermaid.tuning.results import trial_row, write_results

ORPHAN_SWEEP_S = 120.0  # after a trial stops, look this long for its worker placement group to free
SWEEP_EVERY_S = 2.0     # how often to look meanwhile


class TuningCallback(Callback):
    """DIR/results.csv as trials end, DIR/trials.log events, and placement groups of stopped trials freed."""

    def __init__(self, out: str, metric: str, mode: str, keys: list[str]) -> None:
        self.out, self.metric, self.mode, self.keys = out, metric, mode, keys
        self._sweep_until = 0.0
        self._last_sweep = 0.0

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._log(f"start {trial.trial_id}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._log(f"end {trial.trial_id}")
        self._write(trials)
        self._sweep_until = time.monotonic() + ORPHAN_SWEEP_S

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._log(f"error {trial.trial_id}")
        self._write(trials)
        self._sweep_until = time.monotonic() + ORPHAN_SWEEP_S

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        # a stopped trial's actor takes a moment to die; sweep every few seconds for a while after each stop
        now = time.monotonic()
        if now < self._sweep_until and now - self._last_sweep >= SWEEP_EVERY_S:
            self._last_sweep = now
            release_orphaned_placement_groups()

    def on_experiment_end(self, trials: list, **info) -> None:
        self._write(trials)
        release_orphaned_placement_groups()

    def _write(self, trials: list) -> None:
        events = read_trial_events(self.out)
        rows = [trial_row(self.out, t.trial_id, events.get(t.trial_id), str(t.status), t.config, self.metric,
                          self.mode, self.keys) for t in trials]
        write_results(self.out, rows)

    def _log(self, event: str) -> None:
        url = join(self.out, TRIALS_LOG)
        previous = read_text(url) if exists(url) else ""
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        write_text(url, previous + f"{stamp} {event}\n")


def read_trial_events(out: str) -> dict[str, str]:
    """trial_id -> its last event in DIR/trials.log ("start", "end" or "error"); survives a resume."""
    url = join(out, TRIALS_LOG)
    events: dict[str, str] = {}
    for line in (read_text(url).splitlines() if exists(url) else []):
        parts = line.split()
        if len(parts) == 3:
            events[parts[2]] = parts[1]
    return events


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor has died; returns how many.

    When Tune stops a trial (ASHA, time budget, Ctrl-C) it ends the trial's actor, and with it the
    Train controller; the worker placement group it created would stay reserved until this job ends
    (Ray frees a non-detached group only once both its creator and its job are dead). Train's own
    PlacementGroupCleaner asks the State API, which needs the dashboard and a single Ray instance per
    machine; this reads the GCS placement-group table directly (creator_actor_dead).
    """
    import ray
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    from dermaid.ray_compat import placement_group_table

    job_id = ray.get_runtime_context().get_job_id()
    removed = 0
    try:
        table = placement_group_table()
    except Exception:  # a private API: never let bookkeeping break a search
        return 0
    for data in table:
        creator_is_actor = bool(data.creator_actor_id.strip(b"\x00")) and bool(data.creator_actor_id.strip(b"\xff"))
        if (data.state == gcs_pb2.PlacementGroupTableData.REMOVED or data.is_detached or not creator_is_actor
                or not data.creator_actor_dead or data.creator_job_id.hex() != job_id):
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(data.placement_group_id)))
            removed += 1
        except Exception:
            pass
    return removed

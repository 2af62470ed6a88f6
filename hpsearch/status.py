"""``hpsearch status``: where a search stands, read from its files only (never Ray).

The driver notes itself in the state file when it starts (pid, host, time) and when it ends (time,
why it stopped, if it did); with the trial log that says everything: running / finished /
interrupted / failed, the trials by status, the running ones with their epoch and metric, the best
so far, the time it has run and an estimate of what is left.

``--json`` prints :meth:`Status.to_dict`: ``{"location", "name", "state", "num_samples",
"trials": {status: count}, "running": [{"trial_id", "epoch", "value"}], "metric", "best":
{"trial_id", "epoch", "value", "hyperparameters"} | null, "elapsed_s", "eta_s" | null}``.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpsearch.record import outputs, trial_log
from hpsearch.record.trial_log import StopReason, TrialStatus, is_finite
from hpsearch.report import Search

STATES = ("not started", "running", "finished", "interrupted", "failed")
# A driver on another host is taken for running while its trial log changed this recently.
STALE_S = 300


@dataclass
class Status:
    location: str
    name: str
    state: str  # one of STATES
    num_samples: int
    metric: str
    trials: dict[str, int] = field(default_factory=dict)
    running: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_status(location: str | Path, *, now: float | None = None) -> Status:
    """The status of the search at ``location`` (its folder or URI)."""
    now = time.time() if now is None else now
    search = Search.read(location)
    job, records = search.job, search.records
    metric, mode = job.search.metric, job.search.mode
    state = _state(search, now)
    counts = trial_log.count_statuses(records)
    running = [{"trial_id": r.trial_id, "epoch": int(r.epochs[-1]["epoch"]) if r.epochs else 0,
                "value": r.epochs[-1].get(metric) if r.epochs else None}
               for r in records if r.status is TrialStatus.INTERRUPTED] if state == "running" else []
    chosen = trial_log.choose_best(records, metric=metric, mode=mode)
    best = None
    if chosen:
        record, epoch = chosen
        best = {"trial_id": record.trial_id, "epoch": int(epoch["epoch"]), "value": float(epoch[metric]),
                "hyperparameters": record.hyperparameters}
    times = [e["time"] for e in search.events if is_finite(e.get("time"))]
    elapsed = ((now if state == "running" else max(times)) - min(times)) if times else 0.0
    return Status(location=search.where.experiment, name=job.name, state=state, num_samples=job.search.num_samples,
                  metric=metric, trials=counts, running=running, best=best, elapsed_s=round(elapsed, 1),
                  eta_s=_eta(search, state, elapsed))


def _state(search: Search, now: float) -> str:
    state = trial_log.read_state(search.where.local)
    driver, ended = state.get("driver") or {}, state.get("ended")
    if not search.events and not driver:
        return "not started"
    if ended and ended >= driver.get("started", 0):
        reason = state.get("stop_reason")
        if reason is None:
            return "finished"
        return "failed" if reason == StopReason.FAILURE_LIMIT.value else "interrupted"
    log = search.where.local / trial_log.LOG_FILE
    if not driver:  # written before drivers noted themselves: its tables say whether it ended
        tables = search.where.local / outputs.TRIALS_FILE
        return "finished" if tables.is_file() and tables.stat().st_mtime >= log.stat().st_mtime else "interrupted"
    if driver.get("host") == socket.gethostname():
        return "running" if _alive(driver.get("pid")) else "interrupted"
    fresh = log.is_file() and now - log.stat().st_mtime < STALE_S
    return "running" if fresh else "interrupted"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _eta(search: Search, state: str, elapsed: float) -> float | None:
    """Seconds left: the time budget's rest, or the pace of the trials so far (None when unknown)."""
    if state != "running":
        return None
    budget = search.job.search.time_budget_s
    ended = sum(1 for r in search.records if r.status is not TrialStatus.INTERRUPTED)
    left = search.job.search.num_samples - ended
    pace = elapsed / ended * left if ended else None
    if budget:
        return round(max(0.0, min(budget - elapsed, pace if pace is not None else budget)), 1)
    return round(pace, 1) if pace is not None else None


def describe(status: Status) -> list[str]:
    """The status as lines for the terminal."""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(status.trials.items())) or "none yet"
    lines = [f"{status.name}: {status.state} ({status.location})",
             f"trials: {sum(status.trials.values())} of {status.num_samples}: {counts}",
             f"elapsed: {status.elapsed_s:.0f} s" + (f", about {status.eta_s:.0f} s left" if status.eta_s is not None
                                                   else "")]
    for r in status.running:
        value = f"{status.metric} {r['value']:.4f}" if is_finite(r.get("value")) else "no epoch yet"
        lines.append(f"  running {r['trial_id']}: epoch {r['epoch']}, {value}")
    if status.best:
        b = status.best
        lines.append(f"best so far: trial {b['trial_id']} (epoch {b['epoch']}, {status.metric} {b['value']:.4f})")
    return lines

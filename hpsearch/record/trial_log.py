"""The trial log: hpsearch's own record of what every trial did, and what it folds into.

``hpsearch_trials.jsonl`` in the search folder holds one JSON object per line, appended by the
driver as Tune reports (:class:`hpsearch.tune.callbacks.SearchCallback` writes it):

- ``{"event": "start", "trial_id", "config", "path"}``: a trial started (again, on a resume);
- ``{"event": "result", "trial_id", <RESULT_KEYS>}``: one epoch's metrics;
- ``{"event": "retry", "trial_id", "error"}``: it crashed and continues from its checkpoint;
- ``{"event": "end", "trial_id", "status", "error"[, "reason"]}``: how it ended;
- ``{"event": "trials", "ids"}``: the trials Tune knew when ``fit()`` returned.

Every event has a ``time``. Ray's own persisted trial status is not trusted (a trial lost with its
node stays RUNNING there): this log is what the tables, MLflow's statuses and the summary come from.
"""

from __future__ import annotations

import enum
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from hpsearch.hyperparameters import HyperparameterSet, resolve_hyperparameters
from hpsearch.record import checkpoints
from hpsearch.record.location import join, trial_dirname
from hpsearch.spec import JobSpec

LOG_FILE = "hpsearch_trials.jsonl"
# The driver's state: MLflow's URI and parent run id (for a resume); the driver that runs the
# search ({"pid", "host", "started"}), and when it ended and why ("ended", "stop_reason": a
# StopReason's value or null), for `hpsearch status`.
STATE_FILE = "hpsearch_state.json"

# What a trial reports each epoch (hpsearch.trainable) and the log keeps of it.
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy")
# worker_pid: the process that ran the epoch (with node_id: where a retried trial went on).
# A result a trial reports again, that the record has already (see hpsearch.tune.trial.run_trial).
REPLAYED = "replayed"
RESULT_KEYS = ("epoch", *EPOCH_METRICS, "diverged", "epoch_time_s", "time_total_s", "timestamp", "node_id", "node_ip",
               "worker_pid")


class TrialStatus(str, enum.Enum):
    """How a trial came out; the value is what the log, the tables and MLflow's tag spell."""

    COMPLETED = "completed"  # trained all its planned epochs
    STOPPED_EARLY = "stopped early"  # ASHA stopped it at a rung, or the time budget did
    FAILED = "failed"  # raised, and its retries too
    DIVERGED = "diverged"  # a non-finite training loss: never the best
    NOT_RUN = "not run"  # ended without reporting an epoch
    INTERRUPTED = "interrupted"  # still running when the search was stopped: continues on resume
    DISCARDED = "discarded"  # MLflow only: a run of no trial of the search (a killed driver's duplicate)

    def __str__(self) -> str:
        return self.value


class StopReason(str, enum.Enum):
    """Why a search ended before all its trials did (a finished search has none)."""

    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM, a killed driver: `hpsearch resume` continues it
    INTERRUPTED_IN_FINAL = "interrupted during the final retraining"  # the trials are all done
    FAILURE_LIMIT = "failure limit"  # search.max_failed_trials trials failed
    STORAGE_FULL = "storage full"  # the storage's disk (nearly) full: free space, then resume

    def __str__(self) -> str:
        return self.value

    @property
    def exit_code(self) -> int:
        """The command's exit code: 130 for a stop one resumes (as for Ctrl-C), 1 for a failure
        (too many failed trials, or a full storage: free space, then resume)."""
        return 1 if self in (StopReason.FAILURE_LIMIT, StopReason.STORAGE_FULL) else 130


def trial_status(config: Mapping[str, Any], last: Mapping[str, Any] | None, error: str | None) -> TrialStatus:
    """How a trial that ended came out, from its config, last reported result and error."""
    if error:
        return TrialStatus.FAILED
    if not last:
        return TrialStatus.NOT_RUN
    if last.get("diverged"):
        return TrialStatus.DIVERGED
    if int(last.get("epoch", 0)) < int(resolve_hyperparameters(config)["epochs"]):
        return TrialStatus.STOPPED_EARLY
    return TrialStatus.COMPLETED


@dataclass
class TrialRecord:
    """What one trial did, as plain data folded from the log."""

    trial_id: str
    config: dict[str, Any]
    epochs: list[dict[str, Any]] = field(default_factory=list)  # one reported result per epoch
    error: str | None = None
    checkpoints: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (folder, its result)
    ended: bool = True  # False: still running when the search stopped (it continues on resume)
    # The hyperparameters shown: those this model kind (or this job, JobSpec.hyperparameters) uses.
    used: str | HyperparameterSet | None = None

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return resolve_hyperparameters(self.config, self.used)

    @property
    def status(self) -> TrialStatus:
        if not self.ended and not self.error:
            return TrialStatus.INTERRUPTED
        return trial_status(self.config, self.epochs[-1] if self.epochs else None, self.error)

    @property
    def scored(self) -> bool:
        """Whether its epochs' values count (a failed or diverged trial's never do)."""
        return self.status not in (TrialStatus.FAILED, TrialStatus.DIVERGED)

    def best_epoch(self, metric: str, mode: str) -> dict[str, Any] | None:
        finite = [e for e in self.epochs if is_finite(e.get(metric))]
        if not finite or not self.scored:
            return None
        pick = max if mode == "max" else min
        return pick(finite, key=lambda e: e[metric])

    def best_checkpoint(self, *, metric: str, mode: str) -> str | None:
        """The kept checkpoint with the best ``metric`` (Tune keeps the best ones and the latest)."""
        return checkpoints.best(self.checkpoints, metric=metric, mode=mode)


def is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def count_statuses(records: Iterable[TrialRecord]) -> dict[str, int]:
    """Trials by status, spelled as the tables spell them (``{"completed": 3, "stopped early": 5}``)."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status.value] = counts.get(r.status.value, 0) + 1
    return counts


def choose_best(records: Iterable[TrialRecord], *, metric: str, mode: str) -> tuple[TrialRecord, dict[str, Any]] | None:
    """The trial (and epoch) with the best value of ``metric``; failed and diverged trials never win."""
    candidates = [(r, e) for r in records if (e := r.best_epoch(metric, mode)) is not None]
    if not candidates:
        return None
    pick = max if mode == "max" else min
    return pick(candidates, key=lambda item: item[1][metric])


# --------------------------------------------------------------------------------------------
# The log's lines.
# --------------------------------------------------------------------------------------------


def append_event(path: Path, event: dict[str, Any]) -> None:
    """One line of the trial log (on a line of its own after a line a killed driver cut short)."""
    event.setdefault("time", time.time())
    line = (json.dumps(event, default=str) + "\n").encode()
    with open(path, "ab+") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed driver: the rest is intact
    return events


TRACKING_LOST, TRACKING_CAUGHT_UP = "tracking_lost", "tracking_caught_up"  # MLflow's server went away, came back


def tracking_lost(log_path: Path) -> dict[str, Any] | None:
    """The last time MLflow's server was lost during a search and not caught up since, if any."""
    lost = None
    for e in read_events(log_path):
        if e["event"] == TRACKING_LOST:
            lost = e
        elif e["event"] == TRACKING_CAUGHT_UP:
            lost = None
    return lost


def recover_cut_epochs(log_path: Path, *, experiment: str) -> list[tuple[str, dict[str, Any]]]:
    """Put back in the log the epochs a killed driver never logged, from their checkpoints.

    The trial checkpoints an epoch (its metrics beside its state) before the driver hears of it;
    a driver killed in between loses that epoch's line, and the resumed trial goes on from the
    checkpoint, after it. Run before Tune resumes (which may delete the checkpoint). Returns the
    (trial id, result) put back, each logged with ``recovered: true``.
    """
    events = read_events(log_path)
    logged = {(e.get("trial_id"), int(e.get("epoch") or 0)) for e in events if e["event"] == "result"}
    started = list(dict.fromkeys(e["trial_id"] for e in events if e["event"] == "start"))
    recovered = []
    for tid in started:
        for _, metrics in checkpoints.with_metrics(join(experiment, trial_dirname(tid))):
            epoch = int(metrics.get("epoch") or 0)
            if epoch and (tid, epoch) not in logged:
                result = {k: metrics.get(k) for k in RESULT_KEYS}
                append_event(log_path, {"event": "result", "trial_id": tid, **result, "recovered": True})
                logged.add((tid, epoch))
                recovered.append((tid, result))
    return recovered


def last_results_of_ended(path: Path, *, metric: str) -> dict[str, dict[str, Any]]:
    """Trial id -> the last result of every trial the log saw end, ``metric`` always in it (NaN
    when the trial never reported one): what such a trial reports again when Tune, restoring from
    a snapshot older than its end, runs it once more (see hpsearch.tune.trial.run_trial)."""
    last: dict[str, dict[str, Any]] = {}
    for e in read_events(path):
        if e["event"] == "result":
            last[e["trial_id"]] = {k: e.get(k) for k in RESULT_KEYS if e.get(k) is not None}
    return {tid: {"epoch": 0, **last.get(tid, {}), metric: last.get(tid, {}).get(metric, math.nan)}
            for tid in ended_trials(path)}


def ended_trials(path: Path) -> dict[str, TrialStatus]:
    """Trial id -> status of every trial the log saw end (and not start again since)."""
    ended: dict[str, TrialStatus] = {}
    for e in read_events(path):
        if e["event"] == "start":
            ended.pop(e["trial_id"], None)
        elif e["event"] == "end":
            ended[e["trial_id"]] = TrialStatus(e["status"])
    return ended


def fold(log_path: Path, *, experiment: str, used: str | HyperparameterSet | None = None) -> list[TrialRecord]:
    """Fold the log into one record per trial (epochs de-duplicated across retries and resumes),
    each with its whole checkpoints in ``experiment`` (``<storage>/<name>``, a path or a URI).

    Left out: orphans, trials a killed driver started that Tune did not know after its restore
    (new trials replaced them, so they are no trials of the search).
    """
    by_id: dict[str, TrialRecord] = {}
    epochs: dict[str, dict[int, dict[str, Any]]] = {}
    known: set[str] | None = None
    for e in read_events(log_path):
        tid = e.get("trial_id")
        if e["event"] == "start":
            rec = by_id.setdefault(tid, TrialRecord(trial_id=tid, config=e["config"], used=used))
            rec.error, rec.ended = None, False  # a resumed trial starts its outcome over
        elif e["event"] == "trials":
            known = set(e["ids"])
        elif tid not in by_id:
            continue
        elif e["event"] == "result":
            epochs.setdefault(tid, {})[int(e.get("epoch") or 0)] = e
        elif e["event"] == "end":
            by_id[tid].error, by_id[tid].ended = e.get("error"), True
    for tid, rec in by_id.items():
        rec.epochs = [epochs.get(tid, {})[k] for k in sorted(epochs.get(tid, {}))]
        rec.checkpoints = checkpoints.with_metrics(join(experiment, trial_dirname(tid)))
    return [r for tid, r in by_id.items() if known is None or tid in known]


def fold_search(log_path: Path, job: JobSpec, *, experiment: str, fit_s: float
                ) -> tuple[list[TrialRecord], StopReason | None, str | None]:
    """The trials' records after ``fit()`` ran for ``fit_s`` seconds, why the search stopped early
    (None: it finished) and a note for users (how the time budget ended it)."""
    records = fold(log_path, experiment=experiment, used=job.hyperparameters)
    budget = job.search.time_budget_s
    budget_hit = bool(budget) and fit_s >= budget * 0.98
    if budget_hit:
        # The time budget ends the search: the trials it cut short are over (stopped early, or not
        # run), not interrupted; the search is finished, not waiting for a resume.
        end_cut_short(log_path, records, "time budget")
    statuses = [r.status for r in records]
    limit = job.search.max_failed_trials
    reason = note = None
    if limit is not None and statuses.count(TrialStatus.FAILED) >= limit:
        reason = StopReason.FAILURE_LIMIT
    elif TrialStatus.INTERRUPTED in statuses or (len(records) < job.search.num_samples and not budget_hit):
        reason = StopReason.INTERRUPTED
    if budget_hit:
        note = f"the time budget ({budget:g} s) ended the search after {len(records)} of {job.search.num_samples} trials"
    return records, reason, note


def end_cut_short(log_path: Path, records: list[TrialRecord], reason: str) -> None:
    """Mark the trials still open as ended (the time budget cut them short: they are over, not
    interrupted), in the records and in the log."""
    for rec in records:
        if not rec.ended and not rec.error:
            rec.ended = True
            append_event(log_path, {"event": "end", "trial_id": rec.trial_id, "status": rec.status,
                                    "error": None, "reason": reason})


# --------------------------------------------------------------------------------------------
# The driver's state file.
# --------------------------------------------------------------------------------------------


def read_state(search_dir: Path) -> dict[str, Any]:
    path = search_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(search_dir: Path, state: dict[str, Any]) -> None:
    tmp = search_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, search_dir / STATE_FILE)


def update_state(search_dir: Path, **fields: Any) -> None:
    """Set some keys of the state file, keeping the rest."""
    write_state(search_dir, {**read_state(search_dir), **fields})

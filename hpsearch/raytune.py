"""Ray Tune glue on the driver: the callback that records every trial, the Optuna searcher, the
failure limit. (The function every trial runs is in :mod:`hpsearch.trial`.)

Imported only by :mod:`hpsearch.runner`, after it has decided how Ray must be configured (some
of Ray's settings are read once, when ``ray`` is first imported).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.async_hyperband import _Bracket
from ray.tune.search.optuna import OptunaSearch

from hpsearch.results import trial_status
from hpsearch.spec import resolve_hyperparameters
from hpsearch.tracking import Tracker

logger = logging.getLogger("hpsearch.runner")

# --------------------------------------------------------------------------------------------
# Runs in the driver.
# --------------------------------------------------------------------------------------------


class FailedTrialsLimit(tune.Stopper):
    """Stops the whole search once ``limit`` trials have failed (``search.max_failed_trials``).

    Tune's ``fit()`` does not stop or raise however many trials fail; the callback counts them here.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.failed = 0

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.limit is not None and self.failed >= self.limit


class SearchCallback(tune.Callback):
    """Keeps our own record of every trial (a JSON-lines log in the search folder), feeds MLflow,
    and prints one line per finished trial.

    Ray's persisted trial status is not trusted (a trial lost with its node stays RUNNING there);
    this log is what the Parquet tables, MLflow statuses and the summary are built from.
    """

    def __init__(self, *, log_path: str, metric: str, num_samples: int, tracker: Tracker | None,
                 limit: FailedTrialsLimit, upload_to: str | None = None) -> None:
        self.log_path = log_path
        self.upload_to = upload_to  # a URI storage's <storage>/<name>: the log is copied there as trials end
        self._remote: Any = None
        self.metric = metric
        self.num_samples = num_samples
        self.tracker = tracker
        self.limit = limit
        self._last: dict[str, dict[str, Any]] = {}
        self._started: set[str] = set()
        self._ended: dict[str, str] = {}  # trial id -> status
        self._ended_before: set[str] = set()  # ended before this resume

    def setup(self, **info: Any) -> None:
        # On resume: what ended before counts (progress, the failure limit) and stays as it was,
        # even where Tune's older snapshot restarts it (run_trial then returns at once).
        self._ended = ended_trials(Path(self.log_path))
        self._ended_before = set(self._ended)
        self.limit.failed = sum(1 for status in self._ended.values() if status == "failed")
        if self.tracker is not None:
            self.tracker.adopt_existing_runs()

    def _write(self, event: dict[str, Any]) -> None:
        append_event(Path(self.log_path), event)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self._ended_before:
            return
        self._write({"event": "start", "trial_id": trial.trial_id, "config": trial.config,
                     "path": trial.path})
        self._started.add(trial.trial_id)
        if self.tracker is not None:
            self.tracker.trial_started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id in self._ended_before:
            return
        keep = {k: result.get(k) for k in ("epoch", "train_loss", "val_loss", "val_accuracy", "diverged",
                                           "epoch_time_s", "time_total_s", "timestamp", "node_id", "node_ip")}
        self._last[trial.trial_id] = keep
        self._write({"event": "result", "trial_id": trial.trial_id, **keep})
        if self.tracker is not None:
            self.tracker.trial_result(trial.trial_id, keep)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._write({"event": "retry", "trial_id": trial.trial_id, "error": _error_text(trial)})
        logger.info("trial %s crashed; retrying from its last checkpoint: %s", trial.trial_id, _error_text(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, _error_text(trial) or "the trial failed")

    def _end(self, trial: Any, error: str | None) -> None:
        if trial.trial_id in self._ended_before:
            return
        if trial.trial_id not in self._started:  # failed before it ever started (e.g. its actor died)
            self.on_trial_start(0, [], trial)
        last = self._last.get(trial.trial_id) or _last_result(trial)
        status = trial_status(trial.config, last, error)
        self._write({"event": "end", "trial_id": trial.trial_id, "status": status, "error": error})
        if self.tracker is not None:
            self.tracker.trial_ended(trial.trial_id, status, error)
        self._ended[trial.trial_id] = status
        if status == "failed":
            self.limit.failed += 1
        value = (last or {}).get(self.metric)
        shown = f"{self.metric} {value:.4f}" if isinstance(value, float) and math.isfinite(value) else ""
        epochs = int((last or {}).get("epoch") or 0)
        why = f" — {error}" if error else ""
        logger.info("[%d/%d] trial %s %s after %d epoch%s %s%s", len(self._ended), self.num_samples, trial.trial_id,
                    status, epochs, "" if epochs == 1 else "s", shown, why)
        self._upload_log()

    def _upload_log(self) -> None:
        """With a URI storage, keep the log beside Tune's state there: a resume elsewhere needs it."""
        if not self.upload_to:
            return
        from hpsearch.storage import Remote

        try:
            if self._remote is None:  # made here, not in __init__: Tune pickles its callbacks
                self._remote = Remote(self.upload_to)
            self._remote.upload(Path(self.log_path), Path(self.log_path).name)
        except Exception as e:  # the search goes on; the upload at the end tries again
            logger.warning("could not upload the trial log to %s: %s", self.upload_to, e)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # The trials Tune knows: after a restore, trials a killed driver had started but not yet
        # saved are gone from it (they were replaced); the results leave those out.
        self._write({"event": "trials", "ids": [t.trial_id for t in trials]})
        self._upload_log()
        for trial in trials:
            if trial.trial_id in self._started and trial.trial_id not in self._ended and self.tracker is not None:
                # Stopped by Ctrl-C / SIGTERM: it continues on resume; until then its run is KILLED.
                self.tracker.trial_ended(trial.trial_id, "interrupted")


class ImportTorchWhenTrialsRun(tune.Callback):
    """The driver needs torch at the end (the test score): import it once the first trial has
    reported, in a thread. Earlier, it would compete with the trials' workers importing theirs;
    at the end, it would add its seconds to the search's."""

    def __init__(self) -> None:
        self._started = False

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not self._started:
            import importlib
            import threading

            self._started = True
            threading.Thread(target=importlib.import_module, args=("torch",), daemon=True).start()


def _last_result(trial: Any) -> dict[str, Any] | None:
    last = getattr(trial, "last_result", None) or {}
    return last if "epoch" in last else None


def _error_text(trial: Any) -> str | None:
    """The last line of the trial's error (the exception), not Ray's whole traceback."""
    text = None
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            text = Path(path).read_text(errors="replace")
    except OSError:
        text = None
    if not text:
        return None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # Ray wraps the user's exception; its last line is "Name: message".
    return lines[-1][:500] if lines else None


def ended_trials(path: Path) -> dict[str, str]:
    """Trial id -> status of every trial our log saw end (and not start again since)."""
    ended: dict[str, str] = {}
    for e in read_events(path):
        if e["event"] == "start":
            ended.pop(e["trial_id"], None)
        elif e["event"] == "end":
            ended[e["trial_id"]] = e["status"]
    return ended


def append_event(path: Path, event: dict[str, Any]) -> None:
    """One line of the trial log."""
    event.setdefault("time", time.time())
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, default=str) + "\n")


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


# --------------------------------------------------------------------------------------------
# Optuna through Tune, told the truth about early-stopped trials.
# --------------------------------------------------------------------------------------------


class HonestOptunaSearch(OptunaSearch):
    """OptunaSearch that reports an ASHA-stopped trial to Optuna as PRUNED, not COMPLETE.

    Ray's OptunaSearch tells Optuna COMPLETE with the early, partial-budget value, so TPE compares
    a 1-epoch result with full runs as if both were final. Pruned (with its intermediate values,
    already reported per epoch) is the honest signal; TPE ranks pruned trials by how far they got.
    A diverged trial (NaN) is reported FAIL, never RUNNING.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials or error or not result:
            return super().on_trial_complete(trial_id, result, error)
        value = result.get(self.metric)
        # Tune hands searchers the result flattened: the config comes as "config/<name>" keys.
        config = {k[len("config/"):]: v for k, v in result.items() if k.startswith("config/")}
        status = trial_status(config, result, None)
        State = optuna.trial.TrialState
        try:
            if status == "diverged" or not (isinstance(value, (int, float)) and math.isfinite(value)):
                self._ot_study.tell(ot_trial, None, state=State.FAIL)
            elif status == "stopped early":
                self._ot_study.tell(ot_trial, None, state=State.PRUNED)
            else:
                self._ot_study.tell(ot_trial, value, state=State.COMPLETE)
        except RuntimeError as e:
            # GridSampler calls study.stop() once the grid is done, which raises outside
            # study.optimize(); the trial's state is recorded all the same.
            logger.debug("optuna: %s", e)
        self._completed_trials.add(trial_id)


# --------------------------------------------------------------------------------------------
# ASHA that compares like with like.
# --------------------------------------------------------------------------------------------


def planned_epochs(config: dict[str, Any]) -> int:
    """The epochs a trial plans to train (its ``epochs``, or the default)."""
    return int(resolve_hyperparameters(config)["epochs"])


class ASHAByLength(ASHAScheduler):
    """ASHA whose rungs compare a trial only with trials that plan as many epochs as it does.

    The learning rate follows each trial's own schedule over its planned epochs (cosine by
    default). At a shared rung the shorter trial is further down its schedule: by epoch 6 a
    10-epoch trial trains at 35% of its learning rate and a 50-epoch one at 95%, so the short one
    looks better whatever its other hyperparameters. Measured (benchmarks/search_quality.py,
    jobs/mnist.yaml's space on Fashion-MNIST, seed 0): with one set of rungs, 51 of TPE's 69
    trials planned 10 epochs, the fewest the space allows, since mostly short trials got past
    the rungs and TPE learns from the trials that finish; the best trial was a 10-epoch one.
    With a set of rungs per planned length, every length is pruned at the same rate.

    Relies on Tune internals (``_Bracket``, ``_trial_info``, ``_max_t``), checked against Ray 2.60.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._grace_period = kwargs.get("grace_period", 1)
        self._by_length: dict[int, _Bracket] = {}

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)  # checks metric and mode
        length = min(planned_epochs(trial.config), self._max_t)
        bracket = self._by_length.get(length)
        if bracket is None:
            # Rungs as for the whole search (grace_period x reduction_factor^k), up to this length.
            bracket = self._by_length[length] = _Bracket(min(self._grace_period, length), length,
                                                         self._reduction_factor, 0)
        self._trial_info[trial.trial_id] = bracket

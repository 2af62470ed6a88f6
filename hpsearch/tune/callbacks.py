"""Tune callbacks on the driver: the one that keeps the search's record (the trial log, MLflow,
a line per finished trial), the failure limit, and torch's import for the end of the search."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ray import tune

from hpsearch.record.location import Remote
from hpsearch.record.study import StudyWriter
from hpsearch.record.trial_log import REPLAYED, RESULT_KEYS, TRACKING_LOST, TrialRecord, TrialStatus, append_event, ended_trials, trial_status
from hpsearch.progress import Forecast, Progress
from hpsearch.tune import storage
from hpsearch.tracking import Tracker

logger = logging.getLogger("hpsearch.search")


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
                 limit: FailedTrialsLimit, upload_to: str | None = None, progress: Progress | None = None,
                 study: StudyWriter | None = None, forecast: Forecast | None = None) -> None:
        self.log_path = log_path
        self.upload_to = upload_to  # a URI storage's <storage>/<name>: the log is copied there as trials end
        self._remote: Any = None
        self.metric = metric
        self.num_samples = num_samples
        self.tracker = tracker
        self.limit = limit
        self.progress = progress  # the live area on a terminal
        self.study = study  # optuna.journal, a trial added as it ends
        self.forecast = forecast  # warns when the search is on course to run for weeks
        self.watch = storage.FreeSpace(Path(log_path).parent if upload_to is None else None)
        self._epochs: dict[str, list[dict[str, Any]]] = {}  # this driver's results of each trial
        self._last: dict[str, dict[str, Any]] = {}
        self._started: set[str] = set()
        self._ended: dict[str, TrialStatus] = {}
        self._ended_before: set[str] = set()  # ended before this resume

    def setup(self, **info: Any) -> None:
        storage.reset()
        # On resume: what ended before counts (progress, the failure limit) and stays as it was,
        # even where Tune's older snapshot restarts it (run_trial then returns at once).
        self._ended = ended_trials(Path(self.log_path))
        self._ended_before = set(self._ended)
        self.limit.failed = sum(1 for status in self._ended.values() if status is TrialStatus.FAILED)
        if self.tracker is not None:
            self.tracker.adopt_existing_runs()

    def _write(self, event: dict[str, Any]) -> None:
        try:
            append_event(Path(self.log_path), event)
        except OSError as e:
            if not storage.is_full(e):
                raise
            storage.stop(f"{Path(self.log_path).parent}: {e.strerror or e}")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self._ended_before:
            return
        self._write({"event": "start", "trial_id": trial.trial_id, "config": trial.config,
                     "path": trial.path})
        self._started.add(trial.trial_id)
        if self.tracker is not None:
            self.tracker.trial_started(trial.trial_id, trial.config)
        if self.progress is not None:
            self.progress.trial_started(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id in self._ended_before:
            return
        keep = {k: result.get(k) for k in RESULT_KEYS}
        self._last[trial.trial_id] = keep
        if result.get(REPLAYED):  # an epoch the record has already: how the trial ended, nothing more
            return
        self._epochs.setdefault(trial.trial_id, []).append(keep)
        self._write({"event": "result", "trial_id": trial.trial_id, **keep})
        if self.tracker is not None:
            self.tracker.trial_result(trial.trial_id, keep)
        self.watch.check()
        if self.progress is not None:
            self.progress.trial_result(trial.trial_id, keep.get(self.metric))
        warning = self.forecast.epoch(keep.get("epoch_time_s")) if self.forecast is not None else None
        if warning:
            logger.warning("%s", warning)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if storage.is_full(_error_text(trial)):  # not the trial's fault: the search stops, resumable
            storage.stop(f"trial {trial.trial_id}: {_error_text(trial)}")
            return
        self._write({"event": "retry", "trial_id": trial.trial_id, "error": _error_text(trial)})
        logger.info("trial %s crashed; retrying from its last checkpoint: %s", trial.trial_id, _error_text(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if storage.is_full(_error_text(trial)):
            storage.stop(f"trial {trial.trial_id}: {_error_text(trial)}")
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
        if status is TrialStatus.FAILED:
            self.limit.failed += 1
        if self.progress is not None:
            self.progress.trial_ended(trial.trial_id, status)
        if self.study is not None:
            try:
                self.study.add(TrialRecord(trial_id=trial.trial_id, config=dict(trial.config), error=error,
                                           epochs=self._epochs.get(trial.trial_id, [])))
            except Exception as e:  # the study is rewritten from the log at the end
                logger.warning("could not add trial %s to the Optuna study: %s", trial.trial_id, e)
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
        try:
            if self._remote is None:  # made here, not in __init__: Tune pickles its callbacks
                self._remote = Remote(self.upload_to)
            self._remote.upload(Path(self.log_path), Path(self.log_path).name)
        except Exception as e:  # the search goes on; the upload at the end tries again
            logger.warning("could not upload the trial log to %s: %s", self.upload_to, e)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.progress is not None:
            self.progress.close()
        # The trials Tune knows: after a restore, trials a killed driver had started but not yet
        # saved are gone from it (they were replaced); the results leave those out.
        self._write({"event": "trials", "ids": [t.trial_id for t in trials]})
        self._upload_log()
        for trial in trials:
            if trial.trial_id in self._started and trial.trial_id not in self._ended and self.tracker is not None:
                # Stopped by Ctrl-C / SIGTERM: it continues on resume; until then its run is KILLED.
                self.tracker.trial_ended(trial.trial_id, TrialStatus.INTERRUPTED)
        if self.tracker is not None:
            self.tracker.flush()
            if self.tracker.lost_since is not None:  # the driver catches MLflow up from the record
                self._write({"event": TRACKING_LOST, "since": self.tracker.lost_since, "missed": self.tracker.missed})


class ImportEndOfSearchModules(tune.Callback):
    """The driver needs torch at the end (the test score, through :mod:`hpsearch.trainable`) and
    the report's plotting (Optuna's importance evaluator brings scikit-learn and SciPy): about 4 s
    of imports. They run once the first trial has reported, in a thread. Earlier, they would
    compete with the trials' workers importing theirs; at the end, they add their seconds to the
    search's (benchmarks/overhead.py).
    """

    def __init__(self) -> None:
        self._started = False

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not self._started:
            import threading

            self._started = True
            threading.Thread(target=_import_end_of_search_modules, name="hpsearch-imports", daemon=True).start()


# Its name until 2026-12-07: a search started before then has it pickled in its tuner.pkl, which a
# resume unpickles.
ImportTorchWhenTrialsRun = ImportEndOfSearchModules


def _import_end_of_search_modules() -> None:
    import importlib

    try:
        importlib.import_module("hpsearch.trainable")
        importlib.import_module("hpsearch.report").import_plotting()
    except Exception:  # imported again where needed, and said there
        logger.debug("importing the modules the end of the search needs failed", exc_info=True)


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

"""MLflow tracking, written from the driver only (the one MLflow writer; DESIGN.md says why).

One parent run per search holds the resolved job, the best hyperparameters and metrics, and the
best model's weights; one child run per trial (tag ``mlflow.parentRunId``) holds its
hyperparameters as params, its metrics per epoch with ``step=epoch`` and its final status.

:class:`Tracker` is plain data plus a lazily created client: Tune pickles its callbacks, and a
client object does not pickle. A tracking error during a search is logged, never raised: losing a
metric line must not lose a search. Errors while setting up (:meth:`Tracker.start`) are raised,
before any trial runs.

A server that stops answering mid-search is said once; the trials' writes are skipped while it is
away (looked for again every :data:`RETRY_S`), and when the search ends :meth:`Tracker.catch_up`
writes what MLflow missed from the search's own record, or says what it lost.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from hpsearch.errors import StorageError
from hpsearch.spec import without_credentials
from hpsearch.record.trial_log import EPOCH_METRICS, TrialStatus

logger = logging.getLogger(__name__)

TRIAL_ID_TAG = "hpsearch.trial_id"
STATUS_TAG = "hpsearch.status"
METRIC_KEYS = (*EPOCH_METRICS, "epoch_time_s")  # logged per epoch, step = epoch
DEFAULT_URI = "sqlite:///mlflow.db"
RETRY_S = 30.0  # a lost server is tried again this often
# MLflow's HTTP client retries a call for minutes by default; a search should not wait on it.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 # and prints a "View run" line per run it ends: the summary says where the runs are.
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# our trial status -> MLflow run status
_RUN_STATUS = {TrialStatus.COMPLETED: "FINISHED", TrialStatus.STOPPED_EARLY: "FINISHED",
               TrialStatus.FAILED: "FAILED", TrialStatus.DIVERGED: "FAILED", TrialStatus.NOT_RUN: "FINISHED",
               TrialStatus.INTERRUPTED: "KILLED", TrialStatus.DISCARDED: "KILLED"}


def resolve_uri(uri: str | None) -> str:
    """The MLflow URI the driver uses (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db``), made absolute: Ray runs trials in other folders."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    # Credentials in the URI go where MLflow's client reads them (its basic-auth variables), so
    # the URI hpsearch keeps, shows and stores holds no password. A resume needs them set again.
    uri, user, password = without_credentials(uri)
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(os.path.expanduser(uri[len("sqlite:///"):])).resolve())
    elif "://" not in uri:
        uri = str(Path(os.path.expanduser(uri)).resolve())
    return uri


class Tracker:
    def __init__(self, *, uri: str, experiment: str, parent_run_id: str | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # trial id -> child run id
        self._new_parent = False  # the parent run is this driver's own: no trial has a run yet
        self._client: Any = None
        self._writer: Any = None  # one background thread for per-trial writes, created on first use
        self.lost_since: float | None = None  # when the server stopped answering (None: it answers)
        self.missed = 0  # trial writes skipped or failed since
        self._next_try = 0.0
        if uri.startswith(("http://", "https://")):
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = state["_writer"] = None
        # Unpickled, it is a resumed search's (Tune restores its callbacks from tuner.pkl): the
        # driver that created the parent run may have started trials' runs before it was killed.
        state["_new_parent"] = False
        return state

    def _submit(self, fn: Any, *args: Any) -> None:
        """Run a per-trial write off Tune's event loop, in order. The loop hands results to the
        trials' next epochs; a SQLite write there would stall them."""
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpsearch-mlflow")
        self._writer.submit(self._safe, fn, *args)

    def flush(self) -> None:
        """Wait for every queued write."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # -- set-up (raises) ----------------------------------------------------------------------

    def start(self, *, job: Mapping[str, Any], run_name: str, job_file: Path) -> str:
        """Create (or find) the experiment and the search's parent run. Returns its run id."""
        try:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                self.experiment_id = self.client.create_experiment(self.experiment, artifact_location=self._artifact_root())
            else:
                self.experiment_id = exp.experiment_id
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"hpsearch.kind": "search"})
        except Exception as e:  # MLflow raises MlflowException, sqlalchemy and OS errors alike
            raise StorageError(f"tracking.uri: cannot use MLflow at {self.uri}: {_one_line(e)}") from None
        self.parent_run_id = run.info.run_id
        self._new_parent = True
        self._safe(self._log_job, job, job_file)
        return self.parent_run_id

    def abandon(self) -> None:
        """Remove the parent run of a search that never started (nothing half-written left)."""
        if self.parent_run_id:
            self._safe(self.client.delete_run, self.parent_run_id)

    def _artifact_root(self) -> str | None:
        # Beside a SQLite file, not in whatever folder the command ran from.
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///"):])
            return (db.parent / "mlartifacts" / self.experiment).as_uri()
        return None

    def _log_job(self, job: Mapping[str, Any], job_file: Path) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in _flatten(job).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.parent_run_id, params=params[i:i + 100])
        self.client.log_artifact(self.parent_run_id, str(job_file))

    # -- per trial (never raises) -------------------------------------------------------------

    def adopt_existing_runs(self) -> None:
        """On resume: map trials that already have a child run to it, so none is duplicated."""
        self._submit(self._adopt_existing_runs)

    def _adopt_existing_runs(self) -> None:
        if not self.parent_run_id:
            return
        runs = self.client.search_runs(
            [self._experiment_id()], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=50_000,
        )
        for run in runs:
            trial_id = run.data.tags.get(TRIAL_ID_TAG)
            if trial_id:
                self._runs[trial_id] = run.info.run_id

    def trial_started(self, trial_id: str, config: Mapping[str, Any]) -> None:
        self._submit(self._trial_write, self._trial_started, trial_id, dict(config))

    def _trial_started(self, trial_id: str, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        if trial_id in self._runs:
            return  # a retry or a resume of the same trial: same run
        if not self._new_parent:  # a resumed search: an earlier, killed driver may have started it
            existing = self.client.search_runs(
                [self._experiment_id()], max_results=1,
                filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
            )
            if existing:
                self._runs[trial_id] = existing[0].info.run_id
                return
        run = self.client.create_run(
            self._experiment_id(), run_name=trial_id,
            tags={"mlflow.parentRunId": self.parent_run_id, TRIAL_ID_TAG: trial_id},
        )
        self._runs[trial_id] = run.info.run_id
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in config.items()])

    def trial_result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        self._submit(self._trial_write, self._trial_result, trial_id, dict(result))

    def _trial_result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        run_id = self._runs.get(trial_id)
        if run_id is None:
            return
        step = int(result.get("epoch", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in METRIC_KEYS if k in result]
        self.client.log_batch(run_id, metrics=metrics)

    def trial_ended(self, trial_id: str, status: TrialStatus, error: str | None = None) -> None:
        self._submit(self._trial_write, self._trial_ended, trial_id, status, error)

    def _trial_write(self, fn: Any, *args: Any) -> None:
        """One trial's write; while the server is away, skipped (and counted) between tries."""
        if self.lost_since is not None and time.time() < self._next_try:
            self.missed += 1
            return
        try:
            fn(*args)
        except Exception as e:
            self.missed += 1
            self._next_try = time.time() + RETRY_S
            if self.lost_since is None:
                self.lost_since = time.time()
                logger.warning("MLflow: %s stopped answering (%s); the search goes on, its record is in its "
                               "own files, and MLflow is caught up when the search ends", self.uri, _one_line(e))
            return
        if self.lost_since is not None:
            logger.info("MLflow: %s answers again", self.uri)
            self._next_try = 0.0

    def catch_up(self, records: list[Any], lost: Mapping[str, Any] | None = None) -> bool:
        """After a server was lost (here, or by the search's callback: ``lost``, its log event):
        each trial's run, params and every epoch's metrics written from the search's record (what
        MLflow has already is not written twice). True if MLflow was caught up."""
        self.flush()
        since = self.lost_since or (lost or {}).get("since")
        missed = self.missed or int((lost or {}).get("missed") or 0)
        if since is None:
            return False
        try:
            self._catch_up(records)
        except Exception as e:
            when = time.strftime("%H:%M:%S", time.localtime(since))
            logger.warning("MLflow: %s still does not answer (%s): %d trial write(s) since %s are missing there; "
                           "every trial and epoch is in trials.parquet and epochs.parquet", self.uri, _one_line(e),
                           missed, when)
            self.lost_since, self.missed = since, missed
            return False
        logger.info("MLflow: caught up with the %d trial write(s) the lost server missed", missed)
        self.lost_since, self.missed = None, 0
        return True

    def _catch_up(self, records: list[Any]) -> None:
        from mlflow.entities import Metric

        self._adopt_existing_runs()
        for record in records:
            if record.trial_id not in self._runs:
                self._trial_started(record.trial_id, record.config)
            run_id = self._runs[record.trial_id]
            have = {m.step for m in self.client.get_metric_history(run_id, METRIC_KEYS[-1])}
            now = int(time.time() * 1000)
            missing = [Metric(k, float(e[k]), now, int(e.get("epoch", 0))) for e in record.epochs
                       if int(e.get("epoch", 0)) not in have for k in METRIC_KEYS
                       if isinstance(e.get(k), (int, float))]
            for i in range(0, len(missing), 900):
                self.client.log_batch(run_id, metrics=missing[i:i + 900])

    def _trial_ended(self, trial_id: str, status: TrialStatus, error: str | None) -> None:
        run_id = self._runs.get(trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, STATUS_TAG, status.value)
        if error:
            self.client.set_tag(run_id, "hpsearch.error", error[:5000])
        self.client.set_terminated(run_id, status=_RUN_STATUS.get(TrialStatus(status), "FINISHED"))

    # -- the end of the search ----------------------------------------------------------------

    def reconcile(self, statuses: Mapping[str, TrialStatus]) -> None:
        """Make MLflow agree with our record after crashes and resumes: exactly one visible child
        run per trial, with its final status. Runs of trials the search does not count, or
        duplicates left by a killed driver, are closed as KILLED, tagged ``discarded`` and deleted
        (MLflow's ``delete_run``: gone from the UI and from searches, kept in the store's trash
        until ``mlflow gc``)."""
        self.flush()
        self._safe(self._reconcile, statuses)

    def _reconcile(self, statuses: Mapping[str, TrialStatus]) -> None:
        runs = self.client.search_runs(
            [self._experiment_id()], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=50_000,
        )
        keep: dict[str, str] = {}
        for run in sorted(runs, key=lambda r: r.info.start_time):
            trial_id = run.data.tags.get(TRIAL_ID_TAG)
            discarded = run.data.tags.get(STATUS_TAG) == TrialStatus.DISCARDED.value
            if trial_id in statuses and trial_id not in keep and not discarded:
                keep[trial_id] = run.info.run_id
                status = TrialStatus(statuses[trial_id])
                wanted = _RUN_STATUS.get(status, "FINISHED")
                if run.info.status != wanted or run.data.tags.get(STATUS_TAG) != status.value:
                    self.client.set_tag(run.info.run_id, STATUS_TAG, status.value)
                    self.client.set_terminated(run.info.run_id, status=wanted)
            else:
                if not discarded or run.info.status == "RUNNING":
                    self.client.set_tag(run.info.run_id, STATUS_TAG, TrialStatus.DISCARDED.value)
                    self.client.set_terminated(run.info.run_id, status="KILLED")
                self.client.delete_run(run.info.run_id)
        self._runs.update(keep)

    def finish(self, *, best: Mapping[str, Any] | None, files: list[Path], model_file: Path | None,
               status: str = "FINISHED") -> None:
        self.flush()
        self._safe(self._finish, best, files, model_file, status)

    def _finish(self, best: Mapping[str, Any] | None, files: list[Path], model_file: Path | None, status: str) -> None:
        from mlflow.entities import Metric, Param

        run_id = self.parent_run_id
        if best:
            now = int(time.time() * 1000)
            params = [Param(f"best.{k}", str(v)) for k, v in best["hyperparameters"].items()]
            metrics = [Metric(f"best_{k}", float(v), now, 0) for k, v in best["validation"].items()
                       if isinstance(v, (int, float)) and math.isfinite(v)]
            if best.get("test_accuracy") is not None:
                metrics.append(Metric("test_accuracy", float(best["test_accuracy"]), now, 0))
            final = best.get("retrained") or {}
            for key in ("mean", "std"):
                if isinstance(final.get(key), (int, float)):
                    metrics.append(Metric(f"retrained_test_accuracy_{key}", float(final[key]), now, 0))
            # Every seed's score, one step each (MLflow's chart of the metric shows their spread).
            for step, value in enumerate(final.get("test_accuracy") or []):
                if isinstance(value, (int, float)) and math.isfinite(value):
                    metrics.append(Metric("retrained_test_accuracy", float(value), now, step))
            if final:
                params.append(Param("retrained.epochs", str(final.get("epochs"))))
                params.append(Param("retrained.seeds", ",".join(map(str, final.get("seeds") or []))))
            self.client.log_batch(run_id, metrics=metrics, params=params)
            self.client.set_tag(run_id, "hpsearch.best_trial", best["trial_id"])
        for f in files:
            if f.exists():
                self.client.log_artifact(run_id, str(f))
        if model_file is not None and model_file.exists():
            self.client.log_artifact(run_id, str(model_file), artifact_path="best_model")
        self.client.set_terminated(run_id, status=status)

    # -- helpers ------------------------------------------------------------------------------

    def _experiment_id(self) -> str:
        if self.experiment_id is None:
            self.experiment_id = self.client.get_run(self.parent_run_id).info.experiment_id
        return self.experiment_id

    def _safe(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:
            logger.warning("MLflow: %s failed: %s", fn.__name__.lstrip("_"), _one_line(e))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    # An HTTP client's error nests its cause in a page of text: the OS's reason is what says it.
    cause = re.search(r"\[Errno -?\d+\] [^\"')\]]+", text[0])
    return cause.group(0) if cause else (text[0] if len(text[0]) <= 300 else text[0][:300] + "...")

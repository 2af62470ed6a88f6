"""A search, top to bottom: :func:`run_search` starts one, :func:`resume_search` continues one.

The order is chosen so that everything a user can get wrong fails before any trial starts, and a
failure then leaves nothing behind: the search folder (checked, not yet created), the data (loaded
once, in the driver), Ray, MLflow's parent run, and only then ``fit()``. After it: the trial log
folded into one record per trial, the best configuration retrained (``search.final``), the
outputs written, MLflow told how it all ended.

Where each part lives: the on-disk record in :mod:`hpsearch.record`, everything Ray in
:mod:`hpsearch.tune` (imported only once Ray's environment is set), MLflow in :mod:`hpsearch.tracking`,
torch in :mod:`hpsearch.trainable`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from hpsearch import entrypoints
from hpsearch.data import Dataset
from hpsearch.errors import SearchError
from hpsearch.record import outputs, trial_log
from hpsearch.record.location import SearchLocation, read_file
from hpsearch.record.outputs import BestRecord, Retrained
from hpsearch.record.trial_log import StopReason, TrialRecord, TrialStatus
from hpsearch.spec import FixedParam, JobSpec, load_job
from hpsearch.tracking import Tracker

logger = logging.getLogger(__name__)

TrialFn = Callable[..., None]  # a replacement of hpsearch.tune.trial.run_trial, with its arguments
Pretrained = Optional[Mapping[str, Any]]  # ResNet-18's starting weights (hpsearch.models.pretrained_weights)


@dataclass
class SearchSummary:
    """How a search ended: what the CLI prints, and its exit code."""

    search_dir: Path
    best: BestRecord | None
    counts: dict[str, int]  # trial status -> trials
    top: list[dict[str, Any]] = field(default_factory=list)  # the best trials' rows of trials.parquet
    wall_s: float = 0.0
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    reason: StopReason | None = None  # why the search ended before all its trials did, if it did
    stopped: str | None = None  # ...said for users, with what to do
    location: str = ""  # <storage>/<name>: the search folder, or its URI
    note: str | None = None  # how the search ended, when users should know (e.g. its time budget)
    columns: list[str] = field(default_factory=list)  # the hyperparameters searched (the table's columns)

    @property
    def exit_code(self) -> int:
        return self.reason.exit_code if self.reason else 0


def run_search(job: JobSpec, *, address: str | None = None, trial_fn: TrialFn | None = None) -> SearchSummary:
    """Run the search a job describes and write its outputs. Raises HpsearchError on bad input.

    ``trial_fn`` replaces the per-trial function (tests inject faults through it); it takes the
    same arguments as :func:`hpsearch.tune.trial.run_trial`.
    """
    t_start = time.time()
    where = SearchLocation.of(job.storage, job.name)
    if where.holds_search(outputs.TRIALS_FILE):
        raise SearchError(
            f"storage: {where.experiment} already holds a search named {job.name!r}; continue it with "
            f"`hpsearch resume {where.experiment}`, or start a new one with `--set name=<new name>`"
        )
    where.check_writable()
    if where.remote is not None:
        shutil.rmtree(where.local, ignore_errors=True)  # a mirror left by an earlier search of this name
    created = not where.local.exists()
    try:
        where.local.mkdir(parents=True, exist_ok=True)
        outputs.write_yaml(where.local / outputs.JOB_FILE, job.to_dict())
        where.upload(outputs.JOB_FILE)
        return run(job, where, address=address, resume=False, t_start=t_start, trial_fn=trial_fn)
    except BaseException:
        # Nothing half-written: a search that never got to run its trials leaves no folder.
        if created and not (where.local / trial_log.LOG_FILE).exists():
            shutil.rmtree(where.local, ignore_errors=True)
        raise


def resume_search(location: str | os.PathLike[str], *, address: str | None = None,
                  trial_fn: TrialFn | None = None) -> SearchSummary:
    """Continue a search stopped or killed midway: finished trials kept, unfinished ones resumed.

    ``location``: the search's folder (``<storage>/<name>``), or its URI for a URI storage.
    """
    t_start = time.time()
    where = SearchLocation.parse(location)
    where.download(outputs.JOB_FILE, trial_log.LOG_FILE, trial_log.STATE_FILE)  # what the driver needs
    job = load_job(where.require(outputs.JOB_FILE, "of a search"), of_search=True)
    if (job.storage, job.name) != (where.storage, where.name):
        # The search was moved (or this is a URI search's local mirror): it continues where it is.
        job = dataclasses.replace(job, storage=where.storage, name=where.name)
    if not where.tune_started():
        raise SearchError(f"{where.experiment}: Ray Tune never started this search, so there is nothing to resume; "
                          "run it again with `hpsearch run`")
    from hpsearch.tune import snapshot

    for repaired in snapshot.repair(where.experiment, name=where.name):  # what a hard kill can leave
        logger.info("%s", repaired)
    return run(job, where, address=address, resume=True, t_start=t_start, trial_fn=trial_fn)


def run(job: JobSpec, where: SearchLocation, *, address: str | None, resume: bool, t_start: float,
        trial_fn: TrialFn | None = None) -> SearchSummary:
    """The search itself, as both entry points run it: set up, fit, fold, retrain, write."""
    # one piece: the main path of every search, each step a call that does one thing; read
    # top to bottom, it is the order of a search.
    from hpsearch.tune import runtime, storage

    tracker = _tracker(job, where)
    new_parent = tracker is not None and tracker.parent_run_id is None
    if resume:
        _recover_cut_epochs(where, tracker)
    trial_log.update_state(where.local, driver={"pid": os.getpid(), "host": socket.gethostname(),
                                                "started": time.time()})  # for `hpsearch status`
    where.upload(trial_log.STATE_FILE)
    # On a cluster, the job's own code travels with it (its factories' modules, to every node).
    shipped = entrypoints.shipped_modules([ref for _, ref in job.factories()], job.code) if address else []
    with runtime.SetUp(address, py_modules=shipped) as setup:  # on an error in here, what was set up is undone
        data_f = setup.in_thread(_load_data, job)
        runtime.import_ray(address)
        if new_parent:
            setup.in_thread(_start_tracking, tracker, job, where, undo=tracker.abandon)
        setup.in_thread(runtime.import_search_modules)
        setup.start_ray()
        logger.debug("%.1f s: Ray ready", time.time() - t_start)
        if address is not None and where.remote_uri is None:
            runtime.check_shared_storage(where.local)
        setup.wait()
        logger.debug("%.1f s: data, MLflow and imports ready", time.time() - t_start)
        dataset, pretrained = data_f.result()
        from hpsearch.tune import final as final_tasks
        from hpsearch.tune import tuner as tuners

        gpu = runtime.gpu_per_trial(job.resources.gpu)
        # A machine that cannot grow runs exactly its slots' worth at once: asking Tune for that
        # many keeps every suggestion fresh and starts the first trials together.
        slots = runtime.trial_slots(runtime.cluster_resources(), cpu=job.resources.cpu, gpu=gpu)
        at_once = job.search.max_concurrent_trials or (slots if address is None else None)
        fn = tuners.trainable(job, where, dataset=dataset, gpu=gpu, resume=resume, trial_fn=trial_fn,
                              pretrained=pretrained)
        tuner = tuners.restore(where, fn) if resume else tuners.build(job, where, fn, tracker=tracker,
                                                                       concurrency=at_once)
    started_ray = setup.started_ray
    try:
        logger.info("search %s: %d trials, %s sampler, %s scheduler, %s cpu + %s gpu per trial%s",
                    job.name, job.search.num_samples, job.search.searcher.sampler, job.search.scheduler.name,
                    f"{job.resources.cpu:g}", f"{gpu:g}", f", {at_once} at a time" if at_once and not resume else "")
        t_fit = time.time()
        logger.debug("%.1f s: fit starts", t_fit - t_start)
        with runtime.sigterm_stops_gracefully():
            try:
                tuner.fit()
            except Exception as e:
                # Tune's result grid reads each errored trial's error file back, cut short on a full
                # disk; our own log is the search's record.
                if not storage.stopped():
                    raise
                logger.debug("Tune's results after a full storage: %s: %s", type(e).__name__, e)
        logger.debug("%.1f s: fit done", time.time() - t_start)
        where.fetch_newer(trial_log.LOG_FILE)  # a URI's log is the longer one where Tune's loop ran elsewhere
        records, reason, note = trial_log.fold_search(where.local / trial_log.LOG_FILE, job,
                                                      experiment=where.experiment, fit_s=time.time() - t_fit)
        if storage.stopped():  # stopped while the disk still had room: resumable once it has more
            reason = StopReason.STORAGE_FULL

        final = None
        if reason is None:  # a finished search gets its final score (an interrupted one on resume)
            try:
                with runtime.sigterm_interrupts():
                    final = final_tasks.retrain_best(job, records, where.local, dataset=dataset, gpu=gpu,
                                                     slots=at_once or slots, pretrained=pretrained)
            except KeyboardInterrupt:  # the trials' outputs are still written; resume retrains
                logger.warning("final: retraining interrupted")
                reason = StopReason.INTERRUPTED_IN_FINAL

        # The outputs need no Ray: write them while Ray shuts down (seconds, on a small machine).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpsearch-outputs") as pool:
            written = pool.submit(_write_outputs, job, where, records, dataset=dataset, gpu=gpu, final=final,
                                  tracker=tracker, reason=reason)
            if started_ray:
                runtime.shutdown_ray()
                started_ray = False
                logger.debug("%.1f s: Ray shut down", time.time() - t_start)
            try:
                best = written.result()
            except OSError as e:
                if not storage.is_full(e):
                    raise
                logger.warning("could not write the outputs (%s); the trial log and the checkpoints written so far "
                               "are whole", e.strerror or e)
                best, reason = None, StopReason.STORAGE_FULL
            logger.debug("%.1f s: outputs written", time.time() - t_start)
        return _summary(job, where, records, best=best, tracker=tracker, reason=reason, note=note,
                        wall_s=time.time() - t_start)
    finally:
        if started_ray:
            runtime.shutdown_ray()


# --------------------------------------------------------------------------------------------
# The steps, each one thing.
# --------------------------------------------------------------------------------------------


def _tracker(job: JobSpec, where: SearchLocation) -> Tracker | None:
    """MLflow's tracker (None when tracking is off); on a resume, the parent run it had."""
    if not job.tracking.enabled:
        return None
    from hpsearch.tracking import resolve_uri

    state = trial_log.read_state(where.local)
    return Tracker(uri=state.get("tracking_uri") or resolve_uri(job.tracking.uri), experiment=job.experiment,
                   parent_run_id=state.get("parent_run_id"))


def _recover_cut_epochs(where: SearchLocation, tracker: Tracker | None) -> None:
    """The epochs a killed driver checkpointed but never logged: back in the log, and in MLflow."""
    recovered = trial_log.recover_cut_epochs(where.local / trial_log.LOG_FILE, experiment=where.experiment)
    if recovered:
        logger.info("recovered %d epoch(s) the stopped driver had not logged, from their checkpoints",
                    len(recovered))
    if tracker is not None and recovered:
        tracker.adopt_existing_runs()
        for trial_id, result in recovered:
            tracker.trial_result(trial_id, result)


def _start_tracking(tracker: Tracker, job: JobSpec, where: SearchLocation) -> None:
    """MLflow's parent run for a new search, its id kept for a resume."""
    tracker.start(job=job.to_dict(), run_name=job.name, job_file=where.local / outputs.JOB_FILE)
    trial_log.update_state(where.local, tracking_uri=tracker.uri, parent_run_id=tracker.parent_run_id)
    where.upload(trial_log.STATE_FILE)


def _load_data(job: JobSpec) -> tuple[Dataset, Pretrained]:
    """The data set, and the pretrained weights the model starts from (if any): both fail fast,
    and so does a factory's model (built once here, and a batch run through it)."""
    from hpsearch import data as data_mod
    from hpsearch import entrypoints

    entrypoints.on_path(job.code)
    dataset = data_mod.load(job.data, seed=job.seed, code=job.code)
    if job.model.factory:
        from hpsearch import space
        from hpsearch.trainable import check_model

        check_model(space.first_trial(job), data=dataset, model_spec=job.model)
    pretrained = None
    if job.model.kind == "resnet18" and job.model.weights != "none":
        from hpsearch.models import pretrained_weights

        pretrained = pretrained_weights(job.model)
    return dataset, pretrained


def _write_outputs(job: JobSpec, where: SearchLocation, records: list[TrialRecord], *, dataset: Dataset, gpu: float,
                   final: Retrained | None, tracker: Tracker | None, reason: StopReason | None) -> BestRecord | None:
    """The tables, ``best.yaml`` (the best checkpoint scored on the test set), the job; MLflow
    told each trial's status and the search's end; all of it uploaded for a URI storage."""
    from hpsearch.record import checkpoints

    def test_score(checkpoint_dir: str, config: Mapping[str, Any]) -> tuple[float, Callable[[Any], None]]:
        from hpsearch.trainable import score_checkpoint

        raw = read_file(f"{checkpoint_dir}/{checkpoints.STATE_FILE}")
        return score_checkpoint(raw, config, data=dataset, model_spec=job.model, gpus=gpu)

    best = outputs.write_outputs(where.local, records, metric=job.search.metric, mode=job.search.mode,
                                 test_score=test_score, final=final)
    outputs.write_yaml(where.local / outputs.JOB_FILE, job.to_dict())
    trial_log.update_state(where.local, ended=time.time(), stop_reason=reason.value if reason else None)
    _write_study(job, where, records)
    _write_report(where)
    if tracker is not None:
        # One child run per trial of the search, with our status; orphans and duplicates closed.
        # A server lost mid-search: what it missed, from the record (or what is lost, said).
        log = where.local / trial_log.LOG_FILE
        if tracker.catch_up(records, trial_log.tracking_lost(log)):
            trial_log.append_event(log, {"event": trial_log.TRACKING_CAUGHT_UP})
        if tracker.lost_since is None:  # else it is still away: said (the search's own files have it all)
            tracker.reconcile({r.trial_id: r.status for r in records})
            files = [where.local / name for name in (outputs.BEST_FILE, outputs.TRIALS_FILE, outputs.EPOCHS_FILE,
                                                     outputs.REPORT_FILE)]
            interrupted = reason in (StopReason.INTERRUPTED, StopReason.INTERRUPTED_IN_FINAL)
            tracker.finish(best=best, files=files, model_file=where.local / outputs.MODEL_FILE,
                           status="KILLED" if interrupted else ("FINISHED" if best else "FAILED"))
    where.upload(*outputs.DRIVER_FILES)
    return best


def _write_study(job: JobSpec, where: SearchLocation, records: list[TrialRecord]) -> None:
    """``optuna.journal`` rewritten from the records; a failure is a warning, never a lost search."""
    from hpsearch.record import study

    try:
        study.write_study(where.local, job, records)
    except Exception as e:
        logger.warning("could not write the Optuna study %s: %s", outputs.STUDY_FILE, e)


def _write_report(where: SearchLocation) -> None:
    """``report.html``; a report that cannot be written is a warning, never a lost search."""
    from hpsearch import report

    try:
        report.write_report(SearchLocation(where.local, str(where.local)))  # read from the local files
    except Exception as e:
        logger.warning("could not write %s: %s", outputs.REPORT_FILE, e)


def _summary(job: JobSpec, where: SearchLocation, records: list[TrialRecord], *, best: BestRecord | None,
             tracker: Tracker | None, reason: StopReason | None, note: str | None, wall_s: float) -> SearchSummary:
    metric, mode = job.search.metric, job.search.mode
    rows = outputs.trial_rows(records, metric=metric, mode=mode)
    counts = trial_log.count_statuses(records)
    return SearchSummary(
        search_dir=where.local, location=where.experiment, best=best, counts=counts,
        top=outputs.top_trials(rows, metric=metric, mode=mode), wall_s=wall_s,
        tracking_uri=tracker.uri if tracker else None, parent_run_id=tracker.parent_run_id if tracker else None,
        reason=reason, stopped=_stopped_text(reason, job, where, failed=counts.get(TrialStatus.FAILED.value, 0)),
        note=note,
        columns=[name for name, p in job.space if not isinstance(p, FixedParam)],
    )


def _stopped_text(reason: StopReason | None, job: JobSpec, where: SearchLocation, *, failed: int) -> str | None:
    """Why the search stopped early, and what to do about it."""
    if reason is StopReason.FAILURE_LIMIT:
        return (f"{failed} trials failed (search.max_failed_trials: "
                f"{job.search.max_failed_trials}); their errors are in {outputs.TRIALS_FILE}")
    if reason is StopReason.STORAGE_FULL:
        from hpsearch.tune import storage

        return (f"{reason} ({storage.stopped() or 'no space left on device'}); free space in {job.storage}, then "
                f"continue with: hpsearch resume {where.experiment}")
    if reason is not None:
        return f"{reason}; continue with: hpsearch resume {where.experiment}"
    return None

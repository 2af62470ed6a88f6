"""JobSpec → a Ray Tune search: runtime, Tuner, fit, resume, outputs.

The order of a run is chosen so that everything a user can get wrong fails before any trial
starts, and a failure then leaves nothing behind: the search folder (checked, not yet created),
the data (loaded once, in the driver), Ray, then MLflow's parent run, and only then ``fit()``.

Ray is imported here (and in :mod:`hpsearch.raytune`, which only this module imports), never at
the top: ``hpsearch --help`` and ``hpsearch validate`` stay instant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hpsearch import results
from hpsearch.errors import SearchError, StorageError
from hpsearch.spec import FixedParam, JobSpec, load_job

logger = logging.getLogger(__name__)

STATE_FILE = "hpsearch_state.json"  # MLflow parent run id etc., for resume


@dataclass
class SearchSummary:
    """What the CLI prints at the end of a search."""

    search_dir: Path
    best: dict[str, Any] | None
    counts: dict[str, int]
    top: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    stopped: str | None = None  # why the search ended before all its trials did, if it did
    location: str = ""  # <storage>/<name>: the search folder, or its URI
    note: str | None = None  # how the search ended, when users should know (e.g. its time budget)
    columns: list[str] = field(default_factory=list)  # the hyperparameters searched (the table's columns)


def run_search(job: JobSpec, *, address: str | None = None, trial_fn: Any = None) -> SearchSummary:
    """Run the search a job describes and write its outputs. Raises HpsearchError on bad input.

    ``trial_fn`` replaces the per-trial function (tests inject faults through it); it takes the
    same arguments as :func:`hpsearch.trial.run_trial`.
    """
    t_start = time.time()
    place = Place.of(job)
    search_dir = place.local
    if _has_search(search_dir) or (place.remote is not None and place.remote.exists("tuner.pkl")):
        raise SearchError(
            f"storage: {place.experiment} already holds a search named {job.name!r}; continue it with "
            f"`hpsearch resume {place.experiment}`, or start a new one with `--set name=<new name>`"
        )
    if place.remote is not None:
        place.remote.check_writable()
        shutil.rmtree(search_dir, ignore_errors=True)  # a mirror left by an earlier search of this name
    _check_writable(search_dir.parent)
    created = not search_dir.exists()
    try:
        search_dir.mkdir(parents=True, exist_ok=True)
        results.write_yaml(search_dir / results.JOB_FILE, job.to_dict())
        place.upload(results.JOB_FILE)
        return _fit(job, place=place, address=address, resume=False, t_start=t_start, trial_fn=trial_fn)
    except BaseException:
        # Nothing half-written: a search that never got to run its trials leaves no folder.
        if created and not (search_dir / results.TRIAL_LOG).exists():
            shutil.rmtree(search_dir, ignore_errors=True)
        raise


def resume_search(location: str | os.PathLike[str], *, address: str | None = None,
                  trial_fn: Any = None) -> SearchSummary:
    """Continue a search stopped or killed midway: finished trials kept, unfinished ones resumed.

    ``location``: the search's folder (``<storage>/<name>``), or its URI for a URI storage.
    """
    from dataclasses import replace

    from hpsearch import storage

    t_start = time.time()
    if storage.is_uri(str(location)):
        where = str(location).rstrip("/")
        remote = storage.Remote(where)
        search_dir = storage.mirror_dir(where)
        # What the driver needs of the search: its job, its trial log, its MLflow run ids.
        for name in (results.JOB_FILE, results.TRIAL_LOG, STATE_FILE):
            if remote.exists(name):
                remote.download(name, search_dir / name)
        started = remote.exists("tuner.pkl")
        storage_at, _, name = where.rpartition("/")
    else:
        search_dir = Path(location).expanduser().resolve()
        where, started = str(search_dir), (search_dir / "tuner.pkl").exists()
        storage_at, name = str(search_dir.parent), search_dir.name
    job_file = search_dir / results.JOB_FILE
    if not job_file.is_file():
        raise SearchError(f"{where}: not a search folder (no {results.JOB_FILE}); give <storage>/<name>")
    job = load_job(job_file)
    if job.experiment_location() != where:
        # The search was moved (or this is a URI search's local mirror): it continues where it is.
        job = replace(job, storage=storage_at, name=name)
    if not started:
        raise SearchError(f"{where}: Ray Tune never started this search, so there is nothing to resume; "
                          "run it again with `hpsearch run`")
    try:
        restored = storage.restore_missing_checkpoints(where)
    except Exception as e:  # a repair, not a precondition: Tune's own restore says what is wrong
        logger.warning("could not check the checkpoints Tune's last snapshot names: %s", e)
    else:
        if restored:
            logger.info("put back %d checkpoint(s) that Tune's last snapshot names but the trials had deleted "
                        "since (they continue from their newest)", len(restored))
    return _fit(job, place=Place.of(job), address=address, resume=True, t_start=t_start, trial_fn=trial_fn)


@dataclass(frozen=True)
class Place:
    """Where one search lives: hpsearch's files (``local``) and Tune's experiment (``experiment``).

    With a plain-path storage both are ``<storage>/<name>``. With a URI storage, Tune writes the
    experiment at the URI and hpsearch's files are written locally, then uploaded beside it.
    """

    local: Path
    experiment: str
    remote_uri: str | None = None

    @staticmethod
    def of(job: JobSpec) -> Place:
        from hpsearch import storage

        uri = job.experiment_location() if storage.is_uri(job.storage) else None
        return Place(job.storage_dir(), job.experiment_location(), uri)

    @functools.cached_property
    def remote(self) -> Any:
        from hpsearch import storage

        return storage.Remote(self.remote_uri) if self.remote_uri else None

    def upload(self, *names: str) -> None:
        remote = self.remote
        if remote is None:
            return
        for name in names:
            if (self.local / name).is_file():
                remote.upload(self.local / name, name)


# --------------------------------------------------------------------------------------------


def _has_search(search_dir: Path) -> bool:
    return (search_dir / "tuner.pkl").exists() or (search_dir / results.TRIALS_FILE).exists()


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".hpsearch-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"storage: cannot write to {folder}: {e.strerror or e}; "
                           "set storage to a folder you can write") from None


def _import_ray(address: str | None) -> None:
    """Set Ray's environment (read once, at its import) and import it. Idempotent."""
    if address is None:
        # Keep an embedded Ray on 127.0.0.1 only, so a search on a laptop opens no port to its
        # network (Ray otherwise binds the routable address).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Our callback keeps the record we need; Tune's CSV/JSON/TensorBoard loggers are overhead.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Checkpoint retention forces an experiment snapshot every few epochs; that is expected here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray  # noqa: F401

    # Quiet the libraries' set-up chatter; our own log says what happens.
    # Tune's ResultGrid looks for the result.json files we do not write (our trial log replaces them).
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _import_search_modules() -> None:
    """Tune, Optuna and our modules that use them: imported while Ray starts (seconds of imports)."""
    import optuna

    from hpsearch import raytune, space, trial  # noqa: F401

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _init_ray(address: str | None) -> bool:
    """Start embedded Ray on loopback, or connect to ``address``. Returns True if we started it."""
    _import_ray(address)
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address is None:
            # Ray starts idle worker processes for the first driver's tasks; Tune's trials run in
            # actors, which get workers of their own, so on a small machine those only steal CPU
            # from the set-up.
            ray.init(include_dashboard=False, _system_config={"prestart_worker_first_driver": False}, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as e:
        raise SearchError(f"--address {address}: cannot connect to Ray: {str(e).strip().splitlines()[0]}"
                          if address else f"cannot start Ray: {e}") from None
    return True


def _fit(job: JobSpec, *, place: Place, address: str | None, resume: bool, t_start: float,
         trial_fn: Any = None) -> SearchSummary:
    from concurrent.futures import ThreadPoolExecutor

    search_dir = place.local

    tracker = _tracker(job, search_dir)
    new_parent = tracker is not None and tracker.parent_run_id is None
    started_ray = False
    # The set-up costs overlap: the data set is read, MLflow's store opened and Tune imported in
    # threads while Ray starts its processes. Ray is imported first and alone (imports hold the
    # GIL), so that its processes start as early as they can; the other imports then run while
    # ray.init mostly waits for them. Any failure among them stops the search before a trial
    # runs, and what was set up is undone.
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="hpsearch-setup") as pool:
        data_f = pool.submit(_load_data, job)
        track_f = tune_f = None
        try:
            _import_ray(address)
            track_f = pool.submit(_start_tracking, tracker, job, place) if new_parent else None
            tune_f = pool.submit(_import_search_modules)
            started_ray = _init_ray(address)
            logger.debug("%.1f s: Ray ready", time.time() - t_start)

            if address is not None and place.remote_uri is None:
                _check_shared_storage(search_dir)
            tune_f.result()
            dataset, pretrained = data_f.result()
            logger.debug("%.1f s: data ready", time.time() - t_start)
            if track_f is not None:
                track_f.result()
                logger.debug("%.1f s: MLflow ready", time.time() - t_start)
            tuner, gpu, at_once = _tuner(job, place=place, dataset=dataset, tracker=tracker, resume=resume,
                                         local=address is None, trial_fn=trial_fn, pretrained=pretrained)
        except BaseException:
            for f in (data_f, track_f, tune_f):
                if f is not None:
                    f.cancel()
            # exception() waits for a parent run still being created, so it is never left behind.
            if new_parent and track_f is not None and not track_f.cancelled() and track_f.exception() is None:
                tracker.abandon()
            if started_ray:
                _shutdown_ray()
            raise
    try:
        logger.info("search %s: %d trials, %s sampler, %s scheduler, %s cpu + %s gpu per trial%s",
                    job.name, job.search.num_samples, job.search.searcher.sampler, job.search.scheduler.name,
                    f"{job.resources.cpu:g}", f"{gpu:g}", f", {at_once} at a time" if at_once else "")
        t_fit = time.time()
        logger.debug("%.1f s: fit starts", t_fit - t_start)
        with _sigterm_stops_gracefully():
            tuner.fit()
        logger.debug("%.1f s: fit done", time.time() - t_start)
        records, stopped, note = _fold_log(job, place=place, fit_s=time.time() - t_fit)
        final = None
        if stopped is None:  # a finished search gets its final score (an interrupted one on resume)
            try:
                with _sigterm_interrupts():
                    final = _retrain_best(job, records, place=place, dataset=dataset, gpu=gpu, pretrained=pretrained,
                                          slots=at_once or trial_slots(_cluster_resources(), cpu=job.resources.cpu,
                                                                       gpu=gpu))
            except KeyboardInterrupt:  # the trials' outputs are still written; resume retrains
                logger.warning("final: retraining interrupted")
                stopped = f"interrupted during the final retraining; continue with: hpsearch resume {place.experiment}"
        # The outputs need no Ray: write them while Ray shuts down (seconds, on a small machine).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpsearch-results") as pool:
            summary = pool.submit(_write_results, job, place=place, dataset=dataset, tracker=tracker,
                                  t_start=t_start, records=records, stopped=stopped, note=note, final=final,
                                  gpu=gpu)
            if started_ray:
                _shutdown_ray()
                started_ray = False
                logger.debug("%.1f s: Ray shut down", time.time() - t_start)
            result = summary.result()
            logger.debug("%.1f s: outputs written", time.time() - t_start)
        result.wall_s = time.time() - t_start
        return result
    finally:
        if started_ray:
            _shutdown_ray()


def _check_shared_storage(search_dir: Path) -> None:
    """On a cluster of several nodes, every node must see the storage folder (since Ray 2.7 trial
    folders are not synced to the head): refuse before any trial starts, with the fix.

    Checked, not guessed: the driver writes a probe file and a task on every node looks for it.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        logger.info("storage %s: a local path on a one-node cluster; nodes added later must see it at the "
                    "same path (NFS), or use an s3:// / gs:// storage", search_dir.parent)
        return
    probe = search_dir.parent / f".hpsearch-shared-{uuid.uuid4().hex}"
    probe.write_text("")
    try:
        @ray.remote(num_cpus=0)
        def sees(path: str) -> bool:
            return os.path.exists(path)

        refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe))
            for n in nodes}
        blind = [name for name, ref in refs.items() if not ray.get(ref, timeout=120)]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise StorageError(
            f"storage: {search_dir.parent} is not shared: {len(blind)} of the cluster's {len(nodes)} nodes "
            f"cannot see it ({', '.join(blind)}). Trials on several nodes need one storage they all reach: "
            "a shared filesystem (NFS) mounted at the same path on every node, or an s3:// / gs:// URI"
        )


def _load_data(job: JobSpec) -> tuple[Any, Any]:
    """The data set, and the pretrained weights the model starts from (if any): both fail fast."""
    from hpsearch import data as data_mod

    dataset = data_mod.load(job.data, seed=job.seed)
    pretrained = None
    if job.model.kind == "resnet18" and job.model.weights != "none":
        from hpsearch.models import pretrained_weights

        pretrained = pretrained_weights(job.model)
    return dataset, pretrained


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


def _tracker(job: JobSpec, search_dir: Path) -> Any:
    if not job.tracking.enabled:
        return None
    from hpsearch.tracking import Tracker

    state = _read_state(search_dir)
    uri = state.get("tracking_uri") or job.tracking_uri()
    return Tracker(uri=uri, experiment=job.experiment, parent_run_id=state.get("parent_run_id"))


def _start_tracking(tracker: Any, job: JobSpec, place: Place) -> None:
    tracker.start(job=job.to_dict(), run_name=job.name, job_file=place.local / results.JOB_FILE)
    _write_state(place.local, {"tracking_uri": tracker.uri, "parent_run_id": tracker.parent_run_id})
    place.upload(STATE_FILE)


@contextlib.contextmanager
def _sigterm_stops_gracefully() -> Iterator[None]:
    """SIGTERM (a scheduler, ``kill``, a pod's shutdown) stops the search like Ctrl-C does.

    Tune handles SIGINT and SIGUSR1 by checkpointing the running trials and returning from
    ``fit()``; it ignores SIGTERM. We pass SIGTERM on as SIGUSR1. Signal handlers can only be set
    from the main thread; elsewhere the defaults stay.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGUSR1))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Outside ``fit()`` (the final retraining), SIGTERM stops like Ctrl-C: KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tuner(job: JobSpec, *, place: Place, dataset: Any, tracker: Any, resume: bool, local: bool = False,
           trial_fn: Any = None, pretrained: Any = None) -> tuple[Any, float, int | None]:
    """A new Tuner for the job, or the restored one of its place; the GPUs per trial; and how many
    trials run at once, if that is fixed (None: as many as the cluster's resources allow, as it grows).

    ``local``: Ray runs on this machine only (no ``--address``), so its resources are all there will be.
    """
    search_dir = place.local
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from hpsearch import raytune, space, trial

    gpu = job.resources.gpu
    if gpu is None:  # auto: pack four small-model trials onto each GPU, when there are GPUs
        gpu = 0.25 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    ended = frozenset(raytune.ended_trials(search_dir / results.TRIAL_LOG)) if resume else frozenset()
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_fn or trial.run_trial, data=dataset.for_trials(), model_spec=job.model, seed=job.seed,
            cpus=job.resources.cpu, gpus=gpu, search_dir=place.experiment, ended=ended,
            **({"pretrained": pretrained} if pretrained is not None else {}),
        ),
        {"cpu": job.resources.cpu, "gpu": gpu},
    )
    if resume:
        tuner = tune.Tuner.restore(place.experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False)
        return tuner, gpu, None

    metric, mode = job.search.metric, job.search.mode
    searcher = raytune.HonestOptunaSearch(space=space.define_by_run(job), metric=metric, mode=mode,
                                          sampler=space.make_sampler(job),
                                          points_to_evaluate=space.enqueued_points(job) or None)
    sched = job.search.scheduler
    if sched.name == "asha":
        scheduler = raytune.ASHAByLength(time_attr="epoch", metric=metric, mode=mode, max_t=job.max_t,
                                         grace_period=sched.grace_period, reduction_factor=sched.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    concurrency = job.search.max_concurrent_trials
    if concurrency is None and local:
        # With a searcher, Tune asks it for one trial at a time and only once the last one's actor
        # runs: the slots fill one actor start (seconds) after another. A machine that cannot grow
        # runs exactly its slots' worth at once, so asking for that many keeps every suggestion
        # fresh and starts the first trials together (their actors start in parallel).
        concurrency = trial_slots(ray.cluster_resources(), cpu=job.resources.cpu, gpu=gpu)
    limit = raytune.FailedTrialsLimit(job.search.max_failed_trials)
    callback = raytune.SearchCallback(log_path=str(search_dir / results.TRIAL_LOG), metric=metric,
                                      upload_to=place.remote_uri,
                                      num_samples=job.search.num_samples, tracker=tracker, limit=limit)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=job.search.num_samples,
            max_concurrent_trials=concurrency,
            time_budget_s=job.search.time_budget_s,
            trial_dirname_creator=trial.trial_dirname,
            reuse_actors=True,  # measured: 16 one-second trials, 47 s with fresh actors, 8 s reused
        ),
        run_config=tune.RunConfig(
            name=job.name,
            storage_path=job.storage if place.remote_uri else str(search_dir.parent),
            callbacks=[callback, raytune.ImportTorchWhenTrialsRun()],
            stop=limit,
            failure_config=tune.FailureConfig(max_failures=job.search.max_failures),
            # Keep the best checkpoints (for the test score) and, always, the latest (for resume).
            # Each deletion forces an experiment snapshot: 2, not 1, halves those.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=mode),
            verbose=0,
        ),
    )
    return tuner, gpu, concurrency


def _cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def trial_slots(resources: dict[str, float], *, cpu: float, gpu: float) -> int:
    """How many trials of ``cpu`` CPUs and ``gpu`` GPUs the ``resources`` hold at once (at least 1)."""
    fits = [resources.get("CPU", 0.0) / cpu] if cpu > 0 else []
    if gpu > 0:
        fits.append(resources.get("GPU", 0.0) / gpu)
    # The small tolerance keeps 1 / 0.25 GPUs at 4 despite floating point.
    return max(1, int(min(fits) + 1e-6)) if fits else 1


def _fold_log(job: JobSpec, *, place: Place, fit_s: float) -> tuple[list[results.TrialRecord], str | None, str | None]:
    """The trials' records after ``fit()``, why the search stopped early (None: it finished) and a
    note for users (how the time budget ended it)."""
    search_dir = place.local
    _fetch_newer_log(place)
    records = records_from_log(search_dir, experiment=place.experiment, model_kind=job.model.kind)
    budget = job.search.time_budget_s
    budget_hit = bool(budget) and fit_s >= budget * 0.98
    if budget_hit:
        # The time budget ends the search: the trials it cut short are over (stopped early, or not
        # run), not interrupted; the search is finished, not waiting for a resume.
        from hpsearch import raytune

        for rec in records:
            if not rec.ended and not rec.error:
                rec.ended = True
                raytune.append_event(search_dir / results.TRIAL_LOG,
                                     {"event": "end", "trial_id": rec.trial_id, "status": rec.status,
                                      "error": None, "reason": "time budget"})
    statuses = [r.status for r in records]
    failed = statuses.count("failed")
    stopped = note = None
    if job.search.max_failed_trials is not None and failed >= job.search.max_failed_trials:
        stopped = (f"{failed} trials failed (search.max_failed_trials: {job.search.max_failed_trials}); "
                   f"their errors are in {results.TRIALS_FILE}")
    elif "interrupted" in statuses or (len(records) < job.search.num_samples and not budget_hit):
        stopped = f"interrupted; continue with: hpsearch resume {place.experiment}"
    if budget_hit:
        note = f"the time budget ({budget:g} s) ended the search after {len(records)} of {job.search.num_samples} trials"
    return records, stopped, note


def _retrain_best(job: JobSpec, records: list[results.TrialRecord], *, place: Place, dataset: Any, gpu: float,
                  slots: int, pretrained: Any = None) -> dict[str, Any] | None:
    """The honest final score (``search.final``): the best configuration retrained from scratch on
    train + validation for its best epoch count, once per seed, in parallel on the trial slots,
    each scored once on the test set. None when off or when there is no best trial.

    A finished search resumed again keeps the retraining it already has (same trial, epoch, seeds).
    """
    from hpsearch import plan

    metric, mode = job.search.metric, job.search.mode
    chosen = results.choose_best(records, metric=metric, mode=mode)
    wanted = job.search.final.seeds
    if chosen is None or wanted <= 0:
        return None
    record, epoch = chosen
    epochs = int(epoch["epoch"])
    times = sorted(float(e["epoch_time_s"]) for e in record.epochs if results._finite(e.get("epoch_time_s")))
    growth = (len(dataset.train) + len(dataset.val)) / max(1, len(dataset.train))
    seeds_n, estimate = plan.final_seeds_that_fit(wanted, epoch_s=times[len(times) // 2] if times else None,
                                                  epochs=epochs, growth=growth, slots=slots,
                                                  budget_s=job.search.time_budget_s)
    seeds = [job.seed + 1000 + i for i in range(seeds_n)]
    previous = _previous_final(place.local)
    if previous and previous.get("trial_id") == record.trial_id and previous.get("epochs") == epochs \
            and previous.get("seeds") == seeds:
        logger.info("final: kept the retraining of trial %s from before", record.trial_id)
        return previous
    note = f" (fewer than search.final.seeds: {wanted}, to stay within {plan.FINAL_SHARE_OF_BUDGET:.0%} of the " \
           "time budget)" if seeds_n < wanted else ""
    logger.info("final: retraining trial %s's configuration on train + validation for %d epochs, %d seed%s%s%s",
                record.trial_id, epochs, seeds_n, "" if seeds_n == 1 else "s",
                f", about {estimate:.0f} s" if estimate else "", note)
    t0 = time.time()
    import ray

    from hpsearch import trial

    task = ray.remote(trial.retrain_task).options(num_cpus=job.resources.cpu, num_gpus=gpu, max_retries=1)
    data_ref = ray.put(dataset)
    refs = [task.remote(record.config, data=data_ref, model_spec=job.model, epochs=epochs, seed=seed,
                        cpus=job.resources.cpu, gpus=gpu, pretrained=pretrained) for seed in seeds]
    try:
        accuracies = [round(float(a), 6) for a in ray.get(refs)]
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    except Exception as e:  # the search's results stand without it
        logger.warning("final: retraining failed (%s); best.yaml has the search checkpoint's test score only",
                       str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None
    final = {"trial_id": record.trial_id, "epochs": epochs, "train_samples": len(dataset.train) + len(dataset.val),
             "seeds": seeds, "test_accuracy": accuracies, **plan.summary_of(accuracies),
             "time_s": round(time.time() - t0, 1)}
    logger.info("final: retrained test accuracy %s ± %s over %d seed%s (%.0f s)", _fmt4(final["mean"]),
                _fmt4(final["std"]), seeds_n, "" if seeds_n == 1 else "s", final["time_s"])
    return final


def _fmt4(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _previous_final(search_dir: Path) -> dict[str, Any] | None:
    """The retraining a finished search's ``best.yaml`` already holds, if any."""
    import yaml

    try:
        return (results.read_best(search_dir) or {}).get("retrained") or None
    except (SearchError, OSError, yaml.YAMLError):
        return None


def _write_results(job: JobSpec, *, place: Place, dataset: Any, tracker: Any, t_start: float,
                   records: list[results.TrialRecord], stopped: str | None, note: str | None,
                   final: dict[str, Any] | None, gpu: float) -> SearchSummary:
    import io

    from hpsearch import storage
    from hpsearch.trial import STATE_FILE as CHECKPOINT_STATE

    search_dir = place.local
    metric, mode = job.search.metric, job.search.mode

    def test_score(checkpoint_dir: str, config: dict[str, Any]) -> tuple[float, Any]:
        import torch

        from hpsearch.trainable import score_test_set

        raw = storage.read_file(f"{checkpoint_dir}/{CHECKPOINT_STATE}")
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        device = "cuda" if gpu > 0 and torch.cuda.is_available() else "cpu"
        return score_test_set(state, config, data=dataset, model_spec=job.model, device=device), state["model"]

    best = results.write_outputs(search_dir, records, metric=metric, mode=mode, test_score=test_score, final=final)
    results.write_yaml(search_dir / results.JOB_FILE, job.to_dict())
    rows = results.trial_rows(records, metric=metric, mode=mode)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1

    if tracker is not None:
        # One child run per trial of the search, with our status; orphans and duplicates closed.
        tracker.reconcile({r.trial_id: r.status for r in records})
        files = [search_dir / name for name in (results.BEST_FILE, results.TRIALS_FILE, results.EPOCHS_FILE)]
        status = "KILLED" if stopped and stopped.startswith("interrupted") else ("FINISHED" if best else "FAILED")
        tracker.finish(best=best, files=files, model_file=search_dir / results.MODEL_FILE, status=status)
    place.upload(results.JOB_FILE, results.TRIALS_FILE, results.EPOCHS_FILE, results.BEST_FILE, results.MODEL_FILE,
                 results.TRIAL_LOG, STATE_FILE)
    return SearchSummary(
        search_dir=search_dir, location=place.experiment, best=best, counts=counts, top=results.top_trials(rows, metric=metric, mode=mode),
        wall_s=time.time() - t_start, tracking_uri=tracker.uri if tracker else None,
        parent_run_id=tracker.parent_run_id if tracker else None, stopped=stopped, note=note,
        columns=[name for name, p in job.space if not isinstance(p, FixedParam)],
    )


def _fetch_newer_log(place: Place) -> None:
    """With a URI storage, the trial log at the URI is the longer one where Tune's loop ran
    elsewhere (a Ray Client driver: the callback then writes on the head and uploads there)."""
    remote = place.remote
    if remote is None or not remote.exists(results.TRIAL_LOG):
        return
    local = place.local / results.TRIAL_LOG
    data = remote.read_bytes(results.TRIAL_LOG)
    if not local.is_file() or len(data) > local.stat().st_size:
        tmp = local.with_name(f".{local.name}.part")
        tmp.write_bytes(data)
        os.replace(tmp, local)


def records_from_log(search_dir: Path, *, experiment: str | None = None,
                     model_kind: str | None = None) -> list[results.TrialRecord]:
    """Fold our trial log into one record per trial (epochs de-duplicated across retries/resumes).

    Left out: orphans, trials a killed driver started that Tune did not know after its restore
    (new trials replaced them, so they are no trials of the search).
    """
    from hpsearch import raytune
    from hpsearch.trial import trial_dirname

    by_id: dict[str, results.TrialRecord] = {}
    epochs: dict[str, dict[int, dict[str, Any]]] = {}
    known: set[str] | None = None
    for e in raytune.read_events(search_dir / results.TRIAL_LOG):
        tid = e.get("trial_id")
        if e["event"] == "start":
            rec = by_id.setdefault(tid, results.TrialRecord(trial_id=tid, config=e["config"], model_kind=model_kind))
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
        rec.checkpoints = _checkpoints(f"{(experiment or str(search_dir)).rstrip('/')}/{trial_dirname(tid)}")
    return [r for tid, r in by_id.items() if known is None or tid in known]


def _checkpoints(trial_location: str) -> list[tuple[str, dict[str, Any]]]:
    """(folder, its epoch's metrics) of each complete checkpoint of a trial (local path or URI)."""
    from hpsearch import storage
    from hpsearch.trial import CHECKPOINT_METRICS

    found = []
    for folder in storage.checkpoint_folders(trial_location):
        try:
            found.append((folder, json.loads(storage.read_file(f"{folder}/{CHECKPOINT_METRICS}"))))
        except (OSError, ValueError):  # cut short by a kill: not a checkpoint to use
            continue
    return found


def _read_state(search_dir: Path) -> dict[str, Any]:
    path = search_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(search_dir: Path, state: dict[str, Any]) -> None:
    tmp = search_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, search_dir / STATE_FILE)

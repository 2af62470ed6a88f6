"""A JobSpec → Ray Tune's ``Tuner``: a new one, or the one a search's experiment restores."""

from __future__ import annotations

from typing import Any, Callable

from ray import tune
from ray.tune.schedulers import FIFOScheduler

from hpsearch import plan, space
from hpsearch.data import Dataset
from hpsearch.progress import Forecast, Progress
from hpsearch.record.location import SearchLocation, trial_dirname
from hpsearch.record.study import StudyWriter
from hpsearch.record.trial_log import LOG_FILE, last_results_of_ended
from hpsearch.spec import JobSpec
from hpsearch.tracking import Tracker
from hpsearch.tune import callbacks, scheduler, searcher, snapshot, trial

TrialFn = Callable[..., None]  # run_trial's arguments; tests inject faults through one


def trainable(job: JobSpec, where: SearchLocation, *, dataset: Dataset, gpu: float, resume: bool,
              trial_fn: TrialFn | None = None, pretrained: Any = None) -> Any:
    """The function every trial runs, with the data, the model and its resources bound."""
    ended = last_results_of_ended(where.local / LOG_FILE, metric=job.search.metric) if resume else {}
    return tune.with_resources(
        tune.with_parameters(
            trial_fn or trial.run_trial, data=dataset.for_trials(), model_spec=job.model, seed=job.seed,
            cpus=job.resources.cpu, gpus=gpu, search_dir=where.experiment, ended=ended, code=job.code,
            **({"pretrained": pretrained} if pretrained is not None else {}),
        ),
        {"cpu": job.resources.cpu, "gpu": gpu},
    )


def restore(where: SearchLocation, fn: Any) -> tune.Tuner:
    """The Tuner of a search that ran before: finished trials kept, unfinished ones resumed."""
    snapshot.throttle_forced_snapshots()
    return tune.Tuner.restore(where.experiment, trainable=fn, resume_unfinished=True, resume_errored=False)


def build(job: JobSpec, where: SearchLocation, fn: Any, *, tracker: Tracker | None,
          concurrency: int | None) -> tune.Tuner:
    """A new Tuner for the job: Optuna's searcher, ASHA (or FIFO), our record-keeping callback.

    ``concurrency``: how many trials run at once, when that is fixed (None: as many as the
    cluster's resources allow, as it grows).
    """
    snapshot.throttle_forced_snapshots()
    metric, mode = job.search.metric, job.search.mode
    search_alg = searcher.HonestOptunaSearch(space=space.define_by_run(job), metric=metric, mode=mode,
                                             sampler=space.make_sampler(job),
                                             points_to_evaluate=space.enqueued_points(job) or None)
    sched = job.search.scheduler
    if sched.name == "asha":
        stopper = scheduler.ASHAByPhase(time_attr="epoch", metric=metric, mode=mode, max_t=job.max_t,
                                        grace_period=sched.grace_period, reduction_factor=sched.reduction_factor)
    else:
        stopper = FIFOScheduler()
    limit = callbacks.FailedTrialsLimit(job.search.max_failed_trials)
    progress = Progress(num_samples=job.search.num_samples, metric=metric, mode=mode,
                        budget_s=job.search.time_budget_s)
    expected = plan.make_plan(job).expected_epochs
    forecast = Forecast(expected_epochs=expected, slots=concurrency or 1, budget_s=job.search.time_budget_s)
    record = callbacks.SearchCallback(log_path=str(where.local / LOG_FILE), metric=metric,
                                      upload_to=where.remote_uri, num_samples=job.search.num_samples,
                                      tracker=tracker, limit=limit, progress=progress,
                                      study=StudyWriter(str(where.local), job), forecast=forecast)
    return tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=stopper,
            num_samples=job.search.num_samples,
            max_concurrent_trials=concurrency,
            time_budget_s=job.search.time_budget_s,
            trial_dirname_creator=trial_dirname,
            reuse_actors=True,  # measured: 16 one-second trials, 47 s with fresh actors, 8 s reused
        ),
        run_config=tune.RunConfig(
            name=job.name,
            storage_path=where.storage,
            callbacks=[record, callbacks.ImportEndOfSearchModules()],
            stop=limit,
            failure_config=tune.FailureConfig(max_failures=job.search.max_failures),
            # Keep the best checkpoints (for the test score) and, always, the latest (for resume).
            # Every num_to_keep checkpoints of a trial Tune forces a snapshot: 2, not 1, halves
            # those (and snapshot.throttle_forced_snapshots spaces them).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=mode),
            verbose=0,
        ),
    )

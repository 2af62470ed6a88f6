"""The honest final score: the best configuration retrained on train + validation, once per seed,
as Ray tasks in parallel on the trial slots, each scored once on the test set (``search.final``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray

from hpsearch import plan
from hpsearch.data import Dataset
from hpsearch.errors import SearchError
from hpsearch.record import outputs, trial_log
from hpsearch.record.outputs import Retrained
from hpsearch.record.trial_log import TrialRecord
from hpsearch.spec import JobSpec
from hpsearch.tune import trial

logger = logging.getLogger("hpsearch.search")


def retrain_best(job: JobSpec, records: list[TrialRecord], search_dir: Path, *, dataset: Dataset, gpu: float,
                 slots: int, pretrained: Any = None) -> Retrained | None:
    """The honest final score (``search.final``): the best configuration retrained from scratch on
    train + validation for its best epoch count, once per seed, in parallel on the trial slots,
    each scored once on the test set. None when off or when there is no best trial.

    A finished search resumed again keeps the retraining it already has (same trial, epoch, seeds).
    """
    chosen = trial_log.choose_best(records, metric=job.search.metric, mode=job.search.mode)
    wanted = job.search.final.seeds
    if chosen is None or wanted <= 0:
        return None
    record, epoch = chosen
    epochs = int(epoch["epoch"])
    times = sorted(float(e["epoch_time_s"]) for e in record.epochs if trial_log.is_finite(e.get("epoch_time_s")))
    growth = (len(dataset.train) + len(dataset.val)) / max(1, len(dataset.train))
    seeds_n, estimate = plan.final_seeds_that_fit(wanted, epoch_s=times[len(times) // 2] if times else None,
                                                  epochs=epochs, growth=growth, slots=slots,
                                                  budget_s=job.search.time_budget_s)
    seeds = [job.seed + 1000 + i for i in range(seeds_n)]
    previous = _previous_final(search_dir)
    if previous and (previous.get("trial_id"), previous.get("epochs"), previous.get("seeds")) == (
            record.trial_id, epochs, seeds):
        logger.info("final: kept the retraining of trial %s from before", record.trial_id)
        return previous
    fewer = f" (fewer than search.final.seeds: {wanted}, to stay within {plan.FINAL_SHARE_OF_BUDGET:.0%} of the " \
            "time budget)" if seeds_n < wanted else ""
    logger.info("final: retraining trial %s's configuration on train + validation for %d epochs, %d seed%s%s%s",
                record.trial_id, epochs, seeds_n, "" if seeds_n == 1 else "s",
                f", about {estimate:.0f} s" if estimate else "", fewer)
    t0 = time.time()
    try:
        accuracies = retrain(job, record.config, dataset=dataset, epochs=epochs, seeds=seeds, gpu=gpu,
                             pretrained=pretrained)
    except Exception as e:  # the search's results stand without it
        logger.warning("final: retraining failed (%s); best.yaml has the search checkpoint's test score only",
                       str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None
    final: Retrained = {"trial_id": record.trial_id, "epochs": epochs,
                        "train_samples": len(dataset.train) + len(dataset.val), "seeds": seeds,
                        "test_accuracy": accuracies, **plan.summary_of(accuracies),  # type: ignore[typeddict-item]
                        "time_s": round(time.time() - t0, 1)}
    logger.info("final: retrained test accuracy %s ± %s over %d seed%s (%.0f s)", _fmt4(final["mean"]),
                _fmt4(final["std"]), seeds_n, "" if seeds_n == 1 else "s", final["time_s"])
    return final


def _previous_final(search_dir: Path) -> Retrained | None:
    """The retraining a finished search's ``best.yaml`` already holds, if any."""
    import yaml

    try:
        return (outputs.read_best(search_dir) or {}).get("retrained") or None
    except (SearchError, OSError, yaml.YAMLError):
        return None


def retrain(job: JobSpec, config: dict, *, dataset: Dataset, epochs: int, seeds: list[int], gpu: float,
            pretrained: Any = None) -> list[float]:
    """Each seed's test accuracy after retraining ``config`` on train + validation for ``epochs``.

    Raises what a task raised; on KeyboardInterrupt (Ctrl-C, SIGTERM) the tasks are cancelled.
    """
    task = ray.remote(trial.retrain_task).options(num_cpus=job.resources.cpu, num_gpus=gpu, max_retries=1)
    data_ref = ray.put(dataset)
    refs = [task.remote(config, data=data_ref, model_spec=job.model, epochs=epochs, seed=seed, code=job.code,
                        cpus=job.resources.cpu, gpus=gpu, pretrained=pretrained) for seed in seeds]
    try:
        return [round(float(a), 6) for a in ray.get(refs)]
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


def _fmt4(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)

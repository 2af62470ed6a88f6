"""The functions Ray runs in a trial's worker process: every trial, and each final retraining.

Kept apart from the driver's modules so that a worker imports only Ray Tune and
:mod:`hpsearch.trainable` (torch) when it starts: every second of imports there delays the first
trials.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import ray
from ray import tune

from hpsearch.data import Dataset
from hpsearch.record import checkpoints
from hpsearch.record.location import join, read_file, trial_dirname
from hpsearch.record.trial_log import REPLAYED, RESULT_KEYS
from hpsearch.spec import ModelSpec


def run_trial(config: dict[str, Any], *, data: Dataset, model_spec: ModelSpec, seed: int, cpus: float, gpus: float,
              search_dir: str = "", ended: Mapping[str, dict[str, Any]] | None = None, pretrained: Any = None,
              code: tuple[str, ...] = ()) -> None:
    """Tune's trainable: adapts :func:`hpsearch.trainable.train` to ``tune.report`` and checkpoints.

    ``search_dir``: the search's folder in the storage (a path or a URI), where the trial's
    checkpoints are kept.
    ``ended``: on resume, the trials our log saw end, each with its last result. Tune restores
    from its last experiment snapshot, which can be older than a trial's end; such a trial must
    not run again (an ASHA-stopped one would otherwise train to its full budget): it reports its
    last result once more, for Tune, its scheduler and its searcher (the record has it already:
    the driver's callback leaves it out), and returns.
    ``pretrained``: ResNet-18's starting weights, read once by the driver.
    ``code``: the folders the job's own code (its factories) is imported from.
    """
    from hpsearch import entrypoints, trainable

    entrypoints.on_path(code)
    trial_id = tune.get_context().get_trial_id()
    if ended and trial_id in ended:
        tune.report({**ended[trial_id], REPLAYED: True})
        return

    state, last = None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, last = _read_checkpoint(str(folder))
    elif search_dir:
        # After a killed driver, Tune restores from its last experiment snapshot, which may predate
        # the trial's newest checkpoints (or all of them); those are on disk all the same.
        state, last = _newest_state(join(search_dir, trial_dirname(trial_id)))
    reported = False

    # Which node ran each epoch: on a cluster, where a trial moved after a node was lost.
    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, Any], to_save: dict[str, Any] | None) -> None:
        nonlocal reported
        reported = True
        metrics = {**metrics, "node_id": node_id, "worker_pid": os.getpid()}
        if to_save is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            state = Path(folder) / checkpoints.STATE_FILE
            trainable.save_state(to_save, state)
            # Last: the checkpoint is whole (its state as long as it says). Its metrics put the epoch
            # back in the record if the driver is killed before it logs them
            # (hpsearch.record.trial_log.recover_cut_epochs).
            (Path(folder) / checkpoints.METRICS_FILE).write_text(json.dumps(
                {**metrics, "timestamp": time.time(), checkpoints.STATE_BYTES: state.stat().st_size}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    trainable.train_on_device(config, data=data, model_spec=model_spec, report=report, state=state, gpus=gpus,
                              cpus=cpus, seed=seed, pretrained=pretrained)
    if not reported and last is not None:
        # Resumed from the checkpoint of its last epoch (a kill came between it and the trial's
        # end): nothing left to train, and Tune needs a result with the metric. The record has it.
        tune.report({**{k: last[k] for k in RESULT_KEYS if k in last}, REPLAYED: True})


def _newest_state(trial_location: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The state and metrics of the newest readable checkpoint in a trial's folder (a local path
    or a URI); (None, None) when there is none."""
    for folder in checkpoints.newest_first(trial_location):
        try:
            return _read_checkpoint(folder)
        except Exception:  # a checkpoint cut short by the kill: try the one before
            continue
    return None, None


def _read_checkpoint(folder: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A checkpoint's state and the metrics of its epoch (None if it has none)."""
    from hpsearch import trainable

    state = trainable.load_state(read_file(f"{folder}/{checkpoints.STATE_FILE}"))
    try:
        metrics = json.loads(read_file(f"{folder}/{checkpoints.METRICS_FILE}"))
    except (OSError, ValueError):
        metrics = None
    return state, metrics


def retrain_task(config: dict[str, Any], *, data: Dataset, model_spec: ModelSpec, epochs: int, seed: int,
                 cpus: float, gpus: float, pretrained: Any = None, code: tuple[str, ...] = ()) -> float:
    """One retraining of the best configuration (a Ray task): its test accuracy."""
    from hpsearch import entrypoints, trainable

    entrypoints.on_path(code)
    return trainable.retrain_on_device(config, data=data, model_spec=model_spec, epochs=epochs, seed=seed,
                                       gpus=gpus, cpus=cpus, pretrained=pretrained)

"""The function every Ray Tune trial runs, in the trial's worker process.

Kept apart from :mod:`hpsearch.raytune` (the driver's side) so that a worker imports only Ray Tune
and torch when it starts: every second of imports there delays the first trials.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from hpsearch.spec import ModelSpec
from hpsearch.storage import CHECKPOINT_COMPLETE

STATE_FILE = "state.pt"  # model + optimizer + epoch, in each checkpoint folder
CHECKPOINT_METRICS = CHECKPOINT_COMPLETE  # the epoch's metrics, written last (to pick the best checkpoint)


# --------------------------------------------------------------------------------------------
# Runs in the trial's worker process.
# --------------------------------------------------------------------------------------------


def run_trial(config: dict[str, Any], *, data: Any, model_spec: ModelSpec, seed: int, cpus: float, gpus: float,
              search_dir: str = "", ended: frozenset[str] = frozenset(), pretrained: Any = None) -> None:
    """Tune's trainable: adapts :func:`hpsearch.trainable.train` to ``tune.report`` and checkpoints.

    ``search_dir``: the search's folder in the storage (a path or a URI), where the trial's
    checkpoints are kept.
    ``ended``: on resume, the trials our log saw end. Tune restores from its last experiment
    snapshot, which can be older than a trial's end; such a trial must not run again (an
    ASHA-stopped one would otherwise train to its full budget).
    ``pretrained``: ResNet-18's starting weights, read once by the driver.
    """
    import torch

    from hpsearch.trainable import train

    trial_id = tune.get_context().get_trial_id()
    if trial_id in ended:
        return

    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    else:
        # After a killed driver, Tune restores from its last experiment snapshot, which may predate
        # the trial's newest checkpoints (or all of them); those are on disk all the same.
        state = _latest_checkpoint_in(f"{search_dir.rstrip('/')}/{trial_dirname(trial_id)}") if search_dir else None

    # Which node ran each epoch: on a cluster, where a trial moved after a node was lost.
    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, Any], to_save: dict[str, Any] | None) -> None:
        metrics = {**metrics, "node_id": node_id}
        if to_save is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(to_save, Path(folder) / STATE_FILE)
            (Path(folder) / CHECKPOINT_METRICS).write_text(json.dumps(metrics))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    try:
        train(config, data=data, model_spec=model_spec, report=report, state=state, device=device,
              num_threads=max(1, int(cpus)), seed=seed, pretrained=pretrained)
    except torch.cuda.OutOfMemoryError:
        # One line a user can act on, instead of the allocator's page of numbers.
        raise TrialOutOfMemory(
            f"CUDA out of memory (batch_size={config.get('batch_size')}, "
            f"{gpus:g} GPU per trial): use a smaller batch_size, or fewer trials per GPU "
            "(a larger resources.gpu)"
        ) from None


def _latest_checkpoint_in(trial_location: str) -> dict[str, Any] | None:
    """The newest readable checkpoint in a trial's folder (a local path or a URI)."""
    import io

    import torch

    from hpsearch import storage

    def epoch(folder: str) -> int:
        # By the epoch it holds, not the folder's number: Tune numbers anew after a restore.
        try:
            return int(json.loads(storage.read_file(f"{folder}/{CHECKPOINT_METRICS}"))["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    for folder in sorted(storage.checkpoint_folders(trial_location), key=epoch, reverse=True):
        try:
            return torch.load(io.BytesIO(storage.read_file(f"{folder}/{STATE_FILE}")), map_location="cpu",
                              weights_only=True)
        except Exception:  # a checkpoint cut short by the kill: try the one before
            continue
    return None


class TrialOutOfMemory(RuntimeError):
    """A trial ran out of GPU memory."""


def trial_dirname(trial: Any) -> str:
    """``trial_<id>``: Tune's default folder name spells out the whole config (and gets cut)."""
    return f"trial_{trial if isinstance(trial, str) else trial.trial_id}"


def retrain_task(config: dict[str, Any], *, data: Any, model_spec: ModelSpec, epochs: int, seed: int,
                 cpus: float, gpus: float, pretrained: Any = None) -> float:
    """One retraining of the best configuration (a Ray task): its test accuracy."""
    import torch

    from hpsearch.trainable import retrain

    device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    return retrain(config, data=data, model_spec=model_spec, epochs=epochs, seed=seed, device=device,
                   num_threads=max(1, int(cpus)), pretrained=pretrained)

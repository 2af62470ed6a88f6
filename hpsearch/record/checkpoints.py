"""A trial's checkpoints: one ``checkpoint_NNNNNN`` folder per kept epoch in the trial's folder.

Each holds ``state.pt`` (model + optimizer + epoch, written by the trial with torch) and
``metrics.json`` (that epoch's reported metrics), written last: a folder without it was cut short
by a kill and is no checkpoint. Tune keeps a trial's best two and its latest; it numbers the
folders anew after a restore, so a checkpoint's epoch is read from its metrics, not its name.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hpsearch.record.location import is_file, list_folders, read_file

STATE_FILE = "state.pt"  # model + optimizer + epoch (torch's format; hpsearch.trainable reads and writes it)
METRICS_FILE = "metrics.json"  # the epoch's metrics, written last: the checkpoint is whole
FOLDER_PREFIX = "checkpoint_"


def folders(trial_location: str) -> list[str]:
    """The checkpoint folders of a trial (a local path or a URI), whole or not, by name."""
    return list_folders(trial_location, FOLDER_PREFIX)


def whole(trial_location: str) -> list[str]:
    """The checkpoint folders of a trial that were written to the end, by name."""
    return [f for f in folders(trial_location) if is_file(f"{f}/{METRICS_FILE}")]


def with_metrics(trial_location: str) -> list[tuple[str, dict[str, Any]]]:
    """(folder, its epoch's metrics) of each whole checkpoint of a trial."""
    found = []
    for folder in folders(trial_location):
        try:
            found.append((folder, json.loads(read_file(f"{folder}/{METRICS_FILE}"))))
        except (OSError, ValueError):  # cut short by a kill: not a checkpoint to use
            continue
    return found


def newest_first(trial_location: str) -> list[str]:
    """A trial's checkpoint folders from the latest epoch down (the unreadable ones last)."""
    def epoch(folder: str) -> int:
        try:
            return int(json.loads(read_file(f"{folder}/{METRICS_FILE}"))["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    return sorted(folders(trial_location), key=epoch, reverse=True)


def best(checkpoints: list[tuple[str, dict[str, Any]]], *, metric: str, mode: str) -> str | None:
    """The folder of the checkpoint with the best ``metric`` among (folder, metrics) pairs."""
    scored = [(path, res) for path, res in checkpoints if _finite(res.get(metric))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda item: item[1][metric])[0]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

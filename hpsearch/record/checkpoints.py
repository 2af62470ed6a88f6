"""A trial's checkpoints: one ``checkpoint_NNNNNN`` folder per kept epoch in the trial's folder.

Each holds ``state.pt`` (model + optimizer + epoch, written by the trial with torch) and
``metrics.json`` (that epoch's reported metrics, and ``state.pt``'s size), written last: a folder
without it, or whose ``state.pt`` is shorter than it says (Tune's copy to the storage cut short
by a kill or a full disk), is no checkpoint. Tune keeps a trial's best two and its latest; it numbers the
folders anew after a restore, so a checkpoint's epoch is read from its metrics, not its name.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hpsearch.record.location import file_size, list_folders, read_file

STATE_FILE = "state.pt"  # model + optimizer + epoch (torch's format; hpsearch.trainable reads and writes it)
METRICS_FILE = "metrics.json"  # the epoch's metrics, written last: the checkpoint is whole
FOLDER_PREFIX = "checkpoint_"


def folders(trial_location: str) -> list[str]:
    """The checkpoint folders of a trial (a local path or a URI), whole or not, by name."""
    return list_folders(trial_location, FOLDER_PREFIX)


STATE_BYTES = "state_bytes"  # the key of metrics.json that says how long state.pt is


def whole(trial_location: str) -> list[str]:
    """The checkpoint folders of a trial that were written to the end, by name."""
    return [folder for folder, _ in with_metrics(trial_location)]


def with_metrics(trial_location: str) -> list[tuple[str, dict[str, Any]]]:
    """(folder, its epoch's metrics) of each whole checkpoint of a trial."""
    found = []
    for folder in folders(trial_location):
        try:
            metrics = json.loads(read_file(f"{folder}/{METRICS_FILE}"))
            size = metrics.get(STATE_BYTES)
            if size is not None and file_size(f"{folder}/{STATE_FILE}") != size:
                continue  # its state.pt was cut short
            found.append((folder, metrics))
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

"""Repairs of Ray Tune's experiment snapshot before a resume.

Tune snapshots the experiment (``experiment_state-<time>.json``: its JSON with pickled parts in
hex) every ~10 s. After a hard kill (SIGKILL, a lost machine) the newest snapshot can disagree
with the trials' folders; these repairs make a restore find what the snapshot names.

Relies on the snapshot's format (file names, checkpoint paths spelled in it), checked against
Ray 2.60; a Ray upgrade must re-check it (tests/test_failures.py's resume tests do).
"""

from __future__ import annotations

import logging
import re

from hpsearch.errors import SearchError
from hpsearch.record import checkpoints
from hpsearch.record.location import copy_folder, join, list_files, read_file

SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX = "experiment_state-", ".json"

logger = logging.getLogger("hpsearch.search")


def repair(experiment: str, *, name: str) -> list[str]:
    """The repairs, before Tune restores ``experiment`` (``name``: the search's name); returns what
    was done, said for users. A repair that cannot check what it checks is a warning: Tune's own
    restore then says what is wrong.
    """
    done = []
    try:
        restored = restore_missing_checkpoints(experiment)
    except SearchError:
        raise
    except Exception as e:
        logger.warning("could not check Tune's last snapshot and the checkpoints it names: %s", e)
        return done
    if restored:
        done.append(f"put back {len(restored)} checkpoint(s) that Tune's last snapshot names but the trials had "
                    "deleted since (they continue from their newest)")
    return done


def restore_missing_checkpoints(experiment: str) -> list[str]:
    """Put back the checkpoints Tune's last experiment snapshot names but the trials have deleted.

    Each trial keeps only its best two and its latest checkpoint, so the last snapshot can name a
    checkpoint deleted since; Tune's restore then fails that trial, and its retry too. Each such
    checkpoint is copied back from the trial's newest whole one: the trial continues from its
    newest state (it reads its epoch from the checkpoint), as it would have. Returns what was put
    back. Only the paths in the snapshot are read.
    """
    snapshots = list_files(experiment, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX)
    if not snapshots:
        return []
    raw = read_file(join(experiment, snapshots[-1]))
    text = raw
    for blob in re.findall(rb"[0-9a-f]{64,}", raw):
        try:
            text += bytes.fromhex(blob[:len(blob) // 2 * 2].decode())
        except ValueError:
            pass
    restored = []
    for trial, name in sorted(set(re.findall(rb"(trial_[0-9a-f]+)/(checkpoint_\d{6})", text))):
        trial_location = join(experiment, trial.decode())
        target = join(trial_location, name.decode())
        if target in checkpoints.folders(trial_location):
            continue
        whole = checkpoints.whole(trial_location)  # a kill can cut a checkpoint's copy short
        if whole:
            copy_folder(whole[-1], target)
            restored.append(target)
    return restored

"""Ray Tune's experiment snapshot: how often Tune takes it, and repairs of it before a resume.

Tune snapshots the experiment (``experiment_state-<time>.json``: its JSON with pickled parts in
hex) every ~10 s. After a hard kill (SIGKILL, a lost machine) the newest snapshot can disagree
with the trials' folders; these repairs make a restore find what the snapshot names.

Relies on the snapshot's format (file names, checkpoint paths spelled in it) and on Tune's
``_ExperimentCheckpointManager`` (:func:`throttle_forced_snapshots`), checked against Ray 2.60; a
Ray upgrade must re-check them (tests/test_failures.py's resume tests and
tests/test_search.py's snapshot test do).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from hpsearch.errors import SearchError
from hpsearch.record import checkpoints
from hpsearch.record.location import Remote, copy_folder, is_uri, join, list_files, read_file

SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX = "experiment_state-", ".json"

logger = logging.getLogger("hpsearch.search")


# Tune's extra snapshots (below) at most this often, seconds apart.
FORCED_SNAPSHOT_MIN_S = 2.0


def throttle_forced_snapshots() -> None:
    """Tune's extra snapshots, at most one every :data:`FORCED_SNAPSHOT_MIN_S`; call before ``fit()``.

    Besides its periodic snapshot, Tune forces one whenever a trial has checkpointed
    ``num_to_keep`` (2) times since the last, so that the snapshot never names a checkpoint the
    trial has deleted since. With short epochs that is a snapshot every other epoch of every
    trial, each pickling every trial and the searcher (the more trials, the longer), on the
    driver's loop: measured, 300 digits trials of 2-3 epochs (benchmarks/overhead.py's) took
    0.76x the wall time with them spaced (52.5 -> 39.9 s); 100 trials, no difference.

    A resume puts back a checkpoint that a snapshot names but the trial deleted since
    (:func:`restore_missing_checkpoints`), so nothing a crash can cost changes: a trial started
    after the last snapshot is replaced, one that ran continues from its newest checkpoint.
    """
    try:
        from ray.tune.execution.experiment_state import _ExperimentCheckpointManager as Manager
    except ImportError:  # a Ray without it: Tune snapshots as it does
        return
    if getattr(Manager.on_trial_checkpoint, "throttled", False):
        return
    on_trial_checkpoint = Manager.on_trial_checkpoint

    def throttled(self: Any, trial: Any) -> None:
        on_trial_checkpoint(self, trial)
        # Left set, the flag forces a snapshot at the controller's next step. Cleared, the next
        # checkpoint of a trial past its count sets it again (the counts are reset by a snapshot).
        if getattr(self, "_should_force_sync_up", False) and \
                time.monotonic() - getattr(self, "_last_save_time", float("-inf")) < FORCED_SNAPSHOT_MIN_S:
            self._should_force_sync_up = False

    throttled.throttled = True  # type: ignore[attr-defined]
    Manager.on_trial_checkpoint = throttled


def repair(experiment: str, *, name: str) -> list[str]:
    """Both repairs, in order, before Tune restores ``experiment`` (``name``: the search's name);
    returns what was done, said for users. A repair that cannot check what it checks is a warning:
    Tune's own restore then says what is wrong. A snapshot that cannot be repaired is a SearchError.
    """
    done = []
    try:
        cut = repair_cut_snapshot(experiment, name=name)
        done += [said for said in (repair_cut_searcher_state(experiment, name=name),
                                   reconcile_searcher(experiment)) if said]
        restored = restore_missing_checkpoints(experiment)
    except SearchError:
        raise
    except Exception as e:
        logger.warning("could not check Tune's last snapshot and the checkpoints it names: %s", e)
        return done
    if cut:
        done.append(cut)
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


def repair_cut_snapshot(experiment: str, *, name: str) -> str | None:
    """Make the newest experiment snapshot a whole one, if a kill cut it short. Returns what was done.

    Tune writes the snapshot in its driver's staging folder (in Ray's temp folder) and then copies
    it beside the trials, not atomically: a SIGKILL during that copy leaves it empty or cut, and
    Tune's restore fails on it with a JSON error. The staging copy is usually still whole (the
    killed driver's Ray session folder stays): it is put back. Failing that, the cut snapshot is
    set aside (renamed ``*.cut``), so that Tune restores from the snapshot before it; with none,
    a SearchError says so (rather than Tune's JSON error).
    ``name``: the experiment's folder name (the search's), as in the staging path.
    """
    snapshots = list_files(experiment, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX)
    if not snapshots or _whole_json(read_file(join(experiment, snapshots[-1]))):
        return None
    newest = snapshots[-1]
    staged = _staged_copy(name, newest, _whole_json)
    if staged:
        _replace(experiment, newest, Path(staged).read_bytes())
        return f"put back Tune's snapshot {newest}, cut short by the kill, from its staging copy {staged}"
    if any(_whole_json(read_file(join(experiment, older))) for older in snapshots[:-1]):
        _replace(experiment, newest + ".cut", read_file(join(experiment, newest)))
        _delete(experiment, newest)
        return f"set aside Tune's snapshot {newest}, cut short by the kill: the search resumes from the one before"
    raise SearchError(f"{experiment}: Tune's snapshot {newest} was cut short (its driver was killed while writing "
                      "it) and no whole copy of it is left, so Tune cannot restore the search; the trials it ran "
                      "are in hpsearch_trials.jsonl. Start it again under a new name (`--set name=...`)")


# Tune's searcher, pickled beside its snapshot: the search generator and its ConcurrencyLimiter
# (cloudpickle), and Optuna's study with Tune's bookkeeping (OptunaSearch.__dict__, pickle).
GENERATOR_PREFIX, GENERATOR_SUFFIX = "search_gen_state-", ".json"
SEARCHER_PREFIX, SEARCHER_SUFFIX = "searcher-state-", ".pkl"
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")  # the trials a resume runs on (errored ones stay so)


def repair_cut_searcher_state(experiment: str, *, name: str) -> str | None:
    """Make the newest searcher files whole, if a kill cut one short while Tune copied it: Tune's
    restore then fails on it, or restores a searcher that never suggests again and the resumed
    search waits forever. Put back from the staging copy; with none, a SearchError."""
    done = []
    for prefix, suffix in ((GENERATOR_PREFIX, GENERATOR_SUFFIX), (SEARCHER_PREFIX, SEARCHER_SUFFIX)):
        states = list_files(experiment, prefix, suffix)
        if not states or _whole_pickle(read_file(join(experiment, states[-1]))):
            continue
        newest = states[-1]
        staged = _staged_copy(name, newest, _whole_pickle)
        if not staged:
            raise SearchError(f"{experiment}: Tune's searcher state {newest} was cut short (its driver was killed "
                              "while writing it) and no whole copy of it is left, so the search cannot go on; the "
                              "trials it ran are in hpsearch_trials.jsonl. Start it again under a new name "
                              "(`--set name=...`)")
        _replace(experiment, newest, Path(staged).read_bytes())
        done.append(f"put back Tune's searcher state {newest}, cut short by the kill, from its staging copy {staged}")
    return "; ".join(done) or None


def reconcile_searcher(experiment: str) -> str | None:
    """Make Tune's searcher state agree with the trials of the snapshot Tune restores. Returns what
    was done, or None when they agree.

    Tune writes its snapshot and the searcher's files one after the other and copies them beside
    the trials without waiting for the copy before (nor atomically), so a hard kill can leave
    them from different moments; a repair above can also go back to an older snapshot. Restored as
    they are, the searcher counts trials the snapshot does not have: its ConcurrencyLimiter keeps
    their slots taken forever (with all of them taken, the resumed search waits forever), and
    Optuna keeps them running. Here, after the snapshot:
    - the limiter's live trials are the snapshot's unfinished ones (those a resume runs on);
    - the generator has created as many trials as the snapshot has (so a trial lost with the
      driver is replaced, as the record expects, and none is added beyond ``num_samples``);
    - Optuna is told the trials the snapshot says ended (with their last result) and, as failed,
      those it lost; a trial Optuna never saw is run all the same (HonestOptunaSearch skips it).
    """
    snapshots = list_files(experiment, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX)
    generators = list_files(experiment, GENERATOR_PREFIX, GENERATOR_SUFFIX)
    if not snapshots or not generators:
        return None
    import ray.cloudpickle as cloudpickle

    trials = _snapshot_trials(read_file(join(experiment, snapshots[-1])))
    unfinished = {tid for tid, (status, _) in trials.items() if status in UNFINISHED}
    generator = cloudpickle.loads(read_file(join(experiment, generators[-1])))
    limiter = generator.get("name:ConcurrencyLimiter")
    done = []
    if generator.get("counter") != len(trials):
        done.append(f"trials created {generator.get('counter')} → {len(trials)}, as in the snapshot")
        generator["counter"] = len(trials)
    live = set(limiter.get("live_trials", ())) if limiter is not None else unfinished
    if limiter is not None and not limiter.get("batch") and live != unfinished:
        if live - unfinished:
            done.append(f"freed the slots of {len(live - unfinished)} trial(s) the snapshot does not run on")
        if unfinished - live:
            done.append(f"took slots for {len(unfinished - live)} trial(s) it runs on")
        limiter["live_trials"], limiter["num_unfinished_live_trials"] = set(unfinished), len(unfinished)
    if done:
        _replace(experiment, generators[-1], cloudpickle.dumps(generator))
    searchers = list_files(experiment, SEARCHER_PREFIX, SEARCHER_SUFFIX)
    if searchers:
        told = _tell_optuna_what_ended(experiment, searchers[-1], trials)
        if told:
            done.append(f"{told} ended trial(s) told to Optuna")
    if not done:
        return None
    return (f"made Tune's searcher state agree with its snapshot {snapshots[-1]} (a kill left them from different "
            f"moments): {'; '.join(done)}")


def _snapshot_trials(raw: bytes) -> dict[str, tuple[str, dict[str, Any]]]:
    """trial id → (Tune's status, its last result) of every trial in an experiment snapshot."""
    trials = {}
    for trial_json, metadata_json in json.loads(raw)["trial_data"]:
        state, metadata = json.loads(trial_json), json.loads(metadata_json)
        trials[state["trial_id"]] = (state["status"], metadata.get("last_result") or {})
    return trials


def _tell_optuna_what_ended(experiment: str, filename: str, trials: dict[str, tuple[str, dict[str, Any]]]) -> int:
    """Tell the study in Tune's OptunaSearch state how the trials it still has running ended, as
    the snapshot says (lost: failed). Returns how many were told."""
    import pickle

    from ray.tune.utils import flatten_dict

    from hpsearch.tune.searcher import HonestOptunaSearch

    state = pickle.loads(read_file(join(experiment, filename)))
    if not isinstance(state, dict) or "_ot_trials" not in state:
        return 0  # not Optuna's: left as it is
    search = HonestOptunaSearch.__new__(HonestOptunaSearch)
    search.__dict__.update(state)
    told = 0
    for tid in [t for t in search._ot_trials if t not in search._completed_trials]:
        status, last = trials.get(tid, ("LOST", {}))
        if status in UNFINISHED:
            continue
        search.on_trial_complete(tid, result=flatten_dict(last) if status == "TERMINATED" else None,
                                 error=status != "TERMINATED")
        told += 1
    if told:
        _replace(experiment, filename, pickle.dumps(search.__dict__))
    return told


def _staged_copy(name: str, filename: str, whole: Any) -> str | None:
    """A whole copy of one of Tune's driver files in a (killed) driver's staging folder, if any."""
    for staged in sorted(glob.glob(os.path.join(_ray_temp_dir(), "session_*", "artifacts", "*", name,
                                                "driver_artifacts", filename))):
        if whole(Path(staged).read_bytes()):
            return staged
    return None


def _whole_pickle(data: bytes) -> bool:
    import pickle

    try:
        pickle.loads(data)
    except Exception:
        return False
    return True


def _whole_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _ray_temp_dir() -> str:
    """Ray's temp folder, as Ray picks it (``ray._common.utils.get_default_ray_temp_dir``)."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(root, "ray")


def _replace(experiment: str, name: str, data: bytes) -> None:
    if is_uri(experiment):
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / name).write_bytes(data)
            Remote(experiment).upload(Path(folder) / name, name)
        return
    tmp = Path(experiment) / f".{name}.part"
    tmp.write_bytes(data)
    os.replace(tmp, Path(experiment) / name)


def _delete(experiment: str, name: str) -> None:
    if is_uri(experiment):
        remote = Remote(experiment)
        remote.fs.delete_file(f"{remote.path}/{name}")
    else:
        (Path(experiment) / name).unlink()

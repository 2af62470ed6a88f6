"""Faults injected at random moments (seeded, so a failure can be replayed), the way Ray's own
release tests kill nodes: trial worker processes killed mid-search, and the driver killed
several times in a row with a resume after each. Nothing may be lost, nothing may run twice.

Only processes the test started are killed: the `hpsearch` command runs in a session of its own,
and the workers killed are found among its descendants. ``HPSEARCH_CHAOS_SEED`` replays a run;
``benchmarks/chaos.py`` runs these as a longer soak.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from support import small_job, write_job

SEED = int(os.environ.get("HPSEARCH_CHAOS_SEED", "0"))


def _events(out: Path) -> list[dict]:
    log = out / "hpsearch_trials.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip().endswith("}")]


def _hpsearch(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hpsearch.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def trial_workers(driver: int) -> list[int]:
    """The worker processes of the command's trials (Tune's function trainables: ImplicitFunc
    actors). The test kills the one whose trial has just reported an epoch: a running trial.
    (Ray Tune 2.60 retries a trial whose worker dies while it runs, not one whose worker dies while
    the trial is still being started on it: that one fails; the README says so.)"""
    return [pid for pid in descendants(driver) if command_line(pid).startswith("ray::ImplicitFunc")]


def _job(tmp_path: Path, *, num_samples: int, epochs: int, max_failures: int = 0) -> Path:
    job = small_job(tmp_path, search={"num_samples": num_samples, "max_concurrent_trials": 2,
                                      "max_failures": max_failures, "final": {"seeds": 0},
                                      "scheduler": {"name": "fifo"}})
    job["space"] = {"learning_rate": {"type": "float", "low": 0.005, "high": 0.05, "log": True},
                    "num_hidden_layers": 1, "neurons_per_layer": 32, "epochs": epochs, "batch_size": 8}
    return write_job(tmp_path / "job.yaml", job)


def _check_the_record(tmp_path: Path, out: Path, *, num_samples: int, epochs: int) -> list[dict]:
    """Every trial once, every epoch once, in Parquet, MLflow and the Optuna study."""
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    ids = sorted(t["trial_id"] for t in trials)
    assert len(trials) == num_samples and len(set(ids)) == num_samples
    assert all(t["status"] == "completed" and t["epochs_run"] == epochs for t in trials), trials
    seen: dict[str, list[int]] = {}
    for e in pq.read_table(out / "epochs.parquet").to_pylist():
        seen.setdefault(e["trial_id"], []).append(e["epoch"])
    assert {tid: sorted(v) for tid, v in seen.items()} == {tid: list(range(1, epochs + 1)) for tid in ids}

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["hpsearch.trial_id"] for r in children) == ids  # one visible run per trial
    assert {r.info.status for r in children} == {"FINISHED"} and len(runs) == num_samples + 1

    import optuna

    from hpsearch.record.study import storage

    study = optuna.load_study(study_name="t", storage=storage(out / "optuna.journal"))
    assert sorted(t.user_attrs["hpsearch_trial_id"] for t in study.trials) == ids
    return trials


@pytest.mark.slow
def test_trial_workers_killed_at_random_moments_lose_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    num_samples, epochs = 5, 12
    path = _job(tmp_path, num_samples=num_samples, epochs=epochs, max_failures=10)
    out = tmp_path / "runs" / "t"
    proc = _hpsearch("run", str(path), cwd=tmp_path)
    kills = 0
    try:
        deadline = time.time() + 300
        while kills < 4 and proc.poll() is None and time.time() < deadline:
            # A random moment while trials run: after a random number of epochs more, the worker
            # of the trial that has just reported one (and has more to go), among the command's.
            target = len([e for e in _events(out) if e["event"] == "result"]) + rng.randint(2, 8)
            while len(results := [e for e in _events(out) if e["event"] == "result"]) < target and proc.poll() is None:
                time.sleep(0.02)
            running = results[-1] if results and results[-1]["epoch"] < epochs - 1 else None
            if running and running.get("worker_pid") in trial_workers(proc.pid):
                os.kill(running["worker_pid"], signal.SIGKILL)
                kills += 1
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert kills >= 3, f"only {kills} workers killed (seed {SEED})"

    _check_the_record(tmp_path, out, num_samples=num_samples, epochs=epochs)
    events = _events(out)
    retries = [i for i, e in enumerate(events) if e["event"] == "retry"]
    # A kill can land on a worker between two trials (reused actors), which fails no trial.
    assert len(retries) >= 2, f"seed {SEED}: {kills} kills, {len(retries)} retries"
    for i in retries:  # each trial went on from its checkpoint, not from its first epoch
        tid = events[i]["trial_id"]
        done_before = [e["epoch"] for e in events[:i] if e["event"] == "result" and e["trial_id"] == tid]
        next_epoch = next((e["epoch"] for e in events[i:] if e["event"] == "result" and e["trial_id"] == tid), None)
        if next_epoch is None:  # killed after its last epoch, before it ended: nothing left to train
            assert max(done_before) == epochs, f"trial {tid} ended short (seed {SEED})"
        else:
            # From its newest checkpoint: the next epoch, or the one it had just reported when its
            # worker died (Tune may restore the checkpoint before it); never from the start.
            done = max(done_before, default=0)
            assert next_epoch in (done, done + 1) and (next_epoch > 1 or done == 0), \
                f"trial {tid}: {done} epochs done, went on at epoch {next_epoch} (seed {SEED})"


@pytest.mark.slow
def test_a_driver_killed_three_times_in_a_row_then_resumed_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    num_samples, epochs = 5, 8
    path = _job(tmp_path, num_samples=num_samples, epochs=epochs)
    out = tmp_path / "runs" / "t"
    total = num_samples * epochs
    # K = 3 moments, as numbers of epochs reported, each after the one before: the first before any
    # trial ended, the last near the end.
    moments = sorted(rng.sample(range(2, total - 2), 3))
    command = ["run", str(path)]
    for moment in moments:
        proc = _hpsearch(*command, cwd=tmp_path)
        try:
            deadline = time.time() + 240
            while len({(e["trial_id"], e["epoch"]) for e in _events(out) if e["event"] == "result"}) < moment:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, f"seed {SEED}: timed out waiting for epoch {moment}"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray: a power cut
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        command = ["resume", str(out)]
    final = subprocess.Popen([sys.executable, "-m", "hpsearch.cli", "resume", str(out)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = final.communicate(timeout=150)
    finally:
        if final.poll() is None:
            os.killpg(final.pid, signal.SIGKILL)  # the hung resume and its Ray, nothing else
    assert final.returncode == 0, f"seed {SEED}, moments {moments}:\n{output}"

    trials = _check_the_record(tmp_path, out, num_samples=num_samples, epochs=epochs)
    started = {e["trial_id"] for e in _events(out) if e["event"] == "start"}
    assert {t["trial_id"] for t in trials} <= started


def _whole_state(out: Path) -> dict[str, bytes] | None:
    """Tune's snapshot and searcher files, as bytes, when all three are whole (read while Tune
    writes them: None when one is cut, or not there yet)."""
    import pickle

    from ray import cloudpickle

    files = {}
    for pattern, load in (("experiment_state-*.json", json.loads), ("search_gen_state-*.json", cloudpickle.loads),
                          ("searcher-state-*.pkl", pickle.loads)):
        found = sorted(out.glob(pattern))
        if not found:
            return None
        try:
            data = found[-1].read_bytes()
            load(data)
        except Exception:
            return None
        files[found[-1].name] = data
    return files


def _snapshot_statuses(files: dict[str, bytes]) -> list[str]:
    raw = next(data for name, data in files.items() if name.startswith("experiment_state-"))
    return [json.loads(trial)["status"] for trial, _ in json.loads(raw)["trial_data"]]


@pytest.mark.slow
@pytest.mark.parametrize("older", ["searcher", "snapshot"])
def test_a_resume_after_a_kill_left_the_snapshot_and_the_searcher_from_different_moments(tmp_path: Path,
                                                                                          older: str) -> None:
    # Tune copies its snapshot and its searcher's files beside the trials one after the other, not
    # atomically and without waiting for the copy before: a hard kill can leave them from different
    # moments (the searcher counting trials the snapshot does not have). Seen in the three-kill test
    # above, 1 run in 5: the resume finished the running trials and then waited forever. Made here
    # on purpose: after the kill, one of them is put back as it was early in the search.
    num_samples, epochs = 4, 12
    path = _job(tmp_path, num_samples=num_samples, epochs=epochs)
    out = tmp_path / "runs" / "t"
    proc = _hpsearch("run", str(path), cwd=tmp_path)
    try:
        deadline, early = time.time() + 240, None
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "timed out waiting for Tune's snapshots"
            files = _whole_state(out)
            statuses = _snapshot_statuses(files) if files else []
            if early is None and statuses == ["RUNNING", "RUNNING"]:
                early = files  # two trials running, none ended
            if early is not None and len(statuses) >= 3 and "TERMINATED" in statuses:
                break  # a trial has ended, and a third runs in its slot
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for name, data in early.items():
        if name.startswith("experiment_state-") == (older == "snapshot"):
            for stale in out.glob(name.split("-", 1)[0] + "-*"):
                stale.unlink()
            (out / name).write_bytes(data)
    resumed = _hpsearch("resume", str(out), cwd=tmp_path)
    try:
        output, _ = resumed.communicate(timeout=150)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)  # a hung resume and its Ray, nothing else
    assert resumed.returncode == 0, output
    assert "made Tune's searcher state agree with its snapshot" in output, output
    _check_the_record(tmp_path, out, num_samples=num_samples, epochs=epochs)

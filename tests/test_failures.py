"""Failures: crashed, failing and diverging trials, the failure limit, and stop/kill + resume.

Real Ray on 2 CPUs throughout. Faults are injected through ``run_search(trial_fn=...)``: a
function with run_trial's arguments that crashes where a test wants it to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import small_job, snapshot_trials, write_job
from mlflow.tracking import MlflowClient
from ray import cloudpickle

from hpsearch.record.trial_log import read_events
from hpsearch.search import run_search
from hpsearch.spec import load_job, validate
from hpsearch.tune.searcher import HonestOptunaSearch
from hpsearch.tune.trial import run_trial

pytestmark = pytest.mark.slow

# Ray ships these test functions to its workers by value (the tests folder is not importable there).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _events(out: Path) -> list[dict]:
    return read_events(out / "hpsearch_trials.jsonl")


def crash_once_after_two_epochs(marker_dir: str):
    def trial(config, **kw):
        from ray import tune

        if tune.get_checkpoint() is None:
            try:  # exactly one trial of the search crashes, once
                os.close(os.open(os.path.join(marker_dir, "crashed"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                run_trial({**config, "epochs": 2}, **kw)
                raise RuntimeError("injected crash after epoch 2")
        run_trial(config, **kw)

    return trial


def fail_when_lr_is_bad(config, **kw):
    if config["learning_rate"] == 0.123:
        raise ValueError("injected failure for learning_rate 0.123")
    run_trial(config, **kw)


def always_fail(config, **kw):
    raise ValueError("injected failure")


def test_a_trial_that_crashes_once_resumes_from_its_checkpoint(ray_runtime, tmp_path: Path) -> None:
    job = validate(small_job(tmp_path, search={"num_samples": 2, "max_failures": 1}))
    job_epochs = 5
    job = validate({**job.to_dict(), "space": {**job.to_dict()["space"], "epochs": job_epochs}})
    summary = run_search(job, trial_fn=crash_once_after_two_epochs(str(tmp_path)))
    assert summary.counts == {"completed": 2} and summary.stopped is None

    events = _events(summary.search_dir)
    retried = [e["trial_id"] for e in events if e["event"] == "retry"]
    assert len(retried) == 1 and "injected crash" in (next(e for e in events if e["event"] == "retry")["error"])
    reported = [e["epoch"] for e in events if e["event"] == "result" and e["trial_id"] == retried[0]]
    assert reported == [1, 2, 3, 4, 5]  # epochs 3.. continue from the epoch-2 checkpoint, none repeated

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = client.search_runs([client.get_experiment_by_name("t").experiment_id],
                                  filter_string="tags.`hpsearch.trial_id` != ''")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)


def test_a_trial_that_always_fails_is_failed_and_the_rest_complete(ray_runtime, tmp_path: Path) -> None:
    job = small_job(tmp_path, search={"num_samples": 3, "max_failures": 1, "searcher": {"sampler": "grid"}})
    job["space"] = {"learning_rate": {"type": "categorical", "choices": [0.01, 0.123, 0.02]}, "epochs": 2}
    summary = run_search(validate(job), trial_fn=fail_when_lr_is_bad)
    assert summary.counts == {"completed": 2, "failed": 1}
    rows = {r["learning_rate"]: r for r in pq.read_table(summary.search_dir / "trials.parquet").to_pylist()}
    assert rows[0.123]["status"] == "failed" and "injected failure for learning_rate 0.123" in rows[0.123]["error"]
    assert rows[0.01]["status"] == rows[0.02]["status"] == "completed"
    assert summary.best["hyperparameters"]["learning_rate"] != 0.123
    # retried once (max_failures: 1) before it was given up
    assert sum(e["event"] == "retry" for e in _events(summary.search_dir)) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    statuses = sorted(r.info.status for r in client.search_runs(
        [client.get_experiment_by_name("t").experiment_id], filter_string="tags.`hpsearch.trial_id` != ''"))
    assert statuses == ["FAILED", "FINISHED", "FINISHED"]


def test_max_failed_trials_stops_the_search(ray_runtime, tmp_path: Path) -> None:
    job = small_job(tmp_path, search={"num_samples": 8, "max_failures": 0, "max_failed_trials": 2,
                                      "max_concurrent_trials": 1}, tracking={"enabled": False})
    summary = run_search(validate(job), trial_fn=always_fail)
    assert summary.counts.get("failed") == 2 and sum(summary.counts.values()) < 8
    assert "max_failed_trials: 2" in summary.stopped
    assert len(pq.read_table(summary.search_dir / "trials.parquet")) == sum(summary.counts.values())


def test_honest_optuna_search_tells_optuna_what_happened(tmp_path: Path) -> None:
    import optuna

    from hpsearch.space import define_by_run, make_sampler

    job = validate(small_job(tmp_path))
    searcher = HonestOptunaSearch(space=define_by_run(job), metric="val_accuracy", mode="max",
                                          sampler=make_sampler(job))
    outcomes = {"a": {"epoch": 3, "val_accuracy": 0.9, "diverged": False, "config/epochs": 3},
                "b": {"epoch": 1, "val_accuracy": 0.5, "diverged": False, "config/epochs": 3},
                "c": {"epoch": 1, "val_accuracy": float("nan"), "diverged": True, "config/epochs": 3}}
    for trial_id, result in outcomes.items():
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, result=result)
    states = [t.state for t in searcher._ot_study.trials]
    S = optuna.trial.TrialState
    assert states == [S.COMPLETE, S.PRUNED, S.FAIL]  # none left RUNNING


# --------------------------------------------------------------------------------------------
# Stop and resume, through the real command in a subprocess.
# --------------------------------------------------------------------------------------------


def _resume_job(tmp_path: Path) -> Path:
    job = small_job(tmp_path, search={"num_samples": 5, "max_concurrent_trials": 2})
    job["space"] = {"learning_rate": {"type": "float", "low": 0.005, "high": 0.05, "log": True},
                    "epochs": 12, "batch_size": 8}
    return write_job(tmp_path / "job.yaml", job)


def _hpsearch(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hpsearch.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"hpsearch exited early:\n{proc.stdout.read()}"
        assert time.time() < deadline, "timed out waiting for trials"
        time.sleep(0.2)


def _stop_and_resume(tmp_path: Path, sig: signal.Signals) -> None:
    path = _resume_job(tmp_path)
    out = tmp_path / "runs" / "t"
    proc = _hpsearch("run", str(path), cwd=tmp_path)

    def ready() -> bool:
        events = _events(out)
        ended = {e["trial_id"] for e in events if e["event"] == "end"}
        running = {e["trial_id"] for e in events if e["event"] == "result" and e["epoch"] >= 2} - ended
        return len(ended) >= 2 and bool(running & snapshot_trials(out))  # one Tune will know on resume

    try:
        _wait_for(ready, proc)
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray: a power cut
        else:
            os.kill(proc.pid, sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if sig != signal.SIGKILL:
        assert proc.returncode == 130, output
        assert f"hpsearch resume {out}" in output
    before = _events(out)
    n_before = len(before)
    ended_before = {e["trial_id"] for e in before if e["event"] == "end"}

    resumed = subprocess.run([sys.executable, "-m", "hpsearch.cli", "resume", str(out)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 5 and {r["status"] for r in rows} == {"completed"}
    after = _events(out)[n_before:]
    restarted = {e["trial_id"] for e in after if e["event"] == "start"}
    assert not (restarted & ended_before), "finished trials were run again"
    continued = [tid for tid in restarted
                 if any(e["event"] == "result" and e["trial_id"] == tid for e in _events(out)[:n_before])]
    assert continued, "no interrupted trial continued"
    for tid in continued:
        first = next(e["epoch"] for e in after if e["event"] == "result" and e["trial_id"] == tid)
        assert first > 1, f"trial {tid} started over instead of resuming from its checkpoint"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # all of them: duplicates are deleted
    assert len(children) == 5
    assert sorted(r.data.tags["hpsearch.trial_id"] for r in children) == sorted(r["trial_id"] for r in rows)
    assert all(r.info.status == "FINISHED" for r in children)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert load_job(out / "job.yaml").search.num_samples == 5
    assert json.loads((out / "hpsearch_state.json").read_text())["parent_run_id"]

    # The Optuna study in the search folder: the search's trials exactly, as hpsearch recorded them.
    import optuna

    from hpsearch.record.study import storage

    study = optuna.load_study(study_name="t", storage=storage(out / "optuna.journal"))
    assert sorted(t.user_attrs["hpsearch_trial_id"] for t in study.trials) == sorted(r["trial_id"] for r in rows)
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    # Every epoch the record has, across the stop (a hard kill can lose the epoch being logged then).
    recorded: dict[str, set] = {}
    for e in pq.read_table(out / "epochs.parquet").to_pylist():
        recorded.setdefault(e["trial_id"], set()).add(e["epoch"])
    assert {t.user_attrs["hpsearch_trial_id"]: set(t.intermediate_values) for t in study.trials} == recorded
    assert all(len(epochs) >= 10 for epochs in recorded.values())


def test_sigkill_then_resume_completes_the_search(tmp_path: Path) -> None:
    _stop_and_resume(tmp_path, signal.SIGKILL)


def test_sigint_stops_gracefully_and_resume_completes(tmp_path: Path) -> None:
    _stop_and_resume(tmp_path, signal.SIGINT)


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    path = _resume_job(tmp_path)
    out = tmp_path / "runs" / "t"
    proc = _hpsearch("run", str(path), cwd=tmp_path)
    try:
        _wait_for(lambda: any(e["event"] == "result" for e in _events(out)), proc)
        os.kill(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "hpsearch resume" in output, output
    assert (out / "trials.parquet").exists()


def test_checkpoints_named_by_a_stale_snapshot_are_put_back(ray_runtime, tmp_path: Path) -> None:
    # After a hard kill, Tune restores each trial from its last experiment snapshot (every ~10 s);
    # a checkpoint it names may have been deleted since (a trial keeps its best two and its latest),
    # and Tune then fails that trial on resume (seen in CI). Such checkpoints are put back from the
    # trial's newest whole one. Checked here on a real Tune experiment folder.
    import re
    import shutil

    from hpsearch.tune import snapshot

    job = small_job(tmp_path, search={"num_samples": 1, "scheduler": {"name": "fifo"}}, tracking={"enabled": False})
    job["space"]["epochs"] = 6
    run_search(validate(job))
    out = tmp_path / "runs" / "t"
    trial_dir = next(out.glob("trial_*"))
    kept = sorted(p.name for p in trial_dir.glob("checkpoint_*"))
    assert len(kept) >= 2
    state = sorted(out.glob("experiment_state-*.json"))[-1].read_text()
    assert "checkpoint_" in state or re.search(r"[0-9a-f]{64,}", state)  # Tune's format: paths or pickles
    assert snapshot.restore_missing_checkpoints(str(out)) == []  # nothing missing, nothing done

    # The snapshot names the kept checkpoints; remove the oldest. A newer copy cut short by the kill
    # (no metrics.json, which a trial writes last) must not be the one copied back.
    victim, newest = trial_dir / kept[0], trial_dir / kept[-1]
    shutil.rmtree(victim)
    (trial_dir / "checkpoint_000099").mkdir()
    (trial_dir / "checkpoint_000099" / "state.pt").write_bytes(b"cut short")
    assert snapshot.restore_missing_checkpoints(str(out)) == [str(victim)]
    assert (victim / "state.pt").read_bytes() == (newest / "state.pt").read_bytes()
    assert snapshot.restore_missing_checkpoints(f"file://{out}") == []  # through a URI too; done once


def test_the_failure_limit_ends_the_command_with_exit_code_1(ray_runtime, tmp_path: Path) -> None:
    # Trials that fail for real, in the user's own code: any width but the default one raises.
    from support import cli_run, user_job, write_user_code

    write_user_code(tmp_path, "ep_limit", "_build = build\n"
                    "def build(hp, input_shape, num_classes):\n"
                    "    if hp['width'] != 32:\n        raise RuntimeError(f\"width {hp['width']} is not supported\")\n"
                    "    return _build(hp, input_shape, num_classes)\n")
    job = user_job(tmp_path, "ep_limit", search={"num_samples": 8, "max_failures": 0, "max_failed_trials": 2,
                                                 "max_concurrent_trials": 1})
    result = cli_run("run", write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 1, result.output
    assert "2 trials failed (search.max_failed_trials: 2); their errors are in trials.parquet" in result.output
    rows = pq.read_table(tmp_path / "runs" / "t" / "trials.parquet").to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all("is not supported" in r["error"] for r in failed)
    assert len(rows) < 8

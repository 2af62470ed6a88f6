"""MLflow tracking on its own, against a real SQLite store: the parent run, one child per trial,
statuses, a resume's runs adopted, a killed driver's duplicates closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from hpsearch.errors import StorageError
from hpsearch.record.trial_log import TrialStatus
from hpsearch.tracking import STATUS_TAG, TRIAL_ID_TAG, Tracker, resolve_uri


def _tracker(tmp_path: Path, **kw) -> Tracker:
    return Tracker(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="exp", **kw)


def _children(client: MlflowClient, parent: str) -> list:
    exp = client.get_experiment_by_name("exp")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def _start(tmp_path: Path) -> Tracker:
    job_file = tmp_path / "job.yaml"
    job_file.write_text("name: exp\n")
    tracker = _tracker(tmp_path)
    tracker.start(job={"name": "exp", "search": {"num_samples": 2}}, run_name="exp", job_file=job_file)
    return tracker


def test_trials_become_child_runs_with_metrics_per_epoch(tmp_path: Path) -> None:
    tracker = _start(tmp_path)
    for trial_id, status in (("a", TrialStatus.COMPLETED), ("b", TrialStatus.FAILED)):
        tracker.trial_started(trial_id, {"learning_rate": 0.01})
        for epoch in (1, 2):
            tracker.trial_result(trial_id, {"epoch": epoch, "val_accuracy": 0.5 + epoch / 10, "train_loss": 1.0,
                                            "node_id": "not a metric"})
        tracker.trial_ended(trial_id, status, "ValueError: x" if status is TrialStatus.FAILED else None)
    tracker.flush()

    client = MlflowClient(tracker.uri)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.params["search.num_samples"] == "2" and parent.data.tags["hpsearch.kind"] == "search"
    runs = {r.data.tags[TRIAL_ID_TAG]: r for r in _children(client, tracker.parent_run_id)}
    assert set(runs) == {"a", "b"}
    assert runs["a"].info.status == "FINISHED" and runs["a"].data.tags[STATUS_TAG] == "completed"
    assert runs["b"].info.status == "FAILED" and runs["b"].data.tags["hpsearch.error"] == "ValueError: x"
    history = client.get_metric_history(runs["a"].info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 0.6), (2, 0.7)]
    assert "node_id" not in runs["a"].data.metrics and runs["a"].data.params["learning_rate"] == "0.01"


def test_a_restored_tracker_finds_the_runs_its_killed_driver_started(tmp_path: Path) -> None:
    """A search's own new parent run has no children, so its trials' runs are created without a
    lookup; the copy Tune restores on resume (from tuner.pkl, pickled when the search started)
    must look: the killed driver may have started runs after the copy was made."""
    import pickle

    first = _start(tmp_path)
    restored = pickle.loads(pickle.dumps(first))  # what tuner.pkl holds
    first.trial_started("a", {})  # the driver that is then killed
    first.flush()
    restored.trial_started("a", {})
    restored.trial_started("b", {})
    restored.flush()
    children = _children(MlflowClient(first.uri), first.parent_run_id)
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in children) == ["a", "b"]  # no second run of "a"


def test_a_resume_adopts_runs_and_reconcile_leaves_one_per_trial(tmp_path: Path) -> None:
    first = _start(tmp_path)
    first.trial_started("a", {})
    first.trial_started("b", {})
    first.flush()
    client = MlflowClient(first.uri)
    # A killed driver's duplicate of trial a, still RUNNING, and a run of a trial Tune replaced.
    exp_id = client.get_experiment_by_name("exp").experiment_id
    for trial_id in ("a", "orphan"):
        client.create_run(exp_id, tags={"mlflow.parentRunId": first.parent_run_id, TRIAL_ID_TAG: trial_id})

    resumed = _tracker(tmp_path, parent_run_id=first.parent_run_id)  # as a resume builds it
    resumed.adopt_existing_runs()
    resumed.trial_started("b", {})  # the same trial continuing: no new run
    resumed.trial_started("c", {})
    resumed.trial_ended("c", TrialStatus.STOPPED_EARLY)
    resumed.reconcile({"a": TrialStatus.COMPLETED, "b": TrialStatus.INTERRUPTED, "c": TrialStatus.STOPPED_EARLY})

    runs = _children(client, first.parent_run_id)  # every visible child run, no filter
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == ["a", "b", "c"]  # exactly one per trial
    assert {r.data.tags[TRIAL_ID_TAG]: r.info.status for r in runs} == {"a": "FINISHED", "b": "KILLED",
                                                                         "c": "FINISHED"}
    from mlflow.entities import ViewType

    deleted = client.search_runs([exp_id], run_view_type=ViewType.DELETED_ONLY)
    assert len(deleted) == 2 and all(r.info.status == "KILLED" and r.data.tags[STATUS_TAG] == "discarded"
                                     for r in deleted)  # closed, tagged, then deleted: none left RUNNING


def test_finish_logs_the_best_and_the_retraining(tmp_path: Path) -> None:
    tracker = _start(tmp_path)
    best = {"trial_id": "a", "hyperparameters": {"learning_rate": 0.01},
            "validation": {"val_accuracy": 0.9, "val_loss": 0.3, "train_loss": None}, "test_accuracy": 0.88,
            "retrained": {"epochs": 5, "seeds": [1000, 1001], "test_accuracy": [0.89, 0.91], "mean": 0.9,
                          "std": 0.014}}
    best_file = tmp_path / "best.yaml"
    best_file.write_text("trial_id: a\n")
    tracker.finish(best=best, files=[best_file, tmp_path / "missing.parquet"], model_file=None)
    client = MlflowClient(tracker.uri)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["hpsearch.best_trial"] == "a"
    assert parent.data.metrics["test_accuracy"] == 0.88 and parent.data.metrics["best_val_accuracy"] == 0.9
    assert "best_train_loss" not in parent.data.metrics  # None is no metric
    assert parent.data.metrics["retrained_test_accuracy_mean"] == 0.9
    seeds = client.get_metric_history(tracker.parent_run_id, "retrained_test_accuracy")
    assert sorted((m.step, m.value) for m in seeds) == [(0, 0.89), (1, 0.91)]
    assert parent.data.params["retrained.seeds"] == "1000,1001" and parent.data.params["best.learning_rate"] == "0.01"
    assert {a.path for a in client.list_artifacts(tracker.parent_run_id)} == {"job.yaml", "best.yaml"}


def test_abandon_removes_the_parent_run_of_a_search_that_never_ran(tmp_path: Path) -> None:
    tracker = _start(tmp_path)
    tracker.abandon()
    client = MlflowClient(tracker.uri)
    exp = client.get_experiment_by_name("exp")
    assert client.search_runs([exp.experiment_id]) == []


def test_an_unusable_store_is_refused_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tracker = Tracker(uri=f"sqlite:///{blocker}/sub/mlflow.db", experiment="exp")
    with pytest.raises(StorageError, match="tracking.uri: cannot use MLflow"):
        tracker.start(job={}, run_name="exp", job_file=blocker)


def test_uris_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    assert resolve_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_uri("mlruns") == str(tmp_path.resolve() / "mlruns")
    assert resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert resolve_uri(None) == "http://server:5000"


# --------------------------------------------------------------------------------------------
# An MLflow server that goes away mid-search.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_mlflow_server_lost_mid_search_is_caught_up_when_it_comes_back(tmp_path: Path,
                                                                         request: pytest.FixtureRequest) -> None:
    # The server is lost as a network is: a relay in front of it is cut mid-search (connections
    # dropped, then refused), then back on the same port once the search has said so, while the
    # trials go on; the end of the search catches MLflow up from the record.
    import json
    import os
    import subprocess
    import sys
    import threading
    import time

    import pyarrow.parquet as pq
    from support import Link, MlflowServer, small_job, write_job

    server = MlflowServer(tmp_path).start()
    request.addfinalizer(server.kill)  # however the test ends
    link = Link(server.port).start()
    job = small_job(tmp_path, tracking={"uri": link.uri},
                    search={"num_samples": 5, "max_concurrent_trials": 2, "final": {"seeds": 0}})
    job["space"].update(epochs=50, batch_size=8)  # trials that outlast the outage
    out = tmp_path / "runs" / "t"
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch.cli", "run", str(write_job(tmp_path / "job.yaml", job))],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def ended() -> int:
        log = out / "hpsearch_trials.jsonl"
        events = log.read_text().splitlines() if log.exists() else []
        return sum(1 for line in events if line.endswith("}") and json.loads(line)["event"] == "end")

    def wait_for(what: Any, name: str) -> None:
        deadline = time.time() + 240
        while not what():
            assert proc.poll() is None and time.time() < deadline, f"waiting for {name}:\n" + "".join(lines)
            time.sleep(0.1)

    try:
        wait_for(lambda: ended() >= 1, "a trial to end")
        link.cut()  # gone, mid-search
        wait_for(lambda: any("stopped answering" in line for line in lines), "the search to say so")
        link.restore()
        proc.wait(timeout=300)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    output = "".join(lines)
    try:
        assert proc.returncode == 0, output
        assert "MLflow: caught up with the" in output and "View run" not in output, output
        epochs: dict[str, list[int]] = {}
        for e in pq.read_table(out / "epochs.parquet").to_pylist():
            epochs.setdefault(e["trial_id"], []).append(e["epoch"])
        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert sorted(r.data.tags["hpsearch.trial_id"] for r in children) == sorted(epochs)
        assert {r.info.status for r in runs} == {"FINISHED"}
        for run in children:  # every epoch of every trial, once
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
            assert sorted(steps) == sorted(epochs[run.data.tags["hpsearch.trial_id"]])
    finally:
        link.cut()
        server.kill()


def test_a_server_gone_for_good_is_said_once_and_what_mlflow_misses_said_at_the_end(caplog) -> None:
    # A real MLflow client against a port where nothing listens (bound, never listening): the
    # first write says the server is gone, the rest are skipped (no minutes of retries each),
    # and catching up at the end says what MLflow misses. (The search around it: the test above.)
    import logging
    import socket
    import time

    from hpsearch.record.trial_log import TrialRecord

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        tracker = Tracker(uri=f"http://127.0.0.1:{held.getsockname()[1]}", experiment="t", parent_run_id="p")
        caplog.set_level(logging.INFO, logger="hpsearch")
        t0 = time.time()
        tracker.trial_started("a", {"learning_rate": 0.01})
        for epoch in (1, 2, 3):
            tracker.trial_result("a", {"epoch": epoch, "val_accuracy": 0.5})
        tracker.trial_ended("a", TrialStatus.COMPLETED)
        tracker.flush()
        assert time.time() - t0 < 60  # one call retried, the others skipped
        assert tracker.lost_since is not None and tracker.missed == 5
        said = [r.getMessage() for r in caplog.records if "stopped answering" in r.getMessage()]
        assert len(said) == 1 and "Connection refused" in said[0]
        record = TrialRecord(trial_id="a", config={"learning_rate": 0.01}, epochs=[{"epoch": 1, "val_accuracy": 0.5}])
        assert tracker.catch_up([record]) is False
    missing = [r.getMessage() for r in caplog.records if "still does not answer" in r.getMessage()]
    assert len(missing) == 1 and "5 trial write(s) since" in missing[0] and "trials.parquet" in missing[0]

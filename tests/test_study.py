"""The Optuna study a search keeps in its folder: loadable with optuna.load_study, served by
optuna-dashboard (started on 127.0.0.1 here, its API fetched)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from support import run_job, small_job

from hpsearch.record import trial_log
from hpsearch.record.study import STUDY_FILE, storage, write_study
from hpsearch.spec import validate

State = optuna.trial.TrialState


def test_the_study_holds_every_ended_trial_as_recorded(tmp_path: Path) -> None:
    log = tmp_path / trial_log.LOG_FILE
    config = {"learning_rate": 0.01, "num_hidden_layers": 1, "epochs": 3}
    events = []
    for tid, values, status, error in (("a", [0.5, 0.7, 0.6], "completed", None), ("b", [0.4], "stopped early", None),
                                       ("c", [], "failed", "ValueError: x"), ("d", [0.3], None, None)):
        events.append({"event": "start", "trial_id": tid, "config": {**config, "learning_rate": 0.01 + len(events)}})
        events += [{"event": "result", "trial_id": tid, "epoch": i, "val_accuracy": v} for i, v in enumerate(values, 1)]
        if status:
            events.append({"event": "end", "trial_id": tid, "status": status, "error": error})
    for e in events:
        trial_log.append_event(log, e)
    job = validate(small_job(tmp_path, space={"learning_rate": {"type": "float", "low": 1e-3, "high": 100.0, "log": True},
                                             "num_hidden_layers": {"type": "int", "low": 1, "high": 2},
                                             "epochs": 3}))
    write_study(tmp_path, job, trial_log.fold(log, experiment=str(tmp_path)))
    study = optuna.load_study(study_name="t", storage=storage(tmp_path / STUDY_FILE))
    by_id = {t.user_attrs["hpsearch_trial_id"]: t for t in study.trials}
    assert set(by_id) == {"a", "b", "c"}  # d is still running: added when it ends
    assert (by_id["a"].state, by_id["a"].value) == (State.COMPLETE, 0.7)  # its best epoch's value
    assert by_id["a"].intermediate_values == {1: 0.5, 2: 0.7, 3: 0.6}
    assert by_id["b"].state == State.PRUNED and by_id["b"].user_attrs["hpsearch_status"] == "stopped early"
    assert by_id["c"].state == State.FAIL and by_id["c"].user_attrs["error"] == "ValueError: x"
    assert set(by_id["a"].params) == {"learning_rate", "num_hidden_layers"}  # searched ones only
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_a_search_keeps_its_study_and_optuna_dashboard_serves_it(ray_runtime, tmp_path: Path) -> None:
    job = small_job(tmp_path, search={"num_samples": 6, "scheduler": {"name": "asha", "grace_period": 1,
                                                                      "reduction_factor": 2}},
                    tracking={"enabled": False})
    job["space"]["epochs"] = 4
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="t", storage=storage(out / STUDY_FILE))
    rows = {r["trial_id"]: r for r in pq.read_table(out / "trials.parquet").to_pylist()}
    assert len(study.trials) == 6
    wanted = {"completed": State.COMPLETE, "stopped early": State.PRUNED}
    assert {t.user_attrs["hpsearch_trial_id"]: t.state for t in study.trials} == {
        tid: wanted[r["status"]] for tid, r in rows.items()}
    assert any(t.state == State.PRUNED for t in study.trials)  # ASHA stopped some: told as pruned

    dashboard = shutil.which("optuna-dashboard") or str(Path(sys.executable).parent / "optuna-dashboard")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([dashboard, str(out / STUDY_FILE), "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    try:
        deadline = time.time() + 60
        while True:
            try:
                studies = json.load(opener.open(f"http://127.0.0.1:{port}/api/studies", timeout=5))
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                assert time.time() < deadline, "optuna-dashboard did not start"
                time.sleep(0.3)
        summary = next(s for s in studies["study_summaries"] if s["study_name"] == "t")
        detail = json.load(opener.open(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10))
        assert len(detail["trials"]) == 6
    finally:
        server.terminate()
        server.wait(timeout=30)

"""``hpsearch status``: a search read from its files while it runs, after it was stopped, and done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import cli_run, run_job, small_job, write_job

from hpsearch.record import trial_log

pytestmark = pytest.mark.slow


def _status(out: Path | str) -> dict:
    result = cli_run("status", out, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_status_of_a_running_then_stopped_search(tmp_path: Path) -> None:
    job = small_job(tmp_path, search={"num_samples": 4, "max_concurrent_trials": 2, "time_budget_s": 600},
                    tracking={"enabled": False})
    job["space"].update(epochs=200, batch_size=8)  # long trials: the search is still running when asked
    path = write_job(tmp_path / "job.yaml", job)
    out = tmp_path / "runs" / "t"
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch.cli", "run", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not any(e["event"] == "result" and e["epoch"] >= 2 for e in trial_log.read_events(out / trial_log.LOG_FILE)):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no trial reported in time"
            time.sleep(0.3)
        running = _status(out)
        shown = cli_run("status", out).output
        os.kill(proc.pid, signal.SIGTERM)  # stops like Ctrl-C: resumable
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert running["state"] == "running" and running["name"] == "t" and running["num_samples"] == 4
    # A trial that has just started is running with no epoch yet (epoch 0, no value); the one we
    # waited for has reported two.
    assert any(r["epoch"] >= 2 and r["value"] > 0 for r in running["running"])
    assert all(r["epoch"] >= 0 for r in running["running"])
    assert running["best"]["value"] > 0 and running["elapsed_s"] > 0
    assert 0 < running["eta_s"] <= 600  # within the time budget's rest
    assert "t: running" in shown and "running " in shown and "best so far" in shown

    stopped = _status(out)
    assert proc.returncode == 130 and stopped["state"] == "interrupted" and stopped["running"] == []
    assert stopped["eta_s"] is None


def test_status_of_a_finished_search_and_of_no_search(ray_runtime, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    result, out = run_job(tmp_path, small_job(tmp_path, search={"num_samples": 2}, tracking={"enabled": False}))
    assert result.exit_code == 0, result.output
    done = _status(out)
    assert done["state"] == "finished" and done["trials"] == {"completed": 2} and done["eta_s"] is None
    monkeypatch.setenv("HPSEARCH_MIRROR", str(tmp_path / "mirror"))
    at_uri = _status(f"file://{out}")  # read through pyarrow's filesystems, as for s3:// or gs://
    assert (at_uri["state"], at_uri["trials"], at_uri["location"]) == ("finished", {"completed": 2}, f"file://{out}")
    assert set(done) == {"location", "name", "state", "num_samples", "metric", "trials", "running", "best",
                         "elapsed_s", "eta_s"}  # the documented schema
    missing = cli_run("status", tmp_path / "nothing")
    assert missing.exit_code == 2 and "not a search folder" in missing.output


def test_a_driver_on_another_machine_is_running_while_its_log_moves(tmp_path: Path) -> None:
    # A search whose driver runs elsewhere (a cluster's head, seen over NFS or a URI): its process
    # cannot be asked, so its log's last change says whether it still runs (within STALE_S).
    import yaml

    from hpsearch.spec import validate
    from hpsearch.status import STALE_S, read_status

    out = tmp_path / "runs" / "t"
    out.mkdir(parents=True)
    (out / "job.yaml").write_text(yaml.safe_dump(validate(small_job(tmp_path)).to_dict()))
    started = time.time() - 60
    trial_log.append_event(out / trial_log.LOG_FILE, {"event": "start", "trial_id": "a", "config": {"epochs": 3}})
    trial_log.update_state(out, driver={"pid": 1, "host": "head-node-elsewhere", "started": started})
    assert read_status(out).state == "running"
    stale = time.time() - STALE_S - 5
    os.utime(out / trial_log.LOG_FILE, (stale, stale))
    assert read_status(out).state == "interrupted"

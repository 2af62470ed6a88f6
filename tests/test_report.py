"""The HTML report: rendered from a search's own record, checked in a real headless Chromium.

The browser checks run benchmarks/report_screenshot.py (Selenium driving Debian's chromium and
chromium-driver; no browser download), which also writes the PNG a person can look at.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from support import REPO, cli_run, run_job, small_job, write_job

from hpsearch.record import trial_log
from hpsearch.report import Search, render

FASHION = Path("/usr/share/datasets/fashion-mnist")
no_chromium = pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                 reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


def _look(search_dir: Path, png: Path) -> dict:
    """What headless Chromium saw of the search's report (and its screenshot at ``png``)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report_screenshot.py"), str(search_dir),
                           str(png), "--json"], capture_output=True, text=True, timeout=180, check=False)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _folder(tmp_path: Path, events: list[dict], **job_keys) -> Path:
    """A search folder with a job and a hand-written trial log (no Ray: the report reads files)."""
    out = tmp_path / "runs" / "t"
    out.mkdir(parents=True)
    job = small_job(tmp_path, **job_keys)
    write_job(out / "job.yaml", job)
    for e in events:
        trial_log.append_event(out / trial_log.LOG_FILE, e)
    return out


def _trial(tid: str, lr: float, values: list[float], status: str | None = "completed", epochs: int = 3) -> list[dict]:
    events = [{"event": "start", "trial_id": tid, "config": {"learning_rate": lr, "num_hidden_layers": 1,
                                                              "neurons_per_layer": 32, "epochs": epochs}}]
    events += [{"event": "result", "trial_id": tid, "epoch": i, "val_accuracy": v, "epoch_time_s": 0.1}
               for i, v in enumerate(values, 1)]
    if status:
        events.append({"event": "end", "trial_id": tid, "status": status,
                       "error": "ValueError: x" if status == "failed" else None})
    return events


def test_a_report_from_a_hand_written_log_has_every_section(tmp_path: Path) -> None:
    out = _folder(tmp_path, _trial("a", 0.01, [0.5, 0.7, 0.8]) + _trial("b", 0.002, [0.4], "stopped early")
                  + _trial("c", 0.02, [0.6, 0.65, 0.66]))
    page = render(Search.read(out))
    for section in ("Optimization history", "Learning curves", "Hyperparameter importances", "Parallel coordinates",
                    "Slices", "Trials"):
        assert f"<h2>{section}</h2>" in page
    assert page.count("class=\"plotly-graph-div\"") == 6 and "not drawn" not in page
    assert page.count("<script type=\"text/javascript\">") == 1 and "<script src=" not in page  # offline
    assert "3 of 3: 2 completed, 1 stopped early" in page


@pytest.mark.parametrize(("events", "said"), [
    ([], "no trial has started yet"),
    (_trial("a", 0.01, [0.5, 0.7, 0.8]), "needs at least two scored trials"),  # one trial
    (_trial("a", 0.01, [], "failed") + _trial("b", 0.02, [], "failed"), "no epoch reported yet"),
    (_trial("a", 0.01, [0.5]) + _trial("b", 0.02, [0.6], status=None), "running"),  # still running
])
def test_a_report_of_little_says_so(tmp_path: Path, events: list, said: str) -> None:
    page = render(Search.read(_folder(tmp_path, events)))
    assert said in page or (said == "running" and "1 interrupted" in page)
    assert "<h2>Trials</h2>" in page


def test_report_command_writes_the_page_where_asked(tmp_path: Path) -> None:
    out = _folder(tmp_path, _trial("a", 0.01, [0.5, 0.7, 0.8]) + _trial("b", 0.002, [0.4, 0.5, 0.55]))
    result = cli_run("report", out, "-o", tmp_path / "page.html")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "page.html").stat().st_size > 1_000_000  # plotly.js inside
    missing = cli_run("report", tmp_path / "nothing")
    assert missing.exit_code == 2 and "not a search folder" in missing.output


@pytest.mark.slow
@no_chromium
def test_the_report_of_a_digits_search_in_a_browser(ray_runtime, tmp_path: Path) -> None:
    job = small_job(tmp_path, search={"num_samples": 6, "scheduler": {"name": "asha", "grace_period": 1,
                                                                      "reduction_factor": 2}})
    job["space"]["epochs"] = 4
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file()  # written at the end of every run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("t").experiment_id],
                                filter_string="tags.`hpsearch.kind` = 'search'")[0]
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    seen = _look(out, tmp_path / "report.png")
    assert seen["errors"] == []
    assert seen["plots"] == seen["plots_drawn"] == 6
    assert seen["rows"] == len(pq.read_table(out / "trials.parquet")) == 6
    assert (tmp_path / "report.png").stat().st_size > 50_000


@pytest.mark.slow
@no_chromium
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_the_report_of_a_ten_trial_fashion_mnist_search_in_a_browser(ray_runtime, tmp_path: Path) -> None:
    job = small_job(tmp_path, data={"dataset": "fashion_mnist", "root": str(FASHION), "download": False},
                    search={"num_samples": 10, "scheduler": {"name": "asha", "grace_period": 1,
                                                             "reduction_factor": 2}, "final": {"seeds": 0}},
                    tracking={"enabled": False})
    job["space"].update(epochs={"type": "int", "low": 1, "high": 2}, batch_size=256)
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output
    seen = _look(out, tmp_path / "report.png")
    assert seen["errors"] == [] and seen["plots"] == seen["plots_drawn"] == 6 and seen["rows"] == 10
    assert "fashion_mnist" in seen["text"] and yaml.safe_load((out / "best.yaml").read_text())["trial_id"] in seen["text"]


@no_chromium
def test_the_browser_check_sees_a_broken_page(tmp_path: Path) -> None:
    out = _folder(tmp_path, _trial("a", 0.01, [0.5, 0.7, 0.8]))
    (out / "report.html").write_text("<html><body><div class='plotly-graph-div'></div>"
                                     "<script>Plotly.newPlot('x', [])</script></body></html>")  # no plotly.js
    seen = _look(out, tmp_path / "broken.png")
    assert seen["plots"] == 1 and seen["plots_drawn"] == 0 and seen["rows"] == 0
    assert any("Plotly is not defined" in e for e in seen["errors"])

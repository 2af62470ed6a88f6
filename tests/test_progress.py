"""Live progress: a live area on a terminal (a pseudo-terminal here), the plain lines elsewhere."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from support import small_job, write_job

from hpsearch.progress import Progress
from hpsearch.record.trial_log import TrialStatus


def test_progress_counts_and_says_the_best_and_time_left() -> None:
    p = Progress(num_samples=3, metric="val_accuracy", mode="max", budget_s=600, stream=io.StringIO())
    assert not p.live  # no terminal: nothing drawn
    p.trial_started("a")
    p.trial_started("b")
    p.trial_result("a", 0.5)
    p.trial_result("b", float("nan"))
    p.trial_result("b", 0.7)
    p.trial_ended("a", TrialStatus.COMPLETED)
    p.trial_ended("b", TrialStatus.FAILED)
    line = p.line()
    assert (p.done, p.failed, p.running) == (2, 1, set())
    assert "0 running, 1 failed, best val_accuracy 0.7000" in line and "left of the time budget" in line


def test_a_live_area_is_drawn_on_a_terminal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # the terminal's width (a narrower one cuts the line short)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    p = Progress(num_samples=2, metric="val_loss", mode="min", stream=out)
    p.trial_started("a")
    p.trial_result("a", 0.3)
    p.trial_result("a", 0.2)
    p.trial_ended("a", TrialStatus.COMPLETED)
    p.close()
    text = out.getvalue()
    assert p.live and "\r" in text and "1/2 trials" in text and "best val_loss 0.2000" in text


def _job(tmp_path: Path) -> Path:
    job = small_job(tmp_path, search={"num_samples": 3}, tracking={"enabled": False})
    return write_job(tmp_path / "job.yaml", job)


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("COLUMNS", None)
    return env


@pytest.mark.slow
def test_run_on_a_pseudo_terminal_shows_the_live_area_then_the_summary(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows, 160 columns
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch.cli", "run", str(_job(tmp_path))], cwd=tmp_path,
                            stdin=slave, stdout=slave, stderr=slave, env=_env(), close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 300)
            assert ready, "no output for 300 s"
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        proc.wait(timeout=120)
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "search |" in text and "3/3 trials" in text and "0 failed" in text  # the live area, to its end
    assert text.rindex("trials,") < text.index("outputs:")  # ...and after it, the summary
    assert "[3/3] trial" in text  # the finished-trial lines print above it


@pytest.mark.slow
def test_run_with_stdout_redirected_prints_the_plain_lines(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hpsearch.cli", "run", str(_job(tmp_path))], cwd=tmp_path,
                          capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1/3] trial" in proc.stdout and "[3/3] trial" in proc.stdout and "outputs:" in proc.stdout
    assert "search |" not in proc.stdout + proc.stderr and "\r" not in proc.stdout + proc.stderr


def test_the_forecast_warns_once_when_a_search_would_take_weeks() -> None:
    from hpsearch.progress import Forecast

    weeks = Forecast(expected_epochs=1e7, slots=2, budget_s=None)
    said = [weeks.epoch(0.5) for _ in range(40)]
    assert [s for s in said if s] == [said[7]]  # after the first 8 epochs, once
    assert "about 29 days (10000000 epochs expected, about 0.5 s each, 2 at once)" in said[7]
    assert "search.time_budget_s" in said[7]
    days = Forecast(expected_epochs=1e5, slots=2, budget_s=None)
    assert not any(days.epoch(0.5) for _ in range(40))  # 7 hours: no warning
    budget = Forecast(expected_epochs=1e9, slots=1, budget_s=600)
    assert not any(budget.epoch(1.0) for _ in range(40))  # the budget ends it


def test_a_search_that_would_take_years_says_so_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from support import small_job, write_job

    job = small_job(tmp_path, search={"num_samples": 10_000_000, "scheduler": {"name": "fifo"}},
                    tracking={"enabled": False})
    job["space"] = {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2}, "epochs": 10_000, "batch_size": 64}
    path = write_job(tmp_path / "job.yaml", job)
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch.cli", "run", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        deadline = time.time() + 180
        for line in proc.stdout:
            lines.append(line)
            if "on course to take" in line or time.time() > deadline:
                break
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    warning = next((line for line in lines if "on course to take" in line), "")
    # 10^11 epochs: years, at any pace a laptop has
    assert "years" in warning and "100000000000 epochs expected" in warning, "".join(lines)[-3000:]
    assert proc.returncode == 130, rest[-2000:]

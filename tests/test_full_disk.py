"""A storage disk that fills up mid-search (a tmpfs in a private mount namespace, filled by
another "process"): the search stops cleanly, says why, keeps what it wrote readable, and
`hpsearch resume` finishes it once there is space again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import small_job, write_job

HPSEARCH = str(Path(sys.executable).parent / "hpsearch")


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    done = subprocess.run(["unshare", "--mount", "bash", "-c", "mount -t tmpfs -o size=1m none /mnt"],
                          capture_output=True)
    return done.returncode == 0


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _can_mount(), reason="needs unshare --mount (root)")]


@pytest.mark.parametrize("filled", ["nearly", "to the last byte"])
def test_a_disk_filled_mid_search_stops_it_cleanly_and_resume_finishes_it(tmp_path: Path, filled: str) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    job = small_job(tmp_path, search={"num_samples": 4, "max_concurrent_trials": 2, "final": {"seeds": 0},
                                      "scheduler": {"name": "fifo"}})
    job["space"].update(epochs=20, batch_size=8, neurons_per_layer=64)
    job["storage"] = str(runs)
    path = write_job(tmp_path / "job.yaml", job)
    log = runs / "t" / "hpsearch_trials.jsonl"
    # "nearly": 40 MB left, under the 64 MB a search keeps free; "to the last byte": none at all.
    fill = "dd if=/dev/zero of=$RUNS/filler bs=1M count=$(( $(df -m --output=avail $RUNS | tail -1) - 40 ))" \
        if filled == "nearly" else "dd if=/dev/zero of=$RUNS/filler bs=64k 2>/dev/null"
    script = f"""
RUNS={runs}
mount -t tmpfs -o size=150m none $RUNS || exit 3
{HPSEARCH} run {path} > {tmp_path}/run.out 2>&1 &
pid=$!
for i in $(seq 1 600); do grep -q '"event": "end"' {log} 2>/dev/null && break; sleep 0.2; done
{fill} 2>/dev/null
wait $pid; echo "run rc=$?"
ls $RUNS/t > {tmp_path}/files.txt
cp -r $RUNS/t {tmp_path}/at_stop 2>/dev/null
rm $RUNS/filler
{HPSEARCH} resume $RUNS/t > {tmp_path}/resume.out 2>&1; echo "resume rc=$?"
cp -r $RUNS/t {tmp_path}/after
"""
    done = subprocess.run(["unshare", "--mount", "bash", "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    run_out, resume_out = (tmp_path / "run.out").read_text(), (tmp_path / "resume.out").read_text()
    assert "run rc=1" in done.stdout, done.stdout + done.stderr + run_out[-4000:]
    assert "storage full" in run_out and f"then continue with: hpsearch resume {runs / 't'}" in run_out, run_out[-4000:]
    # The driver ends on its own terms (Ray logs the trials' failed checkpoint writes, with their tracebacks).
    assert "Aborted" not in run_out and "in run_search" not in run_out and "search stopped early: storage full" in run_out
    at_stop = tmp_path / "at_stop"
    if filled == "nearly":  # stopped while there was room: the outputs so far are written, and readable
        assert len(pq.read_table(at_stop / "trials.parquet")) >= 1
    assert (at_stop / "hpsearch_trials.jsonl").read_text().strip()
    assert "resume rc=0" in done.stdout, done.stdout + resume_out[-4000:]
    trials = pq.read_table(tmp_path / "after" / "trials.parquet").to_pylist()
    assert len(trials) == 4 and {t["status"] for t in trials} == {"completed"}, trials
    assert all(t["epochs_run"] == 20 for t in trials)

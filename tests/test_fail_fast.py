"""Bad input found before any trial runs: one clear message, exit 2, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import run_job, small_job, write_idx

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, job: dict) -> tuple[int, str]:
    result, _ = run_job(tmp_path, job)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "runs" / "t").exists()
    db = tmp_path / "mlflow.db"
    if db.exists():  # the store may exist; no run may be live in it
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name("t")
        assert exp is None or not client.search_runs([exp.experiment_id])


def test_missing_data_set(ray_runtime, tmp_path: Path) -> None:
    code, out = _run(tmp_path, small_job(tmp_path, data={"dataset": "mnist", "root": str(tmp_path / "none"),
                                                         "download": False}))
    assert code == 2 and "no mnist IDX files" in out and "train-images-idx3-ubyte.gz" in out
    _nothing_left(tmp_path)


def test_corrupt_data_file(ray_runtime, tmp_path: Path) -> None:
    write_idx(tmp_path / "idx")
    (tmp_path / "idx" / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    code, out = _run(tmp_path, small_job(tmp_path, data={"dataset": "mnist", "root": str(tmp_path / "idx"),
                                                         "download": False}))
    assert code == 2 and "train-labels-idx1-ubyte.gz" in out and "corrupt" in out
    _nothing_left(tmp_path)


def test_tracking_store_not_writable(ray_runtime, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, out = _run(tmp_path, small_job(tmp_path, tracking={"uri": f"sqlite:///{blocker}/sub/mlflow.db"}))
    assert code == 2 and "tracking.uri: cannot use MLflow" in out
    assert not (tmp_path / "runs" / "t").exists()


def test_storage_not_writable(ray_runtime, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, out = _run(tmp_path, small_job(tmp_path, storage=str(blocker / "runs")))
    assert code == 2 and "storage: cannot write to" in out
    _nothing_left(tmp_path)


def test_resume_of_a_folder_that_is_no_search(run_cli, tmp_path: Path) -> None:
    result = run_cli("resume", tmp_path)
    assert result.exit_code == 2 and "not a search folder" in result.output

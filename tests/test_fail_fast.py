"""Bad input found before any trial runs: one clear message, exit 2, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import assert_nothing_left, run_job, small_job, write_idx

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, job: dict) -> tuple[int, str]:
    result, _ = run_job(tmp_path, job)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _nothing_left(tmp_path: Path) -> None:
    assert_nothing_left(tmp_path)


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


# --------------------------------------------------------------------------------------------
# Image folders as people have them: broken files, stray files, thin classes, mixed modes.
# --------------------------------------------------------------------------------------------


def _image_job(tmp_path: Path, **data: object) -> dict:
    job = small_job(tmp_path, data={"dataset": "image_folder", "root": str(tmp_path / "pets"), "image_size": 8,
                                    **data}, search={"num_samples": 1, "final": {"seeds": 0}})
    job["space"] = {"epochs": 1, "batch_size": 8}
    return job


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_corrupt_image_is_named_before_any_trial(ray_runtime, tmp_path: Path, loader: str) -> None:
    from support import write_image_folder

    write_image_folder(tmp_path / "pets", per_class=4)
    (tmp_path / "pets" / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    code, out = _run(tmp_path, _image_job(tmp_path, loader=loader, num_workers=0))
    assert code == 2 and f"{tmp_path / 'pets' / 'dog' / '2.png'}: cannot be read as an image" in out, out
    _nothing_left(tmp_path)


def test_an_empty_class_folder_is_refused(ray_runtime, tmp_path: Path) -> None:
    from support import write_image_folder

    write_image_folder(tmp_path / "pets", per_class=4)
    (tmp_path / "pets" / "owl").mkdir()
    code, out = _run(tmp_path, _image_job(tmp_path))
    assert code == 2 and f"{tmp_path / 'pets' / 'owl'}: no images" in out and "needs at least one" in out
    _nothing_left(tmp_path)


def test_stray_files_thin_classes_and_mixed_image_modes_are_read_and_said(ray_runtime, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image
    from support import write_image_folder

    write_image_folder(tmp_path / "pets", per_class=6)
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "pets" / "cat" / ".DS_Store").write_bytes(b"\0")
    Image.fromarray(np.full((9, 7), 200, np.uint8), mode="L").save(tmp_path / "pets" / "dog" / "gray.png")
    Image.fromarray(np.full((5, 5, 4), 90, np.uint8), mode="RGBA").save(tmp_path / "pets" / "dog" / "alpha.png")
    (tmp_path / "pets" / "owl").mkdir()
    Image.fromarray(np.full((6, 6, 3), 30, np.uint8)).save(tmp_path / "pets" / "owl" / "only.jpg")
    result, out = run_job(tmp_path, _image_job(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'pets'}: ignored 1 file(s) that are not images (1 .txt)" in result.output
    assert f"{tmp_path / 'pets' / 'owl'}: one image only" in result.output
    import pyarrow.parquet as pq

    assert len(pq.read_table(out / "trials.parquet")) == 1

    from hpsearch.data import load
    from hpsearch.spec import DataSpec

    data = load(DataSpec(dataset="image_folder", root=str(tmp_path / "pets"), image_size=8), seed=0)
    assert data.num_classes == 4 and data.input_shape == (3, 8, 8)  # grayscale and RGBA as RGB
    assert len(data.train) + len(data.val) + len(data.test) == 3 * 6 + 2 + 1

"""Repairs of Tune's experiment snapshot before a resume, on hand-made experiment folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpsearch.errors import SearchError
from hpsearch.tune.snapshot import repair_cut_snapshot

NEWEST, OLDER = "experiment_state-2026-12-01_10-00-00.json", "experiment_state-2026-11-30_09-00-00.json"


@pytest.fixture
def experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))
    folder = tmp_path / "runs" / "search"
    folder.mkdir(parents=True)
    return folder


def _staging(tmp_path: Path, content: bytes) -> Path:
    folder = tmp_path / "ray-tmp" / "ray" / "session_2026-12-01_1" / "artifacts" / "2026-12-01_10-00-00" / "search" / \
        "driver_artifacts"
    folder.mkdir(parents=True)
    (folder / NEWEST).write_bytes(content)
    return folder / NEWEST


@pytest.mark.parametrize("as_uri", [False, True])
def test_a_cut_snapshot_is_put_back_from_the_staging_copy(experiment: Path, tmp_path: Path, as_uri: bool) -> None:
    (experiment / NEWEST).write_bytes(b"")  # killed while Tune copied it
    staged = _staging(tmp_path, json.dumps({"trial_data": []}).encode())
    done = repair_cut_snapshot(f"file://{experiment}" if as_uri else str(experiment), name="search")
    assert done and str(staged) in done
    assert json.loads((experiment / NEWEST).read_text()) == {"trial_data": []}
    assert repair_cut_snapshot(str(experiment), name="search") is None  # whole now: nothing to do


def test_without_a_staging_copy_the_snapshot_before_is_used(experiment: Path, tmp_path: Path) -> None:
    (experiment / OLDER).write_text("{}")
    (experiment / NEWEST).write_text('{"trial_da')
    _staging(tmp_path, b'{"trial_da')  # cut too: no use
    assert "set aside" in repair_cut_snapshot(str(experiment), name="search")
    assert sorted(p.name for p in experiment.iterdir()) == [OLDER, NEWEST + ".cut"]


def test_a_whole_snapshot_or_none_is_left_alone_and_an_unrepairable_one_refused(experiment: Path) -> None:
    assert repair_cut_snapshot(str(experiment), name="search") is None
    (experiment / NEWEST).write_text('{"trial_data": []}')
    assert repair_cut_snapshot(str(experiment), name="search") is None
    (experiment / NEWEST).write_text("")  # cut, and nothing to repair it from: said plainly
    with pytest.raises(SearchError, match="cut short .* no whole copy"):
        repair_cut_snapshot(str(experiment), name="search")
    assert (experiment / NEWEST).read_text() == ""  # left as it was

"""The search record on its own: folding a hand-written trial log, locations, checkpoints, outputs.

No Ray and no torch: the record is plain files, read here as ``hpsearch best`` and a resume read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from hpsearch.errors import SearchError
from hpsearch.record import checkpoints, outputs, trial_log
from hpsearch.record.location import SearchLocation
from hpsearch.record.trial_log import StopReason, TrialStatus


def _result(trial: str, epoch: int, acc: float, **extra) -> dict:
    return {"event": "result", "trial_id": trial, "epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.0 - acc,
            "val_accuracy": acc, "diverged": False, "epoch_time_s": 0.5, "time_total_s": 0.5 * epoch, **extra}


def _write_log(path: Path) -> None:
    events = [
        {"event": "start", "trial_id": "a", "config": {"epochs": 3, "learning_rate": 0.01}},
        _result("a", 1, 0.5), _result("a", 2, 0.7), _result("a", 3, 0.6),
        {"event": "end", "trial_id": "a", "status": "completed", "error": None},
        {"event": "start", "trial_id": "b", "config": {"epochs": 3}},
        _result("b", 1, 0.4),
        {"event": "end", "trial_id": "b", "status": "stopped early", "error": None},
        # c crashes after epoch 2, is retried from epoch 1's checkpoint and reports epoch 2 again
        {"event": "start", "trial_id": "c", "config": {"epochs": 2}},
        _result("c", 1, 0.3), _result("c", 2, 0.35),
        {"event": "retry", "trial_id": "c", "error": "RuntimeError: boom"},
        _result("c", 2, 0.8),
        {"event": "end", "trial_id": "c", "status": "completed", "error": None},
        # d diverged with the highest value: never the best
        {"event": "start", "trial_id": "d", "config": {"epochs": 3}},
        {**_result("d", 1, 0.95), "diverged": True},
        {"event": "end", "trial_id": "d", "status": "diverged", "error": None},
        {"event": "start", "trial_id": "e", "config": {"epochs": 3}},  # still running at the stop
        _result("e", 1, 0.2),
        {"event": "start", "trial_id": "orphan", "config": {}},  # started by a killed driver, replaced
        {"event": "trials", "ids": ["a", "b", "c", "d", "e"]},
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "result", "trial_id": "a", "ep')


def test_folding_a_hand_written_log(tmp_path: Path) -> None:
    log = tmp_path / trial_log.LOG_FILE
    _write_log(log)  # its last line cut short, as by a kill
    records = {r.trial_id: r for r in trial_log.fold(log, experiment=str(tmp_path), used="mlp")}
    assert set(records) == {"a", "b", "c", "d", "e"}  # the orphan is no trial of the search
    assert {tid: r.status for tid, r in records.items()} == {
        "a": TrialStatus.COMPLETED, "b": TrialStatus.STOPPED_EARLY, "c": TrialStatus.COMPLETED,
        "d": TrialStatus.DIVERGED, "e": TrialStatus.INTERRUPTED}
    assert [e["epoch"] for e in records["c"].epochs] == [1, 2]  # the retried epoch counted once...
    assert records["c"].epochs[-1]["val_accuracy"] == 0.8  # ...as it was reported last
    assert records["a"].best_epoch("val_accuracy", "max")["epoch"] == 2
    assert records["d"].best_epoch("val_accuracy", "max") is None
    record, epoch = trial_log.choose_best(records.values(), metric="val_accuracy", mode="max")
    assert (record.trial_id, epoch["epoch"]) == ("c", 2)
    assert trial_log.ended_trials(log) == {"a": TrialStatus.COMPLETED, "b": TrialStatus.STOPPED_EARLY,
                                           "c": TrialStatus.COMPLETED, "d": TrialStatus.DIVERGED}


def test_the_time_budget_ends_the_open_trials_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / trial_log.LOG_FILE
    _write_log(log)
    records = trial_log.fold(log, experiment=str(tmp_path))
    trial_log.end_cut_short(log, records, "time budget")
    again = {r.trial_id: r.status for r in trial_log.fold(log, experiment=str(tmp_path))}
    assert again["e"] is TrialStatus.STOPPED_EARLY  # over, not interrupted
    assert trial_log.read_events(log)[-1]["reason"] == "time budget"


def test_statuses_and_stop_reasons_are_one_vocabulary() -> None:
    assert trial_log.trial_status({"epochs": 3}, {"epoch": 3}, None) is TrialStatus.COMPLETED
    assert trial_log.trial_status({"epochs": 3}, {"epoch": 1}, None) is TrialStatus.STOPPED_EARLY
    assert trial_log.trial_status({}, {"epoch": 1, "diverged": True}, None) is TrialStatus.DIVERGED
    assert trial_log.trial_status({}, None, None) is TrialStatus.NOT_RUN
    assert trial_log.trial_status({}, {"epoch": 9}, "ValueError: x") is TrialStatus.FAILED
    assert json.dumps(TrialStatus.STOPPED_EARLY) == '"stopped early"' and f"{TrialStatus.FAILED}" == "failed"
    assert StopReason.INTERRUPTED.exit_code == StopReason.INTERRUPTED_IN_FINAL.exit_code == 130
    assert StopReason.FAILURE_LIMIT.exit_code == 1


def test_state_file_round_trips(tmp_path: Path) -> None:
    assert trial_log.read_state(tmp_path) == {}
    trial_log.write_state(tmp_path, {"parent_run_id": "abc"})
    assert trial_log.read_state(tmp_path) == {"parent_run_id": "abc"}
    assert [p.name for p in tmp_path.iterdir()] == [trial_log.STATE_FILE]  # no temporary file left


def test_location_of_a_local_storage(tmp_path: Path) -> None:
    where = SearchLocation.of(str(tmp_path / "runs"), "mnist")
    assert where.local == (tmp_path / "runs" / "mnist").resolve() and where.experiment == str(where.local)
    assert where.remote is None and (where.storage, where.name) == (str((tmp_path / "runs").resolve()), "mnist")
    assert SearchLocation.parse(tmp_path / "runs" / "mnist/") == where
    assert where.trial("abc") == f"{where.local}/trial_abc"
    assert not where.tune_started() and not where.holds_search(outputs.TRIALS_FILE)
    with pytest.raises(SearchError, match="not a search folder"):
        where.require(outputs.JOB_FILE, "of a search")


def test_location_of_a_uri_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPSEARCH_MIRROR", str(tmp_path / "mirror"))
    where = SearchLocation.of("s3://bucket/searches/", "mnist")  # nothing is opened until it is used
    assert where.experiment == where.remote_uri == "s3://bucket/searches/mnist"
    assert (where.storage, where.name) == ("s3://bucket/searches", "mnist")
    assert where.local.parent == tmp_path / "mirror" and where.local.name.startswith("mnist-")
    assert SearchLocation.parse("s3://bucket/searches/mnist/") == where
    assert where.trial("abc") == "s3://bucket/searches/mnist/trial_abc"
    assert SearchLocation.of("s3://bucket/other", "mnist").local != where.local  # one mirror per search


def test_files_move_between_a_uri_and_its_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPSEARCH_MIRROR", str(tmp_path / "mirror"))
    where = SearchLocation.of(f"file://{tmp_path}/bucket", "s")
    where.check_writable()
    where.local.mkdir(parents=True)
    (where.local / outputs.JOB_FILE).write_text("name: s\n")
    where.upload(outputs.JOB_FILE, outputs.BEST_FILE)  # one that is not there is skipped
    assert (tmp_path / "bucket" / "s" / outputs.JOB_FILE).read_text() == "name: s\n"
    assert not (tmp_path / "bucket" / "s" / outputs.BEST_FILE).exists()
    (where.local / outputs.JOB_FILE).unlink()
    where.download(outputs.JOB_FILE, trial_log.LOG_FILE)
    assert (where.local / outputs.JOB_FILE).read_text() == "name: s\n"
    (tmp_path / "bucket" / "s" / trial_log.LOG_FILE).write_text("longer\n")
    (where.local / trial_log.LOG_FILE).write_text("")
    where.fetch_newer(trial_log.LOG_FILE)
    assert (where.local / trial_log.LOG_FILE).read_text() == "longer\n"


def _checkpoint(trial: Path, name: str, metrics: dict | None) -> None:
    (trial / name).mkdir(parents=True)
    (trial / name / checkpoints.STATE_FILE).write_bytes(b"state")
    if metrics is not None:
        (trial / name / checkpoints.METRICS_FILE).write_text(json.dumps(metrics))


@pytest.mark.parametrize("as_uri", [False, True])
def test_checkpoints_listed_by_epoch_and_best(tmp_path: Path, as_uri: bool) -> None:
    trial = tmp_path / "trial_a"
    _checkpoint(trial, "checkpoint_000000", {"epoch": 1, "val_accuracy": 0.5})
    _checkpoint(trial, "checkpoint_000001", {"epoch": 3, "val_accuracy": 0.7})
    _checkpoint(trial, "checkpoint_000002", None)  # cut short by a kill
    _checkpoint(trial, "checkpoint_000003", {"epoch": 2, "val_accuracy": 0.9})  # numbered anew after a restore
    location = f"file://{trial}" if as_uri else str(trial)
    names = lambda folders: [f.rsplit("/", 1)[1] for f in folders]  # noqa: E731
    assert names(checkpoints.folders(location)) == [f"checkpoint_00000{i}" for i in range(4)]
    assert names(checkpoints.whole(location)) == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000003"]
    assert names(checkpoints.newest_first(location)) == ["checkpoint_000001", "checkpoint_000003",
                                                         "checkpoint_000000", "checkpoint_000002"]
    kept = checkpoints.with_metrics(location)
    assert names(f for f, _ in kept) == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000003"]
    assert names([checkpoints.best(kept, metric="val_accuracy", mode="max")]) == ["checkpoint_000003"]
    assert names([checkpoints.best(kept, metric="val_accuracy", mode="min")]) == ["checkpoint_000000"]
    assert checkpoints.folders(f"{location}/nothing-here") == []


def test_outputs_written_and_read_back(tmp_path: Path) -> None:
    log = tmp_path / trial_log.LOG_FILE
    _write_log(log)
    _checkpoint(tmp_path / "trial_c", "checkpoint_000000", {"epoch": 2, "val_accuracy": 0.8})
    records = trial_log.fold(log, experiment=str(tmp_path), used="mlp")
    scored = []

    def test_score(folder: str, config: dict) -> tuple[float, object]:
        scored.append(folder)
        return 0.75, lambda f: f.write(b"weights")

    final = {"trial_id": "c", "epochs": 2, "train_samples": 10, "seeds": [1000], "test_accuracy": [0.77],
             "mean": 0.77, "std": 0.0, "time_s": 1.0}
    best = outputs.write_outputs(tmp_path, records, metric="val_accuracy", mode="max", test_score=test_score,
                                 final=final)
    assert scored == [f"{tmp_path}/trial_c/checkpoint_000000"]  # the best trial's best checkpoint, only
    assert best["trial_id"] == "c" and best["test_accuracy"] == 0.75 and best["retrained"]["mean"] == 0.77
    assert outputs.read_best(tmp_path) == yaml.safe_load((tmp_path / outputs.BEST_FILE).read_text()) == best
    assert (tmp_path / outputs.MODEL_FILE).read_bytes() == b"weights"
    rows = {r["trial_id"]: r for r in pq.read_table(tmp_path / outputs.TRIALS_FILE).to_pylist()}
    assert {t: r["status"] for t, r in rows.items()} == {"a": "completed", "b": "stopped early", "c": "completed",
                                                         "d": "diverged", "e": "interrupted"}
    assert rows["d"]["best_val_accuracy"] is None  # a diverged trial's values never count
    assert rows["a"]["best_val_accuracy"] == 0.7 and rows["a"]["last_val_accuracy"] == 0.6
    assert rows["a"]["learning_rate"] == 0.01 and rows["b"]["learning_rate"] == 1e-3  # the default filled in
    assert len(pq.read_table(tmp_path / outputs.EPOCHS_FILE)) == 3 + 1 + 2 + 1 + 1
    assert not list(tmp_path.glob(".*.tmp"))  # every file renamed into place
    top = outputs.top_trials(outputs.trial_rows(records, metric="val_accuracy", mode="max"),
                             metric="val_accuracy", mode="max", n=2)
    assert [r["trial_id"] for r in top] == ["c", "a"]


def test_read_best_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="no such folder"):
        outputs.read_best(tmp_path / "nope")
    with pytest.raises(SearchError, match="has not finished or no trial succeeded"):
        outputs.read_best(tmp_path)
    with pytest.raises(SearchError, match="no best.yaml"):
        outputs.read_best(f"file://{tmp_path}")

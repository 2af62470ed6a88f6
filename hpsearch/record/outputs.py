"""What a search writes for its users: trial records → ``trials.parquet``, ``epochs.parquet``,
``best.yaml`` (+ ``best_model.pt``) and ``job.yaml``; and reading ``best.yaml`` back.

Every file is written to a temporary name and renamed into place, so a reader never sees half a
file. The best trial's checkpoint is scored once on the held-out test set; no other trial ever
touches it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping, TypedDict

import yaml

from hpsearch.errors import SearchError
from hpsearch.hyperparameters import HyperparameterSet
from hpsearch.record.location import Remote, is_uri
from hpsearch.record.trial_log import EPOCH_METRICS, LOG_FILE, STATE_FILE, TrialRecord, choose_best, is_finite

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
BEST_FILE = "best.yaml"
JOB_FILE = "job.yaml"
MODEL_FILE = "best_model.pt"
REPORT_FILE = "report.html"  # hpsearch.report writes it
STUDY_FILE = "optuna.journal"  # hpsearch.record.study writes it
# What a search leaves in its folder beside Tune's files (uploaded beside them for a URI storage).
DRIVER_FILES = (JOB_FILE, TRIALS_FILE, EPOCHS_FILE, BEST_FILE, MODEL_FILE, REPORT_FILE, STUDY_FILE, LOG_FILE,
                STATE_FILE)

logger = logging.getLogger(__name__)


class Validation(TypedDict):
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None


class Retrained(TypedDict):
    """The best configuration retrained on train + validation, once per seed (``search.final``)."""

    trial_id: str
    epochs: int
    train_samples: int
    seeds: list[int]
    test_accuracy: list[float]  # one per seed
    mean: float | None
    std: float | None
    time_s: float


class BestRecord(TypedDict, total=False):
    """``best.yaml``: the best trial, its epoch and hyperparameters, its checkpoint's test score."""

    trial_id: str
    status: str
    metric: str
    mode: str
    epoch: int
    hyperparameters: dict[str, Any]
    validation: Validation
    test_accuracy: float | None  # the best checkpoint's, trained on the training split
    checkpoint: str | None
    retrained: Retrained  # when search.final ran for this trial


# ``test_score(checkpoint_dir, config)``: the best checkpoint's test accuracy, and a function that
# writes its model to an open binary file (or None).
TestScore = Callable[[str, Mapping[str, Any]], "tuple[float, Callable[[BinaryIO], None] | None]"]


def trial_rows(records: Iterable[TrialRecord], *, metric: str, mode: str) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        last = r.epochs[-1] if r.epochs else {}
        best = r.best_epoch(metric, mode)
        row: dict[str, Any] = {"trial_id": r.trial_id, "status": r.status.value, "error": r.error}
        row.update(r.hyperparameters)
        row["epochs_run"] = int(last.get("epoch", 0))  # `epochs` is the hyperparameter (planned)
        for m in EPOCH_METRICS:
            row[f"last_{m}"] = _float(last.get(m))
        for m in EPOCH_METRICS:
            values = [e[m] for e in r.epochs if is_finite(e.get(m))] if r.scored else []
            row[f"best_{m}"] = (max(values) if m == "val_accuracy" else min(values)) if values else None
        row["best_epoch"] = int(best["epoch"]) if best else None
        row["time_total_s"] = _float(last.get("time_total_s"))
        rows.append(row)
    return rows


def epoch_rows(records: Iterable[TrialRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        for e in r.epochs:
            rows.append({
                "trial_id": r.trial_id,
                "epoch": int(e.get("epoch", 0)),
                **{m: _float(e.get(m)) for m in EPOCH_METRICS},
                "diverged": bool(e.get("diverged", False)),
                "epoch_time_s": _float(e.get("epoch_time_s")),
                "time_total_s": _float(e.get("time_total_s")),
                "timestamp": _float(e.get("timestamp")),
                "node_id": e.get("node_id"),
                "node_ip": e.get("node_ip"),
            })
    return rows


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# --------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------


def write_outputs(
    out_dir: Path,
    records: list[TrialRecord],
    *,
    metric: str,
    mode: str,
    test_score: TestScore | None = None,
    final: Retrained | None = None,
) -> BestRecord | None:
    """Write the Parquet tables and ``best.yaml``; returns the best record (None if no trial ran).

    ``test_score`` scores the best trial's checkpoint on the test set; the model it returns is
    saved as ``best_model.pt``. ``final``: the best configuration's retraining on train +
    validation, kept in ``best.yaml`` as ``retrained`` when it is of the best trial.
    """
    used = records[0].used if records else None
    write_parquet(out_dir / TRIALS_FILE, trial_rows(records, metric=metric, mode=mode), _trial_schema(used))
    write_parquet(out_dir / EPOCHS_FILE, epoch_rows(records), _epoch_schema())

    chosen = choose_best(records, metric=metric, mode=mode)
    if chosen is None:
        (out_dir / BEST_FILE).unlink(missing_ok=True)
        return None
    record, epoch = chosen
    best: BestRecord = {
        "trial_id": record.trial_id,
        "status": record.status.value,
        "metric": metric,
        "mode": mode,
        "epoch": int(epoch["epoch"]),
        "hyperparameters": record.hyperparameters,
        "validation": {m: _float(epoch.get(m)) for m in EPOCH_METRICS},  # type: ignore[typeddict-item]
        "test_accuracy": None,
        "checkpoint": None,
    }
    ckpt = record.best_checkpoint(metric=metric, mode=mode)
    if ckpt is not None:
        best["checkpoint"] = ckpt
        if test_score is not None:
            try:
                accuracy, write_model = test_score(ckpt, record.config)
            except OSError:
                raise  # the storage's own trouble (a full disk): the search says so
            except Exception as e:  # a checkpoint that cannot be read: no test score, the rest written
                logger.warning("could not score %s on the test set: %s: %s", ckpt, type(e).__name__, e)
            else:
                best["test_accuracy"] = round(float(accuracy), 6)
                if write_model is not None:
                    atomic_write(out_dir / MODEL_FILE, write_model, binary=True)
    if final and final.get("trial_id") == record.trial_id:
        best["retrained"] = dict(final)  # type: ignore[typeddict-item]
    write_yaml(out_dir / BEST_FILE, best)
    return best


def _trial_schema(used: str | HyperparameterSet | None = None) -> Any:
    import pyarrow as pa

    types = {"int": pa.int64(), "float": pa.float64(), "choice": pa.string(), "bool": pa.bool_()}
    fields = [("trial_id", pa.string()), ("status", pa.string()), ("error", pa.string())]
    hps = used if isinstance(used, HyperparameterSet) else HyperparameterSet(used)
    fields += [(name, types[hps.kind_of(name)]) for name in hps.names()]
    fields += [("epochs_run", pa.int64())]
    fields += [(f"last_{m}", pa.float64()) for m in EPOCH_METRICS]
    fields += [(f"best_{m}", pa.float64()) for m in EPOCH_METRICS]
    fields += [("best_epoch", pa.int64()), ("time_total_s", pa.float64())]
    return pa.schema(fields)


def _epoch_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("trial_id", pa.string()), ("epoch", pa.int64())]
                     + [(m, pa.float64()) for m in EPOCH_METRICS]
                     + [("diverged", pa.bool_()), ("epoch_time_s", pa.float64()),
                        ("time_total_s", pa.float64()), ("timestamp", pa.float64()),
                        ("node_id", pa.string()), ("node_ip", pa.string())])


def write_parquet(path: Path, rows: list[dict[str, Any]], schema: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write(path, lambda f: pq.write_table(table, f), binary=True)


def write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, lambda f: yaml.safe_dump(dict(data), f, sort_keys=False), binary=False)


def atomic_write(path: Path, write: Callable[[Any], None], *, binary: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Reading (``hpsearch best``).
# --------------------------------------------------------------------------------------------


def read_best(search: str | Path) -> BestRecord:
    """``best.yaml`` of a search: its folder, or ``<storage>/<name>`` as a URI."""
    if is_uri(str(search)):
        remote = Remote(str(search))
        if not remote.exists(BEST_FILE):
            raise SearchError(f"{search}: no {BEST_FILE}; the search has not finished, no trial succeeded, "
                              "or this is no search")
        return yaml.safe_load(remote.read_bytes(BEST_FILE))
    path = Path(search) / BEST_FILE
    if not path.is_file():
        if not Path(search).is_dir():
            raise SearchError(f"{search}: no such folder; give <storage>/<name> of a search")
        raise SearchError(f"{search}: no {BEST_FILE}; the search has not finished or no trial succeeded "
                          f"(see {TRIALS_FILE})")
    return yaml.safe_load(path.read_text())


def top_trials(rows: list[dict[str, Any]], *, metric: str, mode: str, n: int = 5) -> list[dict[str, Any]]:
    key = f"best_{metric}"
    scored = [r for r in rows if is_finite(r.get(key))]
    return sorted(scored, key=lambda r: r[key], reverse=(mode == "max"))[:n]

"""Trial records → ``trials.parquet``, ``epochs.parquet``, ``best.yaml`` and ``job.yaml``.

Every file is written to a temporary name and renamed into place, so a reader never sees half a
file. The best trial's checkpoint is scored once on the held-out test set; no other trial ever
touches it.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from hpsearch.errors import SearchError
from hpsearch.spec import HYPERPARAMETERS, hyperparameter_names, resolve_hyperparameters

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
BEST_FILE = "best.yaml"
JOB_FILE = "job.yaml"
MODEL_FILE = "best_model.pt"
TRIAL_LOG = "hpsearch_trials.jsonl"  # our own record of what every trial did (raytune writes it)

EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy")


def trial_status(config: Mapping[str, Any], last: Mapping[str, Any] | None, error: str | None) -> str:
    """How a trial that ended came out, from its config, last reported result and error."""
    if error:
        return "failed"
    if not last:
        return "not run"
    if last.get("diverged"):
        return "diverged"
    if int(last.get("epoch", 0)) < int(resolve_hyperparameters(config)["epochs"]):
        return "stopped early"
    return "completed"


@dataclass
class TrialRecord:
    """What one trial did, as plain data (the runner builds these from Ray's results)."""

    trial_id: str
    config: dict[str, Any]
    epochs: list[dict[str, Any]] = field(default_factory=list)  # one reported result per epoch
    error: str | None = None
    checkpoints: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (folder, its result)
    ended: bool = True  # False: still running when the search stopped (it continues on resume)
    model_kind: str | None = None  # the hyperparameters shown are the ones this model uses

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return resolve_hyperparameters(self.config, self.model_kind)

    @property
    def status(self) -> str:
        if not self.ended and not self.error:
            return "interrupted"
        return trial_status(self.config, self.epochs[-1] if self.epochs else None, self.error)

    def best_epoch(self, metric: str, mode: str) -> dict[str, Any] | None:
        scored = [e for e in self.epochs if _finite(e.get(metric))]
        if not scored or self.status in ("failed", "diverged"):
            return None
        pick = max if mode == "max" else min
        return pick(scored, key=lambda e: e[metric])


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def trial_rows(records: Iterable[TrialRecord], *, metric: str, mode: str) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        last = r.epochs[-1] if r.epochs else {}
        best = r.best_epoch(metric, mode)
        row: dict[str, Any] = {"trial_id": r.trial_id, "status": r.status, "error": r.error}
        row.update(r.hyperparameters)
        row["epochs_run"] = int(last.get("epoch", 0))  # `epochs` is the hyperparameter (planned)
        for m in EPOCH_METRICS:
            row[f"last_{m}"] = _float(last.get(m))
        for m in EPOCH_METRICS:
            values = [e[m] for e in r.epochs if _finite(e.get(m))] if r.status not in ("failed", "diverged") else []
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


def choose_best(records: Iterable[TrialRecord], *, metric: str, mode: str) -> tuple[TrialRecord, dict[str, Any]] | None:
    """The trial (and epoch) with the best value of ``metric``; failed and diverged trials never win."""
    candidates = [(r, e) for r in records if (e := r.best_epoch(metric, mode)) is not None]
    if not candidates:
        return None
    pick = max if mode == "max" else min
    return pick(candidates, key=lambda item: item[1][metric])


def best_checkpoint(record: TrialRecord, *, metric: str, mode: str) -> str | None:
    """The retained checkpoint with the best ``metric`` (Tune keeps the best one and the latest)."""
    scored = [(path, res) for path, res in record.checkpoints if _finite(res.get(metric))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda item: item[1][metric])[0]


# --------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------


def write_outputs(
    out_dir: Path,
    records: list[TrialRecord],
    *,
    metric: str,
    mode: str,
    test_score: Callable[[str, dict[str, Any]], tuple[float, Any]] | None = None,
    final: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Write the Parquet tables and ``best.yaml``; returns the best summary (None if no trial ran).

    ``test_score(checkpoint_dir, config)`` returns (test accuracy, model state) for the best
    trial's checkpoint; the state is saved as ``best_model.pt``. ``final``: the best
    configuration's retraining on train + validation (seeds, each one's test accuracy, mean, std),
    kept in ``best.yaml`` as ``retrained`` when it is of the best trial.
    """
    kind = records[0].model_kind if records else None
    write_parquet(out_dir / TRIALS_FILE, trial_rows(records, metric=metric, mode=mode), _trial_schema(kind))
    write_parquet(out_dir / EPOCHS_FILE, epoch_rows(records), _epoch_schema())

    chosen = choose_best(records, metric=metric, mode=mode)
    if chosen is None:
        (out_dir / BEST_FILE).unlink(missing_ok=True)
        return None
    record, epoch = chosen
    best: dict[str, Any] = {
        "trial_id": record.trial_id,
        "status": record.status,
        "metric": metric,
        "mode": mode,
        "epoch": int(epoch["epoch"]),
        "hyperparameters": record.hyperparameters,
        "validation": {m: _float(epoch.get(m)) for m in EPOCH_METRICS},
        "test_accuracy": None,
        "checkpoint": None,
    }
    ckpt = best_checkpoint(record, metric=metric, mode=mode)
    if ckpt is not None:
        best["checkpoint"] = ckpt
        if test_score is not None:
            accuracy, state = test_score(ckpt, record.config)
            best["test_accuracy"] = round(float(accuracy), 6)
            if state is not None:
                import torch

                _atomic(out_dir / MODEL_FILE, lambda f: torch.save(state, f), binary=True)
    if final and final.get("trial_id") == record.trial_id:
        best["retrained"] = dict(final)
    write_yaml(out_dir / BEST_FILE, best)
    return best


def _trial_schema(kind: str | None = None) -> Any:
    import pyarrow as pa

    types = {"int": pa.int64(), "float": pa.float64(), "choice": pa.string()}
    fields = [("trial_id", pa.string()), ("status", pa.string()), ("error", pa.string())]
    fields += [(name, types[HYPERPARAMETERS[name].kind]) for name in hyperparameter_names(kind)]
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
    _atomic(path, lambda f: pq.write_table(table, f), binary=True)


def write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    _atomic(path, lambda f: yaml.safe_dump(dict(data), f, sort_keys=False), binary=False)


def _atomic(path: Path, write: Callable[[Any], None], *, binary: bool) -> None:
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


def read_best(search_dir: str | Path) -> dict[str, Any]:
    """``best.yaml`` of a search: its folder, or ``<storage>/<name>`` as a URI."""
    if "://" in str(search_dir):
        from hpsearch.storage import Remote

        remote = Remote(str(search_dir))
        if not remote.exists(BEST_FILE):
            raise SearchError(f"{search_dir}: no {BEST_FILE}; the search has not finished, no trial succeeded, "
                              "or this is no search")
        return yaml.safe_load(remote.read_bytes(BEST_FILE))
    path = Path(search_dir) / BEST_FILE
    if not path.is_file():
        if not Path(search_dir).is_dir():
            raise SearchError(f"{search_dir}: no such folder; give <storage>/<name> of a search")
        raise SearchError(f"{search_dir}: no {BEST_FILE}; the search has not finished or no trial succeeded "
                          f"(see {TRIALS_FILE})")
    return yaml.safe_load(path.read_text())


def top_trials(rows: list[dict[str, Any]], *, metric: str, mode: str, n: int = 5) -> list[dict[str, Any]]:
    key = f"best_{metric}"
    scored = [r for r in rows if _finite(r.get(key))]
    return sorted(scored, key=lambda r: r[key], reverse=(mode == "max"))[:n]

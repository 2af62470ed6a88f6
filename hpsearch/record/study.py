"""The search as an Optuna study, kept in the search folder: ``optuna.journal``.

Optuna's journal file storage, written by the driver only (the one writer, as for MLflow: parallel
trials never write it, so no lock contention and nothing that a shared filesystem's SQLite locking
could break). Each trial as hpsearch recorded it: its searched parameters, its metric per epoch as
intermediate values, and its state: COMPLETE with its best value, PRUNED when ASHA or the time
budget stopped it early, FAIL when it failed, diverged or never reported. Running trials are added
as they end; at the end of ``run`` / ``resume`` the file is rewritten from the trial log, so that
after a hard kill it holds exactly the search's trials. Then:

    optuna-dashboard hpsearch_runs/<name>/optuna.journal
    optuna.load_study(study_name="<name>", storage=JournalStorage(JournalFileBackend(".../optuna.journal")))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hpsearch.record import outputs
from hpsearch.record.trial_log import TrialRecord, TrialStatus, is_finite
from hpsearch.spec import JobSpec

STUDY_FILE = outputs.STUDY_FILE


def storage(path: Path) -> Any:
    """The journal storage at ``path`` (for ``optuna.load_study``)."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def frozen_trial(record: TrialRecord, job: JobSpec) -> Any:
    """One ended trial as Optuna's FrozenTrial; None for one still running."""
    import optuna

    from hpsearch.space import distributions

    State = optuna.trial.TrialState
    metric, mode = job.search.metric, job.search.mode
    dists = {n: d for n, d in distributions(job).items() if n in record.config}
    status = record.status
    if status is TrialStatus.INTERRUPTED:
        return None
    best = record.best_epoch(metric, mode)
    state = {TrialStatus.COMPLETED: State.COMPLETE, TrialStatus.STOPPED_EARLY: State.PRUNED}.get(status, State.FAIL)
    if state == State.COMPLETE and best is None:
        state = State.FAIL
    return optuna.trial.create_trial(
        state=state, value=float(best[metric]) if state == State.COMPLETE else None,
        params={n: record.config[n] for n in dists}, distributions=dists,
        intermediate_values={int(e["epoch"]): float(e[metric]) for e in record.epochs if is_finite(e.get(metric))},
        user_attrs={"hpsearch_trial_id": record.trial_id, "hpsearch_status": status.value,
                    "epochs_run": int(record.epochs[-1]["epoch"]) if record.epochs else 0,
                    **({"error": record.error[:2000]} if record.error else {})},
    )


def write_study(search_dir: Path, job: JobSpec, records: list[TrialRecord]) -> Path:
    """Rewrite ``optuna.journal`` from the records (atomically: a reader sees the old or the new)."""
    import optuna

    path = search_dir / STUDY_FILE
    tmp = search_dir / f".{STUDY_FILE}.tmp"
    tmp.unlink(missing_ok=True)
    study = optuna.create_study(study_name=job.name, storage=storage(tmp),
                                direction="maximize" if job.search.mode == "max" else "minimize")
    study.set_user_attr("hpsearch_metric", job.search.metric)
    trials = [t for t in (frozen_trial(r, job) for r in records) if t is not None]
    study.add_trials(trials)
    os.replace(tmp, path)
    return path


class StudyWriter:
    """Adds trials to the study as they end, for a dashboard on a running search (the driver's
    callback holds one; the storage is opened on first use: Tune pickles its callbacks)."""

    def __init__(self, search_dir: str, job: JobSpec) -> None:
        self.path, self.job = Path(search_dir) / STUDY_FILE, job
        self._study: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_study": None}

    def add(self, record: TrialRecord) -> None:
        import optuna

        trial = frozen_trial(record, self.job)
        if trial is None:
            return
        if self._study is None:
            self._study = optuna.create_study(study_name=self.job.name, storage=storage(self.path),
                                              load_if_exists=True,
                                              direction="maximize" if self.job.search.mode == "max" else "minimize")
        self._study.add_trial(trial)

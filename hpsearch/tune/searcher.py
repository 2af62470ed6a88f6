"""Optuna through Tune, told the truth about early-stopped trials.

Relies on Tune internals: ``OptunaSearch._ot_trials``, ``._ot_study`` and ``._completed_trials``
(checked against Ray 2.60 and Optuna 5.0); a Ray upgrade must re-check them (tests/test_failures.py
``test_honest_optuna_search_tells_optuna_what_happened`` does).
"""

from __future__ import annotations

import logging
import math

from ray.tune.search.optuna import OptunaSearch

from hpsearch.record.trial_log import TrialStatus, trial_status

logger = logging.getLogger("hpsearch.search")


class HonestOptunaSearch(OptunaSearch):
    """OptunaSearch that reports an ASHA-stopped trial to Optuna as PRUNED, not COMPLETE.

    Ray's OptunaSearch tells Optuna COMPLETE with the early, partial-budget value, so TPE compares
    a 1-epoch result with full runs as if both were final. Pruned (with its intermediate values,
    already reported per epoch) is the honest signal; TPE ranks pruned trials by how far they got.
    A diverged trial (NaN) is reported FAIL, never RUNNING.

    A trial it never suggested (a hard kill left Tune's snapshot newer than this searcher's state;
    see snapshot.reconcile_searcher) runs all the same: Optuna just does not learn from it.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # A trial resumed from a checkpoint older than its last report (its newest was cut short)
        # reports some epochs again: Optuna keeps the first value, as the record does; no warning.
        import warnings

        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return  # never seen, or run again after it ended (the snapshot was older): nothing to tell
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The reported value is ignored because this `step=")
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            # Never seen (its state is older than Tune's snapshot), or told already (a trial that
            # ended after the snapshot, reporting its last result again): nothing new to tell.
            logger.debug("optuna: nothing to tell for trial %s", trial_id)
            return
        if error or not result:
            return super().on_trial_complete(trial_id, result, error)
        value = result.get(self.metric)
        # Tune hands searchers the result flattened: the config comes as "config/<name>" keys.
        config = {k[len("config/"):]: v for k, v in result.items() if k.startswith("config/")}
        status = trial_status(config, result, None)
        State = optuna.trial.TrialState
        try:
            if status is TrialStatus.DIVERGED or not (isinstance(value, (int, float)) and math.isfinite(value)):
                self._ot_study.tell(ot_trial, None, state=State.FAIL)
            elif status is TrialStatus.STOPPED_EARLY:
                self._ot_study.tell(ot_trial, None, state=State.PRUNED)
            else:
                self._ot_study.tell(ot_trial, value, state=State.COMPLETE)
        except RuntimeError as e:
            # GridSampler calls study.stop() once the grid is done, which raises outside
            # study.optimize(); the trial's state is recorded all the same.
            logger.debug("optuna: %s", e)
        self._completed_trials.add(trial_id)

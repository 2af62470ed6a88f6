"""ASHA that compares like with like: trials at the same point of their learning-rate schedules.

Relies on Tune internals: ``ASHAScheduler._trial_info`` (trial id → an object whose
``on_result(trial, cur_iter, cur_rew)`` decides), ``._max_t`` and ``._reduction_factor`` (checked
against Ray 2.60); a Ray upgrade must re-check them (tests/test_quality.py's ASHA tests do).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from hpsearch.hyperparameters import lr_factor, resolve_hyperparameters
from hpsearch.plan import asha_rungs

# Two trials are compared at a rung when their learning rates there are within this share of
# their base rates of each other: at ASHA's first rungs nearly every trial is still near its
# base rate, and a schedule's last epochs are compared only with others' last epochs.
SAME_PHASE = 0.1


def schedule_phase(config: dict[str, Any], epoch: float) -> float:
    """Where the trial's learning rate stands after ``epoch``: the share of its base rate it trained at."""
    hp = resolve_hyperparameters(config)
    return lr_factor(hp["lr_schedule"], epoch=int(epoch), epochs=int(hp["epochs"]))


class ASHAByPhase(ASHAScheduler):
    """ASHA whose rungs compare a trial only with trials at the same point of their schedules.

    The learning rate follows each trial's own schedule over its planned epochs (cosine by
    default). At a shared rung the shorter trial is further down its schedule: by epoch 6 a
    10-epoch trial trains at 50% of its learning rate and a 50-epoch one at 98%, so the short one
    looks better whatever its other hyperparameters. Measured (benchmarks/search_quality.py,
    jobs/mnist.yaml's space on Fashion-MNIST, seed 0): with stock ASHA, 51 of TPE's 69 trials
    planned 10 epochs, the fewest the space allows; the best trial was a 10-epoch one.

    So each rung records a trial's value with its learning-rate factor there
    (:func:`hpsearch.hyperparameters.lr_factor`), and a trial reaching the rung is stopped only if
    it is below the top ``1/reduction_factor`` of the records within :data:`SAME_PHASE` of its own
    factor. With a constant learning rate, or early in every schedule, that is every record: stock
    ASHA, whose rungs share what they learn across trial lengths. (The previous rule, one set of
    rungs per planned length, never stopped the first trial of each length: a search of five
    lengths ran five random start-up trials to their end.)
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rungs = PhaseRungs(grace_period=kwargs.get("grace_period", 1), max_t=self._max_t,
                                 reduction_factor=self._reduction_factor)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)  # checks metric and mode
        self._trial_info[trial.trial_id] = self._rungs

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tune pickles the scheduler into tuner.pkl when a search starts, and a resume unpickles
        # it: a search started under the rule before this one (ASHAByLength, a set of rungs per
        # planned length, pickled with none recorded) resumes under this one.
        self.__dict__.update(state)
        if "_rungs" not in state:
            self.__dict__.pop("_by_length", None)
            self._rungs = PhaseRungs(grace_period=state.get("_grace_period", 1), max_t=self._max_t,
                                     reduction_factor=self._reduction_factor)
            self._trial_info = {trial_id: self._rungs for trial_id in self._trial_info}


ASHAByLength = ASHAByPhase  # the name a search started before the rule by phase pickled


class PhaseRungs:
    """One set of ASHA rungs, each value recorded with the trial's learning-rate factor there
    (it stands in for Tune's ``_Bracket``: ``on_result`` decides, ``debug_str`` describes)."""

    def __init__(self, *, grace_period: int, max_t: int, reduction_factor: float) -> None:
        self.rf = reduction_factor
        # Descending milestones: a result is judged at the highest rung it has reached.
        milestones = asha_rungs(grace_period=grace_period, reduction_factor=reduction_factor, max_t=max_t)
        self.rungs: list[tuple[float, dict[str, tuple[float, float]]]] = [(m, {}) for m in reversed(milestones)]

    def cutoff(self, recorded: dict[str, tuple[float, float]], phase: float) -> float | None:
        """The value a trial at ``phase`` must reach: the top 1/rf of the records at its phase."""
        peers = [value for value, at in recorded.values() if abs(at - phase) <= SAME_PHASE + 1e-9]
        if not peers:
            return None
        return float(np.percentile(peers, (1 - 1 / self.rf) * 100))

    def on_result(self, trial: Any, cur_iter: float, cur_rew: float | None) -> str:
        for milestone, recorded in self.rungs:
            if cur_iter < milestone or trial.trial_id in recorded:
                continue
            if cur_rew is None or not np.isfinite(cur_rew):
                return TrialScheduler.CONTINUE  # a diverged trial ends itself; it is no peer
            phase = schedule_phase(trial.config, milestone)
            cutoff = self.cutoff(recorded, phase)
            recorded[trial.trial_id] = (float(cur_rew), phase)
            return TrialScheduler.STOP if cutoff is not None and cur_rew < cutoff else TrialScheduler.CONTINUE
        return TrialScheduler.CONTINUE

    def debug_str(self) -> str:
        return "Rungs: " + ", ".join(f"{m:g}: {len(r)} trials" for m, r in self.rungs)

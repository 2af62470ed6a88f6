"""ASHA that compares like with like.

Relies on Tune internals: ``async_hyperband._Bracket``, ``ASHAScheduler._trial_info``,
``._max_t`` and ``._reduction_factor`` (checked against Ray 2.60); a Ray upgrade must re-check them
(tests/test_quality.py's ASHAByLength tests do).
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from hpsearch.hyperparameters import resolve_hyperparameters


def planned_epochs(config: dict[str, Any]) -> int:
    """The epochs a trial plans to train (its ``epochs``, or the default)."""
    return int(resolve_hyperparameters(config)["epochs"])


class ASHAByLength(ASHAScheduler):
    """ASHA whose rungs compare a trial only with trials that plan as many epochs as it does.

    The learning rate follows each trial's own schedule over its planned epochs (cosine by
    default). At a shared rung the shorter trial is further down its schedule: by epoch 6 a
    10-epoch trial trains at 35% of its learning rate and a 50-epoch one at 95%, so the short one
    looks better whatever its other hyperparameters. Measured (benchmarks/search_quality.py,
    jobs/mnist.yaml's space on Fashion-MNIST, seed 0): with one set of rungs, 51 of TPE's 69
    trials planned 10 epochs, the fewest the space allows, since mostly short trials got past
    the rungs and TPE learns from the trials that finish; the best trial was a 10-epoch one.
    With a set of rungs per planned length, every length is pruned at the same rate.

    Relies on Tune internals (``_Bracket``, ``_trial_info``, ``_max_t``), checked against Ray 2.60.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._grace_period = kwargs.get("grace_period", 1)
        self._by_length: dict[int, _Bracket] = {}

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)  # checks metric and mode
        length = min(planned_epochs(trial.config), self._max_t)
        bracket = self._by_length.get(length)
        if bracket is None:
            # Rungs as for the whole search (grace_period x reduction_factor^k), up to this length.
            bracket = self._by_length[length] = _Bracket(min(self._grace_period, length), length,
                                                         self._reduction_factor, 0)
        self._trial_info[trial.trial_id] = bracket

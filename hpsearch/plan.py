"""What a search will do, worked out before it runs: ASHA's rungs, trials at once, the epochs a
whole search is expected to consume, and the cost of the final retraining. No Ray, no torch:
``hpsearch validate`` prints it instantly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from hpsearch.spec import CategoricalParam, FixedParam, JobSpec, grid_values

# The final retraining may take at most this share of search.time_budget_s; fewer seeds otherwise.
FINAL_SHARE_OF_BUDGET = 0.25


def asha_rungs(*, grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """The epochs at which ASHA compares trials, as Ray Tune's ``ASHAScheduler`` (one bracket)
    places them: ``grace_period * reduction_factor**k`` for ``k = 0 .. log(max_t/grace)/log(rf)``."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor**k for k in range(count)]


def planned_epochs(job: JobSpec) -> list[int]:
    """The values of ``epochs`` a trial may plan, each equally likely for a random sampler."""
    p = job.param("epochs")
    if p is None:
        return [job.max_epochs()]
    if isinstance(p, (FixedParam, CategoricalParam)) or getattr(p, "log", False) is False:
        return [int(v) for v in grid_values(p)]
    return list(range(int(p.low), int(p.high) + 1))  # a log-scaled int range: every integer


def expected_epochs_per_trial(planned: int, *, rungs: list[float], reduction_factor: float, max_t: int) -> float:
    """Epochs one trial of ``planned`` epochs is expected to train under ASHA: past each rung it
    reaches, it goes on with probability 1/reduction_factor (the top share of its rung)."""
    end = min(planned, max_t)
    total, survive, start = 0.0, 1.0, 0.0
    for milestone in [*rungs, math.inf]:
        stop = min(end, milestone)
        if stop > start:
            total += survive * (stop - start)
        if end <= milestone:
            break
        survive /= reduction_factor
        start = milestone
    return total


@dataclass(frozen=True)
class Plan:
    num_samples: int
    enqueued: int
    at_once: int
    at_once_why: str
    rungs: list[float]  # empty for FIFO
    reduction_factor: float
    max_t: int
    expected_epochs: float  # the whole search, ASHA included
    full_epochs: float  # the whole search if no trial were stopped early
    final_seeds: int


def make_plan(job: JobSpec, *, cpus: int | None = None) -> Plan:
    """The plan of ``job`` on a local machine of ``cpus`` CPUs (default: this one's)."""
    from hpsearch import space

    cpus = cpus or os.cpu_count() or 1
    per_trial = job.resources.cpu
    slots = max(1, int(cpus / per_trial + 1e-6))
    why = f"{cpus} CPUs, {per_trial:g} per trial"
    if job.search.max_concurrent_trials is not None and job.search.max_concurrent_trials < slots:
        slots, why = job.search.max_concurrent_trials, "search.max_concurrent_trials"
    sched = job.search.scheduler
    planned = planned_epochs(job)
    full = sum(min(e, job.max_t) for e in planned) / len(planned)
    if sched.name == "asha":
        rungs = asha_rungs(grace_period=sched.grace_period, reduction_factor=sched.reduction_factor, max_t=job.max_t)
        per_trial_epochs = sum(expected_epochs_per_trial(e, rungs=rungs, reduction_factor=sched.reduction_factor,
                                                         max_t=job.max_t) for e in planned) / len(planned)
    else:
        rungs, per_trial_epochs = [], full
    n = job.search.num_samples
    return Plan(num_samples=n, enqueued=len(space.enqueued_points(job)), at_once=min(slots, n), at_once_why=why,
                rungs=rungs, reduction_factor=sched.reduction_factor, max_t=job.max_t,
                expected_epochs=per_trial_epochs * n, full_epochs=full * n, final_seeds=job.search.final.seeds)


def describe(plan: Plan, job: JobSpec) -> list[str]:
    """The plan as lines for ``hpsearch validate``."""
    enq = f" ({plan.enqueued} enqueued first: {'the defaults' if job.search.enqueue == 'defaults' else 'search.enqueue'})" \
        if plan.enqueued else ""
    lines = [f"trials: {plan.num_samples}{enq}, {plan.at_once} at a time on this machine ({plan.at_once_why})"]
    if plan.rungs:
        rungs = ", ".join(_epochs(r) for r in plan.rungs)
        lines.append(f"ASHA: trials compared at epochs {rungs} (up to each trial's own epochs, with the trials at "
                     f"the same point of their learning-rate schedules); at each, one in {plan.reduction_factor:g} "
                     f"goes on (max_t {plan.max_t})")
    else:
        lines.append("FIFO: every trial runs all its epochs")
    lines.append(f"epochs: about {plan.expected_epochs:.0f} for the whole search"
                 + (f" ({plan.full_epochs:.0f} if no trial were stopped early)" if plan.rungs else ""))
    if job.search.time_budget_s:
        lines.append(f"time budget: {job.search.time_budget_s:g} s for the trials (the search may end first)")
    if plan.final_seeds:
        lines.append(f"final: the best configuration retrained {plan.final_seeds} time{'s' if plan.final_seeds > 1 else ''} "
                     "on train + validation for its best epoch count, each scored on the test set"
                     + (f" (fewer if they would take over {FINAL_SHARE_OF_BUDGET:.0%} of the time budget)"
                        if job.search.time_budget_s else ""))
    else:
        lines.append("final: no retraining (search.final.seeds: 0); the best checkpoint is scored on the test set")
    return lines


def _epochs(milestone: float) -> str:
    return f"{milestone:g}" if float(milestone).is_integer() else f"{milestone:.3g}"


def final_seeds_that_fit(seeds: int, *, epoch_s: float | None, epochs: int, growth: float, slots: int,
                         budget_s: float | None) -> tuple[int, float | None]:
    """How many retrainings to run, and their expected seconds (None when unknown).

    ``epoch_s``: the best trial's seconds per epoch; ``growth``: (train + val) / train samples.
    With a time budget, the retraining takes at most FINAL_SHARE_OF_BUDGET of it (at least one).
    """
    if seeds <= 0 or not epoch_s or not math.isfinite(epoch_s):
        return seeds, None
    one = epoch_s * epochs * growth
    est = math.ceil(seeds / max(1, slots)) * one
    if budget_s and est > FINAL_SHARE_OF_BUDGET * budget_s:
        rounds = int(FINAL_SHARE_OF_BUDGET * budget_s // one)
        seeds = max(1, min(seeds, rounds * max(1, slots)))  # one all the same, when none fits
        est = math.ceil(seeds / max(1, slots)) * one
    return seeds, est


def summary_of(values: list[float]) -> dict[str, Any]:
    """Mean and (sample) standard deviation of the finite values."""
    import statistics

    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": round(statistics.fmean(finite), 6), "std": round(std, 6)}

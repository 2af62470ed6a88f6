"""``JobSpec.space`` → an Optuna define-by-run function and sampler.

The function calls ``trial.suggest_int / suggest_float / suggest_categorical`` exactly as the
Optuna objective of a tutorial would, so the trial sees the same space. Fixed scalars are returned
as constants. ``momentum`` is conditional: it is only sampled when the trial's optimizer is SGD
(the only optimizer that uses it), so no trial is spent on a value that changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpsearch.spec import (
    ENQUEUE_DEFAULTS,
    CategoricalParam,
    FixedParam,
    FloatParam,
    IntParam,
    JobSpec,
    Param,
    grid_values,
)

if TYPE_CHECKING:
    import optuna


def define_by_run(job: JobSpec) -> DefineByRun:
    """The space as a function of an Optuna trial; returns the fixed values."""
    return DefineByRun(job.space)


class DefineByRun:
    """A picklable define-by-run function (Tune saves the searcher, and a closure does not pickle)."""

    def __init__(self, space: tuple[tuple[str, Param], ...]) -> None:
        # The optimizer first (a stable sort keeps the rest in file order): momentum depends on it.
        self.space = tuple(sorted(space, key=lambda item: item[0] != "optimizer"))

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for name, p in self.space:
            if name == "momentum" and chosen.get("optimizer", fixed.get("optimizer", "Adam")) != "SGD":
                continue
            if isinstance(p, FixedParam):
                fixed[name] = p.value
            elif isinstance(p, IntParam):
                chosen[name] = trial.suggest_int(name, p.low, p.high, step=p.step, log=p.log)
            elif isinstance(p, FloatParam):
                chosen[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
            elif isinstance(p, CategoricalParam):
                chosen[name] = trial.suggest_categorical(name, list(p.choices))
        return fixed


def enqueued_points(job: JobSpec) -> list[dict[str, Any]]:
    """The trials the search starts with (``search.enqueue``), before its sampler's own."""
    enqueue = job.search.enqueue
    if enqueue == ENQUEUE_DEFAULTS:
        point = default_point(job)
        return [point] if point else []
    if isinstance(enqueue, str):  # "none"
        return []
    return [dict(point) for point in enqueue]


def default_point(job: JobSpec) -> dict[str, Any]:
    """The training function's defaults for the searched hyperparameters, each moved to the
    nearest value its range allows (a default outside the space is no trial of the search)."""
    point: dict[str, Any] = {}
    searched = [(name, p) for name, p in DefineByRun(job.space).space if not isinstance(p, FixedParam)]
    fixed = {name: p.value for name, p in job.space if isinstance(p, FixedParam)}
    defaults = job.hyperparameters.defaults()
    for name, p in searched:
        if name == "momentum" and point.get("optimizer", fixed.get("optimizer", "Adam")) != "SGD":
            continue  # conditional: not sampled unless the optimizer is SGD
        # A factory's hyperparameter without a default starts in the middle of its range.
        point[name] = middle(p) if defaults.get(name) is None else nearest(p, defaults[name])
    return point


def first_trial(job: JobSpec) -> dict[str, Any]:
    """The configuration of a first trial: the defaults point and the fixed values."""
    return {**{name: p.value for name, p in job.space if isinstance(p, FixedParam)}, **default_point(job)}


def middle(param: Param) -> Any:
    """The middle of a range (geometric on a log scale), or the first choice."""
    if isinstance(param, CategoricalParam):
        return param.choices[0]
    if isinstance(param, FixedParam):
        return param.value
    mid = (param.low * param.high) ** 0.5 if param.log else (param.low + param.high) / 2
    return nearest(param, mid)


def nearest(param: Param, value: Any) -> Any:
    """The value of ``param``'s space closest to ``value`` (its first choice if it has no order)."""
    if isinstance(param, FixedParam):
        return param.value
    if isinstance(param, CategoricalParam):
        same = [c for c in param.choices if c == value and type(c) is type(value)]
        if same:
            return same[0]
        numbers = [c for c in param.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if numbers and isinstance(value, (int, float)):
            return min(numbers, key=lambda c: abs(c - value))
        return param.choices[0]
    v = min(max(value, param.low), param.high)
    if param.step is not None and not param.log:
        k = round((v - param.low) / param.step)
        k = min(k, round((param.high - param.low) / param.step))
        v = param.low + k * param.step
    if isinstance(param, IntParam):
        return round(v)
    return round(float(v), 12)


def startup_trials(num_samples: int) -> int:
    """TPE's random start-up trials: Optuna's 10, fewer for short searches (at least 4), so a
    12-trial search is not 10 random trials and 2 guided ones."""
    return max(4, min(10, num_samples // 4))


def make_sampler(job: JobSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler the job names, seeded from the job's seed."""
    import optuna

    seed = job.seed
    name = job.search.searcher.sampler
    if name == "tpe":
        # Multivariate TPE (Optuna 5's default) models the hyperparameters jointly; group=True
        # splits the conditional space (momentum exists only for SGD) into its sub-spaces; the
        # constant liar keeps parallel trials from being suggested the same point.
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # group=True
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(job.search.num_samples),
                                              multivariate=True, group=True, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        grid = {n: grid_values(p) for n, p in job.space if not isinstance(p, FixedParam)}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if name == "cmaes":
        # CMA-ES handles numbers; categorical parameters fall back to independent sampling.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {name!r}")  # spec validation makes this unreachable


def distributions(job: JobSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna's distribution of each searched hyperparameter (what ``define_by_run`` suggests from)."""
    import optuna.distributions as d

    out: dict[str, Any] = {}
    for name, p in job.space:
        if isinstance(p, IntParam):
            out[name] = d.IntDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, FloatParam):
            out[name] = d.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, CategoricalParam):
            out[name] = d.CategoricalDistribution(list(p.choices))
    return out

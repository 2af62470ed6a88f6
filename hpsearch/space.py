"""``JobSpec.space`` → an Optuna define-by-run function and sampler.

The function calls ``trial.suggest_int / suggest_float / suggest_categorical`` exactly as the
Optuna objective of a tutorial would, so the trial sees the same space. Fixed scalars are returned
as constants. ``momentum`` is conditional: it is only sampled when the trial's optimizer is SGD
(the only optimizer that uses it), so no trial is spent on a value that changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpsearch.spec import CategoricalParam, FixedParam, FloatParam, IntParam, JobSpec, Param, grid_values

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


def make_sampler(job: JobSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler the job names, seeded from the job's seed."""
    import optuna

    seed = job.seed
    name = job.search.searcher.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
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

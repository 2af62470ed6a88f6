"""The space → Optuna: what trials see matches the job, for every sampler."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from support import small_job

from hpsearch.space import define_by_run, make_sampler
from hpsearch.hyperparameters import SAMPLERS
from hpsearch.spec import validate

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _job(tmp_path: Path, sampler: str = "tpe", **space):
    job = small_job(tmp_path, search={"searcher": {"name": "optuna", "sampler": sampler}})
    job["space"] = space
    return validate(job)


def _sample(job, n: int) -> list[dict]:
    study = optuna.create_study(direction="maximize", sampler=make_sampler(job))
    define = define_by_run(job)
    configs = []
    for _ in range(n):
        trial = study.ask()
        fixed = define(trial)
        configs.append({**trial.params, **fixed})
        try:
            study.tell(trial, 0.5)
        except RuntimeError:  # GridSampler stops the study once every point was visited
            pass
    return configs


def test_values_stay_in_their_ranges_and_fixed_values_pass_through(tmp_path: Path) -> None:
    job = _job(tmp_path,
               num_hidden_layers={"type": "int", "low": 1, "high": 5},
               neurons_per_layer={"type": "int", "low": 80, "high": 128, "step": 8},
               learning_rate={"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
               dropout_rate={"type": "float", "low": 0.1, "high": 0.5, "step": 0.1},
               batch_size={"type": "categorical", "choices": [16, 32]},
               epochs=7)
    for c in _sample(job, 20):
        assert 1 <= c["num_hidden_layers"] <= 5
        assert c["neurons_per_layer"] in range(80, 129, 8)
        assert 1e-5 <= c["learning_rate"] <= 1e-1
        assert any(abs(c["dropout_rate"] - v) < 1e-9 for v in (0.1, 0.2, 0.3, 0.4, 0.5))
        assert c["batch_size"] in (16, 32)
        assert c["epochs"] == 7


def test_momentum_is_sampled_for_sgd_only(tmp_path: Path) -> None:
    job = _job(tmp_path, optimizer={"type": "categorical", "choices": ["Adam", "SGD"]},
               momentum={"type": "float", "low": 0.0, "high": 0.9})
    configs = _sample(job, 30)
    assert {c["optimizer"] for c in configs} == {"Adam", "SGD"}
    for c in configs:
        assert ("momentum" in c) == (c["optimizer"] == "SGD")


def test_grid_sampler_visits_every_point(tmp_path: Path) -> None:
    job = _job(tmp_path, "grid", num_hidden_layers={"type": "int", "low": 1, "high": 3},
               optimizer={"type": "categorical", "choices": ["Adam", "SGD"]})
    seen = {(c["num_hidden_layers"], c["optimizer"]) for c in _sample(job, 6)}
    assert seen == {(n, o) for n in (1, 2, 3) for o in ("Adam", "SGD")}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_samples_and_is_seeded(sampler: str, tmp_path: Path) -> None:
    space = {"num_hidden_layers": {"type": "int", "low": 1, "high": 4},
             "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "step": 1e-4}}
    job = _job(tmp_path, sampler, **space)
    first, second = _sample(job, 12), _sample(job, 12)
    assert first == second  # same seed, same proposals
    assert len({c["num_hidden_layers"] for c in first}) > 1


@pytest.mark.parametrize("num_samples,startup", [(8, 4), (16, 4), (24, 6), (64, 10), (500, 10)])
def test_tpe_is_multivariate_grouped_with_the_constant_liar_and_its_start_up_scaled(
        tmp_path: Path, num_samples: int, startup: int) -> None:
    # What the README says of the default sampler (Optuna's private names, checked on Optuna 5.0).
    from hpsearch.space import make_sampler

    job = _job(tmp_path, "tpe", learning_rate={"type": "float", "low": 1e-4, "high": 1e-1, "log": True})
    from dataclasses import replace

    job = replace(job, search=replace(job.search, num_samples=num_samples))
    sampler = make_sampler(job)
    assert (sampler._multivariate, sampler._group, sampler._constant_liar) == (True, True, True)
    assert sampler._n_startup_trials == startup == max(4, min(10, num_samples // 4))

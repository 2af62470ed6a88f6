"""What makes a search good and its score honest: the defaults enqueued first, the final
retraining on train + validation, and the plan `hpsearch validate` prints (ASHA's rungs)."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from support import REPO, small_job, write_job
from mlflow.tracking import MlflowClient

from hpsearch import plan, space
from hpsearch.cli import cli
from hpsearch.data import load
from hpsearch.spec import DataSpec, ModelSpec, load_job, validate
from hpsearch.trainable import retrain, train

# --------------------------------------------------------------------------------------------
# The defaults, moved into the space, are the first trial.
# --------------------------------------------------------------------------------------------


def test_default_point_is_the_defaults_moved_into_the_space() -> None:
    job = load_job(REPO / "jobs" / "mnist.yaml")
    point = space.default_point(job)
    # Inside their ranges already: the training function's own defaults.
    assert point["learning_rate"] == 1e-3 and point["batch_size"] == 64 and point["optimizer"] == "Adam"
    assert point["num_hidden_layers"] == 2 and point["neurons_per_layer"] == 128 and point["dropout_rate"] == 0.2
    # Outside: the nearest value the range allows (weight decay 0 -> its low end; 10 epochs is in range).
    assert point["weight_decay"] == 1e-5 and point["epochs"] == 10
    assert "momentum" not in point  # only sampled for SGD, and the default optimizer is Adam
    for name, value in point.items():
        assert validate({**job.to_dict(), "search": {**job.to_dict()["search"], "enqueue": [{name: value}]}})


@pytest.mark.parametrize(("name", "param", "value", "expected"), [
    ("neurons_per_layer", {"type": "int", "low": 80, "high": 128, "step": 8}, 130, 128),
    ("neurons_per_layer", {"type": "int", "low": 80, "high": 128, "step": 8}, 85, 88),
    ("dropout_rate", {"type": "float", "low": 0.1, "high": 0.5, "step": 0.1}, 0.0, 0.1),
    ("weight_decay", {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}, 0.0, 1e-5),
    ("batch_size", {"type": "categorical", "choices": [16, 32]}, 64, 32),
    ("optimizer", {"type": "categorical", "choices": ["SGD", "AdamW"]}, "Adam", "SGD"),
])
def test_nearest_value_of_a_range(tmp_path: Path, name: str, param: dict, value, expected) -> None:
    job = small_job(tmp_path)
    job["space"] = {name: param}
    p = dict(validate(job).space)[name]
    assert space.nearest(p, value) == expected


def test_enqueue_settings(tmp_path: Path) -> None:
    assert space.enqueued_points(validate(small_job(tmp_path, search={"enqueue": "none"}))) == []
    # The grid sampler visits its own points: nothing is enqueued unless asked for.
    grid = small_job(tmp_path, search={"searcher": {"sampler": "grid"}})
    grid["space"]["learning_rate"] = {"type": "categorical", "choices": [0.001, 0.01]}
    assert validate(grid).search.enqueue == "none"
    points = [{"learning_rate": 0.002}, {"num_hidden_layers": 2, "neurons_per_layer": 48}]
    job = validate(small_job(tmp_path, search={"enqueue": points}))
    assert space.enqueued_points(job) == points
    assert validate(job.to_dict()).search == job.search  # round-trips through job.yaml


# --------------------------------------------------------------------------------------------
# The plan: ASHA's rungs as Ray Tune places them, and the epochs a search consumes.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("grace", "rf", "max_t", "rungs"), [
    (2, 3, 50, [2, 6, 18]),
    (1, 3, 27, [1, 3, 9, 27]),
    (3, 3, 30, [3, 9, 27]),
    (1, 2, 10, [1, 2, 4, 8]),
    (5, 4, 10, [5]),
    (1, 2.5, 20, [1, 2.5, 6.25, 15.625]),
])
def test_rungs_are_the_ones_ray_tune_uses(grace: int, rf: float, max_t: int, rungs: list) -> None:
    from ray.tune.schedulers import ASHAScheduler

    assert plan.asha_rungs(grace_period=grace, reduction_factor=rf, max_t=max_t) == pytest.approx(rungs)
    # Checked against Ray's own scheduler (its one bracket keeps the rungs in descending order).
    ray_rungs = [milestone for milestone, _ in ASHAScheduler(time_attr="epoch", metric="m", mode="max", max_t=max_t,
                                                             grace_period=grace, reduction_factor=rf)._brackets[0]._rungs]
    assert sorted(ray_rungs) == pytest.approx(rungs)


def test_expected_epochs_under_asha_and_fifo(tmp_path: Path) -> None:
    job = small_job(tmp_path, search={"num_samples": 9, "scheduler": {"name": "asha", "grace_period": 1,
                                                                        "reduction_factor": 3, "max_t": 9}})
    job["space"]["epochs"] = 9
    p = plan.make_plan(validate(job), cpus=2)
    # Rungs 1, 3, 9: 1 epoch each, a third go on to 3, a ninth to 9.
    assert p.rungs == [1, 3, 9] and p.expected_epochs == pytest.approx(9 * (1 + 2 / 3 + 6 / 9))
    assert p.full_epochs == 81 and p.at_once == 2
    job["search"]["scheduler"] = {"name": "fifo"}
    fifo = plan.make_plan(validate(job), cpus=2)
    assert fifo.rungs == [] and fifo.expected_epochs == fifo.full_epochs == 81
    # A trial planning fewer epochs than a rung stops at its own end.
    assert plan.expected_epochs_per_trial(2, rungs=[1, 3, 9], reduction_factor=3, max_t=9) == pytest.approx(1 + 1 / 3)


def test_validate_prints_the_plan(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", str(REPO / "jobs" / "mnist.yaml"),
                                      "--set", "search.max_concurrent_trials=1"])
    assert result.exit_code == 0, result.output
    assert "trials: 64 (1 enqueued first: the defaults), 1 at a time on this machine (search.max_concurrent_trials)" \
        in result.output
    assert "ASHA: trials compared at epochs 2, 6, 18 (up to each trial's own epochs, with the trials at the same " \
        "point of their learning-rate schedules); at each, one in 3 goes on (max_t 50)" in result.output
    assert "final: the best configuration retrained 3 times" in result.output
    off = CliRunner().invoke(cli, ["validate", str(REPO / "jobs" / "mnist.yaml"), "--set", "search.final.seeds=0",
                                   "--set", "search.scheduler={name: fifo}"])
    assert "FIFO: every trial runs all its epochs" in off.output and "no retraining" in off.output


@pytest.mark.parametrize(("seeds", "epoch_s", "budget", "slots", "expected"), [
    (3, 1.0, None, 2, (3, 2 * 10 * 1.1)),  # no budget: all of them, two rounds on two slots
    (3, 1.0, 1000, 2, (3, 2 * 10 * 1.1)),  # 22 s fits in a quarter of 1000 s
    (3, 1.0, 60, 2, (2, 10 * 1.1)),  # a quarter of 60 s holds one round: two seeds
    (3, 10.0, 60, 2, (1, 10 * 10 * 1.1)),  # not even one fits: one all the same
    (0, 1.0, 60, 2, (0, None)),  # off
])
def test_final_seeds_that_fit_the_budget(seeds, epoch_s, budget, slots, expected) -> None:
    n, est = plan.final_seeds_that_fit(seeds, epoch_s=epoch_s, epochs=10, growth=1.1, slots=slots, budget_s=budget)
    assert n == expected[0]
    assert est == (None if expected[1] is None else pytest.approx(expected[1]))


# --------------------------------------------------------------------------------------------
# The final retraining.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load(DataSpec(dataset="digits"), seed=0)


def test_retrain_uses_train_and_validation_and_scores_the_test_set(digits) -> None:
    config = {"epochs": 6, "learning_rate": 0.01, "batch_size": 32}
    accuracy = retrain(config, data=digits, model_spec=ModelSpec(), epochs=6, seed=3, num_threads=1)
    assert 0.85 < accuracy <= 1
    assert retrain(config, data=digits, model_spec=ModelSpec(), epochs=6, seed=3, num_threads=1) == accuracy
    with pytest.raises(AssertionError):  # the trials' data has no test split
        retrain(config, data=digits.for_trials(), model_spec=ModelSpec(), epochs=6, seed=3)


def test_stop_after_keeps_the_schedule_of_the_planned_epochs(digits) -> None:
    reports: list[dict] = []
    seen_lr: list[float] = []

    def report(metrics: dict, state: dict | None) -> None:
        reports.append(metrics)
        seen_lr.append(state["optimizer"]["param_groups"][0]["lr"])

    train({"epochs": 8, "learning_rate": 0.01, "lr_schedule": "cosine"}, data=digits.for_trials(),
          model_spec=ModelSpec(), report=report, num_threads=1, stop_after=3, validate_every_epoch=False)
    assert [m["epoch"] for m in reports] == [1, 2, 3]
    # Cosine over 8 epochs, not 3: epoch 3's learning rate is 0.01 * (1 + cos(pi * 2 / 8)) / 2.
    assert seen_lr[-1] == pytest.approx(0.01 * (1 + math.cos(math.pi * 2 / 8)) / 2)
    assert math.isnan(reports[0]["val_accuracy"]) and 0 < reports[-1]["val_accuracy"] <= 1  # scored at the end only


@pytest.mark.slow
def test_search_retrains_its_best_and_reports_it_everywhere(ray_runtime, tmp_path: Path) -> None:
    points = [{"learning_rate": 0.02, "num_hidden_layers": 1, "neurons_per_layer": 64},
              {"learning_rate": 0.001, "num_hidden_layers": 2, "neurons_per_layer": 16}]
    job = small_job(tmp_path, search={"num_samples": 3, "enqueue": points, "final": {"seeds": 2}})
    path = write_job(tmp_path / "job.yaml", job)
    result = CliRunner().invoke(cli, ["run", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "t"

    # The enqueued points are trials of the search: 3 in all, the first two exactly the points.
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == 3
    chosen = [{k: t[k] for k in points[0]} for t in trials]
    assert all(p in chosen for p in points)

    best = yaml.safe_load((out / "best.yaml").read_text())
    final = best["retrained"]
    assert final["trial_id"] == best["trial_id"] and final["epochs"] == best["epoch"]
    assert final["seeds"] == [1000, 1001] and len(final["test_accuracy"]) == 2
    assert all(0.5 < a <= 1 for a in final["test_accuracy"])
    assert final["mean"] == pytest.approx(sum(final["test_accuracy"]) / 2, abs=1e-6)
    assert final["std"] == pytest.approx(abs(final["test_accuracy"][0] - final["test_accuracy"][1]) / math.sqrt(2),
                                         abs=1e-6)
    assert final["train_samples"] > 1000  # digits: train + validation (1438 of the 1797 images)
    assert 0.5 < best["test_accuracy"] <= 1  # the search checkpoint's own score stays beside it
    assert "retrained on train + validation: test_accuracy" in result.output

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.metrics["retrained_test_accuracy_mean"] == pytest.approx(final["mean"])
    assert parent.data.metrics["retrained_test_accuracy_std"] == pytest.approx(final["std"])
    history = client.get_metric_history(parent.info.run_id, "retrained_test_accuracy")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(final["test_accuracy"])
    assert parent.data.params["retrained.seeds"] == "1000,1001"

    shown = CliRunner().invoke(cli, ["best", str(out)])
    assert "retrained on train + validation: test_accuracy" in shown.output and "2 seeds" in shown.output

    # Resuming the finished search keeps its retraining (nothing is trained again).
    resumed = CliRunner().invoke(cli, ["resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "kept the retraining" in resumed.output
    assert yaml.safe_load((out / "best.yaml").read_text())["retrained"] == final


@pytest.mark.slow
def test_final_seeds_zero_turns_the_retraining_off(ray_runtime, tmp_path: Path) -> None:
    job = small_job(tmp_path, search={"num_samples": 2, "final": {"seeds": 0}})
    result = CliRunner().invoke(cli, ["run", str(write_job(tmp_path / "job.yaml", job))])
    assert result.exit_code == 0, result.output
    best = yaml.safe_load((tmp_path / "runs" / "t" / "best.yaml").read_text())
    assert "retrained" not in best and 0.5 < best["test_accuracy"] <= 1
    assert "retrained" not in result.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags)
    assert "retrained_test_accuracy_mean" not in parent.data.metrics and "test_accuracy" in parent.data.metrics


@pytest.mark.slow
def test_sigterm_during_the_final_retraining_keeps_the_search_and_resume_retrains(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    job = small_job(tmp_path, search={"num_samples": 2, "final": {"seeds": 2}})
    job["space"].update(epochs=25, batch_size=8)  # a retraining of some seconds
    path = write_job(tmp_path / "job.yaml", job)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch.cli", "run", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("final: retraining"):
                os.kill(proc.pid, signal.SIGTERM)
                break
        output = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = tmp_path / "runs" / "t"
    assert proc.returncode == 130, output
    assert "interrupted during the final retraining" in output and f"hpsearch resume {out}" in output
    # Nothing of the search is lost: its trials are written; only the retraining is missing.
    assert len(pq.read_table(out / "trials.parquet")) == 2
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "retrained" not in best and best["test_accuracy"] > 0.5

    resumed = subprocess.run([sys.executable, "-m", "hpsearch.cli", "resume", str(out)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert len(yaml.safe_load((out / "best.yaml").read_text())["retrained"]["test_accuracy"]) == 2
    assert len(pq.read_table(out / "trials.parquet")) == 2  # no trial ran again


def _asha_decisions(scheduler, trials: list[tuple[dict, int, float]]) -> list[str]:
    """What ``scheduler`` decides for each (config, epoch, val_accuracy), given in that order."""
    from ray.tune.experiment import Trial

    made = [Trial("__fake", config=config, stub=True, trial_id=f"t{i}") for i, (config, _, _) in enumerate(trials)]
    for t in made:
        scheduler.on_trial_add(None, t)
    return [scheduler.on_trial_result(None, t, {"epoch": epoch, "val_accuracy": value})
            for t, (_, epoch, value) in zip(made, trials)]


ASHA_KWARGS = {"time_attr": "epoch", "metric": "val_accuracy", "mode": "max", "max_t": 50, "grace_period": 2,
               "reduction_factor": 3}


def test_asha_compares_trials_at_the_same_point_of_their_schedules() -> None:
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from hpsearch.tune.scheduler import ASHAByPhase

    stop, go = TrialScheduler.STOP, TrialScheduler.CONTINUE
    # At epoch 6 two 10-epoch trials have halved their learning rates, a 50-epoch one has not:
    # the long one is lowest there. Stock ASHA cuts it; by phase it has no peer yet, and goes on.
    at_6 = [({"epochs": 10}, 6, 0.86), ({"epochs": 10}, 6, 0.87), ({"epochs": 50}, 6, 0.84)]
    assert _asha_decisions(ASHAScheduler(**ASHA_KWARGS), at_6) == [go, go, stop]
    assert _asha_decisions(ASHAByPhase(**ASHA_KWARGS), at_6) == [go, go, go]
    # A second 50-epoch trial below the first is its peer's: cut.
    assert _asha_decisions(ASHAByPhase(**ASHA_KWARGS), [*at_6, ({"epochs": 50}, 6, 0.83)])[-1] == stop
    # At epoch 2 every trial is near its base rate: the first of its length is compared with the
    # others (the rule it replaced, a set of rungs per length, ran it to its end).
    at_2 = [({"epochs": 10}, 2, 0.86), ({"epochs": 20}, 2, 0.87), ({"epochs": 50}, 2, 0.84)]
    assert _asha_decisions(ASHAByPhase(**ASHA_KWARGS), at_2) == [go, go, stop]
    # With a constant learning rate the planned length changes nothing before the end: stock ASHA.
    constant = [({"epochs": e, "lr_schedule": "constant"}, 6, v) for e, v in ((10, 0.86), (10, 0.87), (50, 0.84))]
    assert _asha_decisions(ASHAByPhase(**ASHA_KWARGS), constant) == [go, go, stop]
    # Trials that all plan as many epochs (jobs/fashion_mnist.yaml) are all peers: stock ASHA.
    same = [({"epochs": 30}, 6, v) for v in (0.86, 0.88, 0.87, 0.85, 0.89)]
    assert _asha_decisions(ASHAByPhase(**ASHA_KWARGS), same) == _asha_decisions(ASHAScheduler(**ASHA_KWARGS), same) \
        == [go, go, stop, stop, go]


def test_asha_by_phase_keeps_ray_s_rungs_and_minimizes_a_loss() -> None:
    from ray.tune.schedulers import TrialScheduler

    from hpsearch.plan import asha_rungs
    from hpsearch.tune.scheduler import ASHAByPhase

    for grace, rf, max_t in ((1, 3, 27), (2, 3, 50), (3, 2, 30), (1, 4, 100)):
        sched = ASHAByPhase(time_attr="epoch", metric="val_loss", mode="min", max_t=max_t, grace_period=grace,
                            reduction_factor=rf)
        assert sorted(m for m, _ in sched._rungs.rungs) == asha_rungs(grace_period=grace, reduction_factor=rf,
                                                                      max_t=max_t)
    loss = ASHAByPhase(**{**ASHA_KWARGS, "metric": "val_loss", "mode": "min"})
    from ray.tune.experiment import Trial

    trials = [Trial("__fake", config={"epochs": 20}, stub=True, trial_id=f"t{i}") for i in range(3)]
    for t in trials:
        loss.on_trial_add(None, t)
    decided = [loss.on_trial_result(None, t, {"epoch": 2, "val_loss": v}) for t, v in zip(trials, (0.5, 0.4, 0.6))]
    assert decided == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.STOP]
    # A diverged trial (NaN) is no peer: it neither stops nor is recorded.
    nan_trial = Trial("__fake", config={"epochs": 20}, stub=True, trial_id="nan")
    loss.on_trial_add(None, nan_trial)
    assert loss.on_trial_result(None, nan_trial, {"epoch": 2, "val_loss": float("nan")}) == TrialScheduler.CONTINUE
    assert "nan" not in dict(loss._rungs.rungs)[2]


def test_a_search_started_under_the_rule_by_length_resumes_under_the_rule_by_phase() -> None:
    """tuner.pkl of a search started before holds an ASHAByLength with its own state: it unpickles."""
    import pickle

    from ray.tune.schedulers import TrialScheduler

    from hpsearch.tune.scheduler import ASHAByPhase

    old = ASHAByPhase(**ASHA_KWARGS)
    state = {k: v for k, v in old.__dict__.items() if k != "_rungs"}
    state["_by_length"] = {}  # what the rule by length kept, none recorded when Tune pickled it
    old.__dict__.clear()
    old.__dict__.update(state)
    raw = pickle.dumps(old, protocol=2).replace(b"ASHAByPhase", b"ASHAByLength")
    assert b"ASHAByLength" in raw and "_rungs" not in state
    restored = pickle.loads(raw)
    assert isinstance(restored, ASHAByPhase) and not hasattr(restored, "_by_length")
    stop, go = TrialScheduler.STOP, TrialScheduler.CONTINUE
    at_2 = [({"epochs": 10}, 2, 0.86), ({"epochs": 20}, 2, 0.87), ({"epochs": 50}, 2, 0.84)]
    assert _asha_decisions(restored, at_2) == [go, go, stop]

"""Job files: valid ones load, every kind of broken one is refused with its field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from support import REPO, small_job, write_job

from hpsearch.cli import cli
from hpsearch.errors import JobError
from hpsearch.spec import CategoricalParam, FixedParam, FloatParam, IntParam, load_job, validate


def test_design_job_files_validate() -> None:
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        job = load_job(path)
        assert validate(job.to_dict()) == job, f"{path} does not round-trip through job.yaml"


def test_mnist_job_is_the_classic_space() -> None:
    job = load_job(REPO / "jobs" / "mnist.yaml")
    space = dict(job.space)
    assert space["num_hidden_layers"] == IntParam(1, 5)
    assert space["neurons_per_layer"] == IntParam(80, 128, step=8)
    assert space["epochs"] == IntParam(10, 50, step=10)
    assert space["learning_rate"] == FloatParam(1e-5, 1e-1, log=True)
    assert space["dropout_rate"] == FloatParam(0.1, 0.5, step=0.1)
    assert space["batch_size"] == CategoricalParam((16, 32, 64, 128))
    assert space["optimizer"] == CategoricalParam(("Adam", "SGD"))
    assert job.search.scheduler.max_t == 50 and job.search.searcher.sampler == "tpe"


def test_yaml11_exponent_strings_are_numbers(tmp_path: Path) -> None:
    # PyYAML reads 1e-5 (no dot) as the string "1e-5"; users mean the number.
    text = (REPO / "jobs" / "mnist.yaml").read_text().replace("1.0e-5", "1e-5").replace("1.0e-1", "1e-1")
    assert "low: 1e-5" in text
    job = load_job(write_job_text(tmp_path, text))
    assert dict(job.space)["learning_rate"] == FloatParam(1e-5, 1e-1, log=True)


def write_job_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_fixed_scalars_defaults_and_overrides(tmp_path: Path) -> None:
    path = write_job(tmp_path / "j.yaml", small_job(tmp_path))
    job = load_job(path, ["search.num_samples=7", "space.batch_size=32", "resources.cpu=2"])
    assert job.search.num_samples == 7
    assert dict(job.space)["batch_size"] == FixedParam(32)
    assert job.resources.cpu == 2
    assert job.max_epochs() == 3 and job.experiment == "t"


# Each case: (a change to a valid job, the field path the message must name, a word of the rule).
BAD_JOBS = {
    "unknown key": ({"serach": {"num_samples": 3}}, "serach", "did you mean 'search'"),
    "unknown nested key": ({"search": {"num_sample": 3}}, "search.num_sample", "unknown key"),
    "low > high": ({"space": {"epochs": {"type": "int", "low": 5, "high": 2}}}, "space.epochs", "low <= high"),
    "log with low 0": ({"space": {"learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}},
                       "space.learning_rate.low", "> 0"),
    "empty choices": ({"space": {"batch_size": {"type": "categorical", "choices": []}}},
                      "space.batch_size.choices", "non-empty"),
    "dropout 1": ({"space": {"dropout_rate": {"type": "float", "low": 0.1, "high": 1.0}}},
                  "space.dropout_rate.high", "[0, 1)"),
    "batch size 0": ({"space": {"batch_size": 0}}, "space.batch_size", ">= 1"),
    "unknown hyperparameter": ({"space": {"learnin_rate": 0.1}}, "space.learnin_rate", "unknown hyperparameter"),
    "unknown dataset": ({"data": {"dataset": "imagenet"}}, "data.dataset", "mnist, fashion_mnist, digits"),
    "unknown model": ({"model": {"kind": "transformer"}}, "model.kind", "mlp"),
    "unknown sampler": ({"search": {"searcher": {"name": "optuna", "sampler": "bohb"}}},
                        "search.searcher.sampler", "tpe"),
    "unknown scheduler": ({"search": {"scheduler": {"name": "pbt"}}}, "search.scheduler.name", "asha"),
    "unknown metric": ({"search": {"metric": "accuracy"}}, "search.metric", "val_accuracy"),
    "metric/mode mismatch": ({"search": {"metric": "val_loss", "mode": "max"}}, "search.mode", "mode: min"),
    "grace period > max_t": ({"search": {"scheduler": {"name": "asha", "max_t": 3, "grace_period": 5}}},
                             "search.scheduler.grace_period", "max_t"),
    "reduction factor 1": ({"search": {"scheduler": {"name": "asha", "reduction_factor": 1}}},
                           "search.scheduler.reduction_factor", ">= 2"),
    "num_samples 0": ({"search": {"num_samples": 0}}, "search.num_samples", ">= 1"),
    "int range on a float": ({"space": {"optimizer": {"type": "int", "low": 1, "high": 2}}},
                             "space.optimizer.type", "categorical"),
    "unknown optimizer": ({"space": {"optimizer": "LBFGS"}}, "space.optimizer", "Adam"),
    "grid without step": ({"search": {"searcher": {"sampler": "grid"}}}, "space.learning_rate", "step"),
    "cnn hyperparameter on an mlp": ({"space": {"conv_blocks": 2}}, "space.conv_blocks", "model.kind cnn only"),
    "even kernel size": ({"model": {"kind": "cnn"}, "space": {"kernel_size": 4}}, "space.kernel_size", "odd"),
    "weights on a cnn": ({"model": {"kind": "cnn", "weights": "IMAGENET1K_V1"}}, "model.weights", "resnet18 only"),
    "unknown weights": ({"model": {"kind": "resnet18", "weights": "IMAGENET"}}, "model.weights", "IMAGENET1K_V1"),
    "trainable stages 6": ({"model": {"kind": "resnet18"}, "space": {"trainable_stages": 6}},
                           "space.trainable_stages", "0 to 5"),
    "stream on digits": ({"data": {"dataset": "digits", "loader": "stream"}}, "data.loader", "image_folder only"),
    "augment typo": ({"data": {"dataset": "digits", "augment": {"flip": True}}}, "data.augment.flip",
                     "horizontal_flip"),
    "enqueue typo": ({"search": {"enqueue": [{"learnin_rate": 0.01}]}}, "search.enqueue[0].learnin_rate",
                     "did you mean 'learning_rate'"),
    "enqueue outside the range": ({"search": {"enqueue": [{"learning_rate": 0.5}]}},
                                  "search.enqueue[0].learning_rate", "from 0.001 to 0.03"),
    "enqueue off the step": ({"search": {"enqueue": [{"neurons_per_layer": 20}]}},
                             "search.enqueue[0].neurons_per_layer", "in steps of 16"),
    "enqueue a fixed value": ({"search": {"enqueue": [{"epochs": 5}]}}, "search.enqueue[0].epochs", "is fixed"),
    "enqueue more than num_samples": ({"search": {"num_samples": 1, "enqueue": [{}, {}]}}, "search.enqueue",
                                      "num_samples is 1"),
    "enqueue not a list": ({"search": {"enqueue": 5}}, "search.enqueue", "defaults, none, or a list"),
    "final seeds negative": ({"search": {"final": {"seeds": -1}}}, "search.final.seeds", "0 to 100"),
    "final typo": ({"search": {"final": {"seed": 2}}}, "search.final.seed", "did you mean 'seeds'"),
    "nothing to search, several trials": ({"space": {"num_hidden_layers": 1, "neurons_per_layer": 32,
                                                     "learning_rate": 0.01}, "search": {"num_samples": 4}},
                                          "search.num_samples", "use num_samples: 1"),
    "step that does not divide the range": ({"space": {"neurons_per_layer": {"type": "int", "low": 16, "high": 100,
                                                                             "step": 16}}},
                                            "space.neurons_per_layer.step", "multiple of step"),
    "step with log": ({"space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "step": 0.01,
                                                   "log": True}}}, "space.learning_rate", "cannot be combined"),
    "duplicate choices": ({"space": {"batch_size": {"type": "categorical", "choices": [32, 32]}}},
                          "space.batch_size.choices", "duplicates"),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_bad_job_is_refused_naming_the_field(case: str, tmp_path: Path) -> None:
    change, field, rule = BAD_JOBS[case]
    job = small_job(tmp_path)
    for key, value in change.items():
        job[key] = {**job[key], **value} if isinstance(job.get(key), dict) else value
    path = write_job(tmp_path / "bad.yaml", job)
    for command in (["validate", str(path)], ["run", str(path)]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, (case, command, result.output)
        assert f"{field}:" in result.output and rule in result.output, result.output
        assert "Traceback" not in result.output
    # Nothing was written: no search folder, no MLflow store.
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    job = small_job(tmp_path, data={"dataset": "imagenet"}, search={"metric": "acc", "num_samples": -1})
    job["space"]["epochs"] = {"type": "int", "low": 9, "high": 1}
    with pytest.raises(JobError) as e:
        load_job(write_job(tmp_path / "bad.yaml", job))
    fields = {p.split(":")[0] for p in e.value.problems}
    assert {"data.dataset", "search.metric", "search.num_samples", "space.epochs"} <= fields


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nspace:\n  epochs: {type: int, low: 1\n")
    result = CliRunner().invoke(cli, ["run", str(path)])
    assert result.exit_code == 2 and "not valid YAML at line" in result.output and str(path) in result.output
    assert "Traceback" not in result.output


def test_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml: 1 problem" in result.output and "file not found" in result.output


def test_bad_override_is_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path / "j.yaml", small_job(tmp_path))
    result = CliRunner().invoke(cli, ["validate", str(path), "--set", "search.num_samples"])
    assert result.exit_code == 2 and "dotted.key=value" in result.output


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--debug", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code != 0 and isinstance(result.exception, JobError)

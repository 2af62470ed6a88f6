"""The user's own model and data (``model.kind: python``, ``data.dataset: python``): real Ray,
Optuna, MLflow and Parquet, with code the tests write as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from support import assert_nothing_left, cli_run, snapshot_trials, user_job, write_job, write_user_code

# --------------------------------------------------------------------------------------------
# Validation: found without being run, every problem named.
# --------------------------------------------------------------------------------------------


def test_a_misspelt_factory_hyperparameter_is_refused_at_validate(tmp_path: Path) -> None:
    write_user_code(tmp_path, "ep_typo")
    job = user_job(tmp_path, "ep_typo")
    job["space"]["widht"] = job["space"].pop("width")
    result = cli_run("validate", write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 2, result.output
    assert "space.widht: unknown hyperparameter" in result.output and "did you mean 'width'?" in result.output
    assert "Traceback" not in result.output


def test_validate_finds_the_module_without_running_it_and_without_torch(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    write_user_code(tmp_path, "ep_quiet", f"open({str(marker)!r}, 'w').close()\n")
    path = write_job(tmp_path / "job.yaml", user_job(tmp_path, "ep_quiet"))
    probe = ("import sys; from hpsearch.cli import cli; "
             "sys.argv = ['hpsearch', 'validate', sys.argv[1]]\n"
             "try:\n    cli()\nexcept SystemExit as e:\n    print('torch' in sys.modules, e.code)")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, cwd=tmp_path / "..")
    assert done.stdout.strip().endswith("False 0"), done.stdout + done.stderr
    assert f"code:\n- {tmp_path}" in done.stdout  # the job file's folder is where its code is found
    assert not marker.exists()

    result = cli_run("validate", path, "--import")
    assert result.exit_code == 0, result.output
    assert marker.exists()  # --import imports it


def test_a_module_that_does_not_exist_is_refused_at_validate(tmp_path: Path) -> None:
    job = user_job(tmp_path, "ep_nowhere")
    result = cli_run("validate", write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 2
    assert "model.factory: no module named 'ep_nowhere'" in result.output
    assert "data.factory: no module named 'ep_nowhere'" in result.output


def test_code_folders_are_read_relative_to_the_job_file(tmp_path: Path) -> None:
    write_user_code(tmp_path / "src", "ep_elsewhere")
    job = user_job(tmp_path, "ep_elsewhere", code="src")
    result = cli_run("validate", write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0, result.output
    assert f"- {tmp_path / 'src'}" in result.output
    job["code"] = ["src", "missing"]
    result = cli_run("validate", write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 2 and f"code[1]: {tmp_path / 'missing'} is not a folder" in result.output


# --------------------------------------------------------------------------------------------
# Bad entry points and bad data: exit 2 before any trial, named, nothing left behind.
# --------------------------------------------------------------------------------------------

BAD = {
    "module raises on import": ("raise ValueError('no config here')\n", {},
                                ["importing ep_bad_0 failed: no config here", "Traceback (your code)", "ep_bad_0.py\", line"]),
    "no such function": ("", {"model": {"factory": "ep_bad_1:buidl"}}, ["has no 'buidl'", "build"]),
    "not callable": ("width = 3\n", {"model": {"factory": "ep_bad_2:width"}}, ["is a int, not a function"]),
    "factory raises": ("def build(hp, input_shape, num_classes):\n    return helper(hp)\n\n"
                       "def helper(hp):\n    raise KeyError('widht')\n", {},
                       ["model.factory: ep_bad_3:build raised KeyError: 'widht'", "Traceback (your code)",
                        "in helper"]),
    "returns no module": ("def build(hp, input_shape, num_classes):\n    return {'layers': 3}\n", {},
                          ["returned a dict; it must return a torch.nn.Module"]),
    "wrong output shape": ("def build(hp, input_shape, num_classes):\n    return nn.Linear(64, 3)\n", {},
                           ["must return one score per class, (batch, 10)", "it returned (2, 3)"]),
    "model fails on the data": ("def build(hp, input_shape, num_classes):\n    return nn.Linear(10, num_classes)\n",
                                {}, ["its model fails on a batch of shape (2, 64)", "mat1 and mat2"]),
    "data returns a list": ("def load(scale=1.0):\n    return [1, 2, 3]\n", {}, ["returned a list; return a mapping"]),
    "labels out of range": ("_load = load\ndef load(scale=1.0):\n    d = _load()\n    d['num_classes'] = 5\n"
                            "    return d\n", {}, ["not one of 0..4 (num_classes 5)"]),
    "lengths differ": ("_load = load\ndef load(scale=1.0):\n    x, y = _load()['train']\n"
                       "    return {'train': (x, y[:-1])}\n", {}, ["1797 inputs but 1796 labels"]),
    "NaN inputs": ("_load = load\ndef load(scale=1.0):\n    x, y = _load()['train']\n    x[3, 5] = float('nan')\n"
                   "    return {'train': (x, y)}\n", {}, ["train inputs: sample 3 holds nan"]),
    "empty split": ("_load = load\ndef load(scale=1.0):\n    x, y = _load()['train']\n"
                    "    return {'train': (x, y), 'test': (x[:0], y[:0])}\n", {}, ["the test split is empty"]),
    "fractional labels": ("_load = load\ndef load(scale=1.0):\n    x, y = _load()['train']\n"
                          "    return {'train': (x, y + 0.5)}\n", {}, ["label 0 is 0.5; labels are class indices"]),
    "options it does not take": ("", {"data": {"options": {"sacle": 2}}},
                                 ["data.factory: ep_bad_13:load raised TypeError", "sacle"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_entry_point_or_bad_data_exits_2_and_leaves_nothing(ray_runtime, tmp_path: Path, case: str) -> None:
    module = f"ep_bad_{list(BAD).index(case)}"
    code, sections, expected = BAD[case]
    write_user_code(tmp_path, module, code)
    job = user_job(tmp_path, module)
    for key, value in sections.items():
        job[key] = {**job[key], **value}
    result = cli_run("run", write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.output, result.output
    assert "Traceback (most recent call last)" not in result.output
    assert "hpsearch/" not in result.output.split("Traceback (your code)")[-1]  # their frames, not ours
    assert_nothing_left(tmp_path)


# --------------------------------------------------------------------------------------------
# A whole search of the user's model on the user's data, killed and resumed.
# --------------------------------------------------------------------------------------------


def _events(out: Path) -> list[dict]:
    log = out / "hpsearch_trials.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip().endswith("}")]


def test_own_model_and_data_search_end_to_end_with_sigkill_and_resume(tmp_path: Path) -> None:
    write_user_code(tmp_path / "code", "ep_whole")
    job = user_job(tmp_path, "ep_whole", code="code", search={"num_samples": 4, "max_concurrent_trials": 2,
                                                             "final": {"seeds": 1}})
    job["space"].update(epochs=8, batch_size=8, act="tanh")
    path = write_job(tmp_path / "job.yaml", job)
    out = tmp_path / "runs" / "t"
    elsewhere = tmp_path / "elsewhere"  # the command runs from another folder: the job says where its code is
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch.cli", "run", str(path)], cwd=elsewhere, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        known: set[str] = set()  # trials at epoch 3 that Tune's snapshot names: they continue (see snapshot_trials)
        while not known:
            known = {e["trial_id"] for e in _events(out) if e["event"] == "result" and e["epoch"] >= 3}
            known &= snapshot_trials(out)
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = _events(out)
    n_before = len(before)
    ended_before = {e["trial_id"] for e in before if e["event"] == "end"}
    cut = known - ended_before

    resumed = subprocess.run([sys.executable, "-m", "hpsearch.cli", "resume", str(out)], cwd=elsewhere,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = _events(out)[n_before:]
    assert cut and not {e["trial_id"] for e in after if e["event"] == "start"} & ended_before
    for tid in cut:  # continued from its checkpoint, in the user's model
        assert min(e["epoch"] for e in after if e["event"] == "result" and e["trial_id"] == tid) > 1

    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == 4 and {t["status"] for t in trials} <= {"completed", "stopped_early"}
    assert all(8 <= t["width"] <= 64 and t["depth"] in (1, 2) and t["act"] == "tanh" for t in trials)
    assert "num_hidden_layers" not in trials[0]  # the built-in model's hyperparameters are not this model's
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert 0.85 < best["test_accuracy"] <= 1  # digits: ~0.96; under 0.6 when trials corrupted the shared data
    assert {"width", "depth", "act", "learning_rate"} <= set(best["hyperparameters"])
    assert len(best["retrained"]["test_accuracy"]) == 1

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4
    by_trial = {t["trial_id"]: t for t in trials}
    for run in children:
        trial = by_trial[run.data.tags["hpsearch.trial_id"]]
        assert run.data.params["width"] == str(trial["width"]) and run.data.params["act"] == "tanh"
    # Where its code was found, kept for a resume from anywhere: the job's folder, its code, the working directory.
    assert yaml.safe_load((out / "job.yaml").read_text())["code"] == [str(tmp_path), str(tmp_path / "code"),
                                                                      str(elsewhere)]


def test_a_factory_s_torch_datasets_are_streamed_to_the_trials(ray_runtime, tmp_path: Path) -> None:
    write_user_code(tmp_path, "ep_stream", '''
import torch
from torch.utils.data import Dataset


class Digits(Dataset):
    """Digits as (1, 8, 8) uint8 images, read one at a time."""

    def __init__(self, part):
        from sklearn.datasets import load_digits

        d = load_digits()
        keep = slice(0, 1400) if part == "train" else slice(1400, None)
        self.x, self.y = d.images[keep].astype("uint8"), d.target[keep]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i][None].copy()), int(self.y[i])


def load(scale=1.0):
    return {"train": Digits("train"), "test": Digits("test"), "num_classes": 10}
''')
    job = user_job(tmp_path, "ep_stream", search={"num_samples": 2, "final": {"seeds": 1}},
                   data={"num_workers": 0})
    result = cli_run("run", write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0, result.output
    assert "read by a DataLoader" in result.output
    best = yaml.safe_load((tmp_path / "runs" / "t" / "best.yaml").read_text())
    assert 0.3 < best["test_accuracy"] <= 1 and best["retrained"]["train_samples"] == 1400


def test_every_trial_trains_on_the_factory_s_data_as_given(ray_runtime, tmp_path: Path) -> None:
    """float32 arrays reach the trials through Ray's shared object store: a trial that normalised
    them in place changed them for every trial after it. Each trial must train as the same
    configuration does in this process, from a fresh copy of the data."""
    from hpsearch import data as hp_data
    from hpsearch.spec import load_job
    from hpsearch.trainable import train

    write_user_code(tmp_path, "ep_float")  # digits as float32 features in 0..16: normalising them matters
    job = user_job(tmp_path, "ep_float", search={"num_samples": 4, "max_concurrent_trials": 2})
    result, out = cli_run("run", write_job(tmp_path / "job.yaml", job)), tmp_path / "runs" / "t"
    assert result.exit_code == 0, result.output

    spec = load_job(out / "job.yaml")
    dataset = hp_data.load(spec.data, seed=spec.seed, code=spec.code)
    assert dataset.train.x.dtype.name == "float32"
    epochs = pq.read_table(out / "epochs.parquet").to_pylist()
    for trial in pq.read_table(out / "trials.parquet").to_pylist():
        config = {k: trial[k] for k in ("width", "depth", "learning_rate", "epochs", "batch_size")}
        here: list[dict] = []
        train(config, data=dataset, model_spec=spec.model, seed=spec.seed, num_threads=1,
              report=lambda metrics, state: here.append(metrics))
        there = sorted((e for e in epochs if e["trial_id"] == trial["trial_id"]), key=lambda e: e["epoch"])
        assert [e["train_loss"] for e in there] == pytest.approx([m["train_loss"] for m in here], rel=1e-4), config
        assert [e["val_accuracy"] for e in there] == pytest.approx([m["val_accuracy"] for m in here], abs=1e-6)
    assert max(e["val_accuracy"] for e in epochs) > 0.8  # digits, normalised once: an easy 90%


# --------------------------------------------------------------------------------------------
# The examples, as the README runs them (with a tiny budget).
# --------------------------------------------------------------------------------------------


def test_the_tabular_example_runs_as_written(ray_runtime, tmp_path: Path) -> None:
    from support import REPO

    result = cli_run("run", REPO / "examples" / "tabular" / "job.yaml", "--set", "search.num_samples=2",
                     "--set", "space.epochs=3", "--set", "search.scheduler.grace_period=1", "--set", f"storage={tmp_path / 'runs'}",
                     "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", "search.final.seeds=1")
    assert result.exit_code == 0, result.output
    best = yaml.safe_load((tmp_path / "runs" / "breast-cancer-mlp" / "best.yaml").read_text())
    assert best["metric"] == "val_loss" and 0.6 < best["test_accuracy"] <= 1


def test_the_residual_cnn_example_runs_as_written(ray_runtime, tmp_path: Path) -> None:
    from support import REPO, write_idx

    write_idx(tmp_path / "fmnist", n_train=200, n_test=50)
    result = cli_run("run", REPO / "examples" / "residual_cnn" / "job.yaml", "--set", "search.num_samples=2",
                     "--set", "space.epochs=2", "--set", f"data.root={tmp_path / 'fmnist'}", "--set", "data.download=false",
                     "--set", f"storage={tmp_path / 'runs'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.exit_code == 0, result.output
    trials = pq.read_table(tmp_path / "runs" / "fashion-residual" / "trials.parquet").to_pylist()
    assert len(trials) == 2 and {"channels", "stages", "blocks", "dropout"} <= set(trials[0])
    defaults = {"channels": 16, "stages": 2, "blocks": 1, "dropout": 0.1}  # the first trial: the declared defaults
    assert any(all(t[k] == v for k, v in defaults.items()) for t in trials), trials


def test_submit_refuses_code_that_would_not_reach_the_cluster(tmp_path: Path) -> None:
    write_user_code(tmp_path / "outside", "ep_submit")
    (tmp_path / "project").mkdir()
    path = write_job(tmp_path / "project" / "job.yaml", user_job(tmp_path, "ep_submit", code="../outside"))
    result = cli_run("submit", path, "--address", "http://127.0.0.1:8265", "--working-dir", tmp_path / "project")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"code: {tmp_path / 'outside'} is outside the working directory {tmp_path / 'project'}" in result.output

"""End to end through `hpsearch run`: real Ray Tune, Optuna, MLflow (SQLite) and Parquet, small data."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml
from support import cli_run, run_job, small_job, write_cifar10, write_idx, write_image_folder, write_job
from mlflow.tracking import MlflowClient

from hpsearch.hyperparameters import hyperparameter_names
from hpsearch.spec import load_job
from hpsearch.tune.runtime import trial_slots

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("resources", "cpu", "gpu", "slots"), [
    ({"CPU": 2.0}, 1, 0, 2),
    ({"CPU": 16.0, "GPU": 1.0}, 1, 0.25, 4),  # the GPU decides: four trials per GPU
    ({"CPU": 16.0, "GPU": 8.0}, 1, 0.25, 16),  # the CPUs decide
    ({"CPU": 16.0, "GPU": 0.7}, 1, 0.1, 7),  # 0.7 / 0.1 is 6.999... in floating point: still 7
    ({"CPU": 1.0}, 4, 0, 1),  # too small for even one: Tune reports that, the limit stays 1
])
def test_trial_slots(resources: dict, cpu: float, gpu: float, slots: int) -> None:
    assert trial_slots(resources, cpu=cpu, gpu=gpu) == slots


@pytest.fixture(scope="module")
def digits_search(ray_runtime, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One 4-trial digits search under ASHA, with MLflow on SQLite: the tests below read its outputs."""
    tmp_path = tmp_path_factory.mktemp("digits")
    job = small_job(tmp_path, search={"num_samples": 4,
                                      "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}})
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    return SimpleNamespace(
        tmp_path=tmp_path, out=out, output=result.output, client=client,
        trials=pq.read_table(out / "trials.parquet").to_pylist(),
        epochs=pq.read_table(out / "epochs.parquet").to_pylist(),
        best=yaml.safe_load((out / "best.yaml").read_text()),
        parents=[r for r in runs if "mlflow.parentRunId" not in r.data.tags],
        children=[r for r in runs if "mlflow.parentRunId" in r.data.tags],
    )


def test_digits_search_prints_every_trial_and_the_best(digits_search) -> None:
    assert "[4/4] trial" in digits_search.output and "best: trial" in digits_search.output
    # The test runtime has 2 CPUs: both 1-CPU trial slots are asked for at once, not one by one.
    assert "1 cpu + 0 gpu per trial, 2 at a time" in digits_search.output


def test_trials_table_has_every_trial_and_hyperparameter(digits_search) -> None:
    trials = digits_search.trials
    assert len(trials) == 4
    assert set(hyperparameter_names("mlp")) <= set(trials[0])  # every hyperparameter it used, defaults included
    assert "conv_blocks" not in trials[0]  # ...and none the MLP does not use
    assert {t["status"] for t in trials} <= {"completed", "stopped early"}
    assert all(t["epochs_run"] >= 1 and 0 <= t["best_val_accuracy"] <= 1 for t in trials)


def test_epochs_table_has_every_epoch_of_every_trial(digits_search) -> None:
    trials, epochs = digits_search.trials, digits_search.epochs
    assert len(epochs) == sum(t["epochs_run"] for t in trials)
    assert {e["trial_id"] for e in epochs} == {t["trial_id"] for t in trials}


def test_best_yaml_is_the_best_trial_scored_on_the_test_set(digits_search) -> None:
    best, trials, out = digits_search.best, digits_search.trials, digits_search.out
    assert best["trial_id"] in {t["trial_id"] for t in trials}
    assert best["validation"]["val_accuracy"] == max(t["best_val_accuracy"] for t in trials)
    assert 0.5 < best["test_accuracy"] <= 1 and set(best["hyperparameters"]) == set(hyperparameter_names("mlp"))
    assert (out / "best_model.pt").is_file()
    resolved = load_job(digits_search.tmp_path / "job.yaml").to_dict()
    assert load_job(out / "job.yaml").to_dict() == resolved


def test_mlflow_has_one_parent_and_one_child_per_trial(digits_search) -> None:
    parents, children, trials = digits_search.parents, digits_search.children, digits_search.trials
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert {c.data.tags["hpsearch.trial_id"] for c in children} == {t["trial_id"] for t in trials}
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"


def test_mlflow_children_have_metrics_per_epoch_and_the_trials_status(digits_search) -> None:
    by_trial = {t["trial_id"]: t for t in digits_search.trials}
    for c in digits_search.children:
        trial = by_trial[c.data.tags["hpsearch.trial_id"]]
        history = digits_search.client.get_metric_history(c.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, trial["epochs_run"] + 1))
        assert "learning_rate" in c.data.params
        assert c.data.tags["hpsearch.status"] == trial["status"]


def test_mlflow_parent_has_the_best_and_the_outputs(digits_search) -> None:
    parent = digits_search.parents[0]
    assert parent.data.metrics["test_accuracy"] == pytest.approx(digits_search.best["test_accuracy"])
    assert parent.data.params["best.learning_rate"]
    artifacts = {a.path for a in digits_search.client.list_artifacts(parent.info.run_id)}
    assert {"job.yaml", "best.yaml", "trials.parquet", "best_model"} <= artifacts


def test_best_model_is_the_best_checkpoint_and_reproduces_its_test_accuracy(digits_search) -> None:
    import torch

    from hpsearch.data import load
    from hpsearch.trainable import score_test_set

    best, out = digits_search.best, digits_search.out
    job = load_job(out / "job.yaml")
    # best.yaml's epoch is the best epoch of the best trial (not its last), and its checkpoint holds it.
    epochs = [e for e in digits_search.epochs if e["trial_id"] == best["trial_id"]]
    assert best["epoch"] == max(epochs, key=lambda e: e["val_accuracy"])["epoch"]
    assert json.loads((Path(best["checkpoint"]) / "metrics.json").read_text())["epoch"] == best["epoch"]
    weights = torch.load(out / "best_model.pt", map_location="cpu", weights_only=True)
    data = load(job.data, seed=job.seed)
    accuracy = score_test_set({"model": weights}, best["hyperparameters"], data=data, model_spec=job.model)
    assert accuracy == pytest.approx(best["test_accuracy"], abs=1e-6)


def test_best_command_prints_the_best_trial(digits_search) -> None:
    shown = cli_run("best", digits_search.out)
    assert shown.exit_code == 0 and digits_search.best["trial_id"] in shown.output
    assert "learning_rate" in shown.output


def test_the_same_name_again_is_refused(digits_search) -> None:
    # Two searches never mix in one folder.
    again = cli_run("run", digits_search.tmp_path / "job.yaml")
    assert again.exit_code == 2 and "already holds a search" in again.output and "hpsearch resume" in again.output


def test_mnist_loader_from_idx_files_without_download(ray_runtime, tmp_path: Path) -> None:
    write_idx(tmp_path / "idx", n_train=400, n_test=200)
    job = small_job(tmp_path, data={"dataset": "mnist", "root": str(tmp_path / "idx"), "download": False},
                    search={"num_samples": 2})
    job["space"]["epochs"] = 4
    job["space"]["learning_rate"] = 0.01
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output
    assert len(pq.read_table(out / "trials.parquet")) == 2
    assert yaml.safe_load((out / "best.yaml").read_text())["test_accuracy"] > 0.5


def test_diverged_trial_is_recorded_and_never_best(ray_runtime, tmp_path: Path) -> None:
    job = small_job(tmp_path, search={"num_samples": 2, "searcher": {"sampler": "grid"}},
                    tracking={"enabled": False})
    job["space"] = {"learning_rate": {"type": "categorical", "choices": [1.0e12, 0.01]},
                    "optimizer": "SGD", "epochs": 3, "batch_size": 16}
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output
    trials = {t["learning_rate"]: t for t in pq.read_table(out / "trials.parquet").to_pylist()}
    assert trials[1.0e12]["status"] == "diverged" and trials[1.0e12]["epochs_run"] == 1
    assert trials[0.01]["status"] == "completed" and trials[0.01]["epochs_run"] == 3
    assert yaml.safe_load((out / "best.yaml").read_text())["hyperparameters"]["learning_rate"] == 0.01
    assert not (tmp_path / "mlflow.db").exists()  # tracking off: no store written


def _assert_every_output(tmp_path: Path, out: Path, *, trials: int) -> dict:
    kind = load_job(out / "job.yaml").model.kind
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == trials and all(r["status"] in ("completed", "stopped early") for r in rows)
    epochs = pq.read_table(out / "epochs.parquet").to_pylist()
    assert len(epochs) == sum(r["epochs_run"] for r in rows)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert 0 <= best["test_accuracy"] <= 1 and set(best["hyperparameters"]) == set(hyperparameter_names(kind))
    assert (out / "best_model.pt").is_file() and (out / "job.yaml").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == trials
    return best


def test_cnn_search_on_cifar10_with_augmentation(ray_runtime, tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar", per_batch=40)
    job = small_job(tmp_path, data={"dataset": "cifar10", "root": str(tmp_path / "cifar"), "download": False,
                                    "augment": {"crop_padding": 4, "horizontal_flip": True}},
                    model={"kind": "cnn"}, search={"num_samples": 2})
    job["space"] = {"conv_blocks": {"type": "int", "low": 1, "high": 2}, "conv_channels": 8, "kernel_size": 3,
                    "num_hidden_layers": 1, "neurons_per_layer": 32, "learning_rate": 0.003,
                    "lr_schedule": "cosine", "epochs": 2, "batch_size": 32}
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output
    best = _assert_every_output(tmp_path, out, trials=2)
    assert best["hyperparameters"]["conv_channels"] == 8
    assert load_job(out / "job.yaml").data.augment.crop_padding == 4


def test_resnet18_search_on_a_streamed_image_folder(ray_runtime, tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", per_class=12, size=(24, 18))
    job = small_job(tmp_path, data={"dataset": "image_folder", "root": str(tmp_path / "pets"), "image_size": 16,
                                    "loader": "stream", "num_workers": 1},
                    model={"kind": "resnet18", "weights": "none"}, search={"num_samples": 2})
    job["space"] = {"trainable_stages": {"type": "categorical", "choices": [2, 5]}, "backbone_lr_factor": 0.5,
                    "learning_rate": 0.01, "epochs": 1, "batch_size": 8, "image_size": 32}
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output
    best = _assert_every_output(tmp_path, out, trials=2)
    assert best["hyperparameters"]["trainable_stages"] in (2, 5)


def test_missing_pretrained_weights_stop_the_search_before_any_trial(ray_runtime, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing cached and a download refused at once (a proxy that is not there): the offline case.
    # The proxy's port is one this test holds bound and never listens on: refused, whatever else runs.
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed.getsockname()[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    job = small_job(tmp_path, model={"kind": "resnet18", "weights": "IMAGENET1K_V1"}, search={"num_samples": 1})
    job["space"] = {"learning_rate": 0.01, "epochs": 1}
    try:
        result, out = run_job(tmp_path, job)
    finally:
        closed.close()
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "model.weights: IMAGENET1K_V1 is not in torch's cache and could not be downloaded" in result.output
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in result.output
    assert not out.exists()


def test_uri_storage_keeps_everything_at_the_uri(ray_runtime, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # file:// goes through pyarrow's filesystems exactly as s3:// and gs:// do, without a network.
    monkeypatch.setenv("HPSEARCH_MIRROR", str(tmp_path / "mirror"))
    uri = f"file://{tmp_path / 'bucket'}/searches"
    job = small_job(tmp_path, storage=uri, search={"num_samples": 2})
    path = write_job(tmp_path / "job.yaml", job)
    result = cli_run("run", path)
    assert result.exit_code == 0, result.output
    assert f"outputs:  {uri}/t" in result.output
    remote = tmp_path / "bucket" / "searches" / "t"
    for name in ("job.yaml", "trials.parquet", "epochs.parquet", "best.yaml", "best_model.pt",
                 "hpsearch_trials.jsonl", "tuner.pkl"):
        assert (remote / name).is_file(), name
    assert len(pq.read_table(remote / "trials.parquet")) == 2
    assert list(remote.glob("trial_*/checkpoint_*/state.pt"))  # Tune's checkpoints, at the URI too
    best = yaml.safe_load((remote / "best.yaml").read_text())
    assert best["test_accuracy"] > 0.5 and best["checkpoint"].startswith(f"{uri}/t/trial_")

    shown = cli_run("best", f"{uri}/t")
    assert shown.exit_code == 0 and best["trial_id"] in shown.output
    again = cli_run("run", path)
    assert again.exit_code == 2 and f"hpsearch resume {uri}/t" in again.output
    # Resume from the URI alone (the local mirror gone, as on another machine): nothing left to run.
    import shutil

    shutil.rmtree(tmp_path / "mirror")
    resumed = cli_run("resume", f"{uri}/t")
    assert resumed.exit_code == 0, resumed.output
    assert len(pq.read_table(remote / "trials.parquet")) == 2


def test_time_budget_ends_the_search_cleanly(ray_runtime, tmp_path: Path) -> None:
    # 40 s: long enough for the first trials to report even when the machine is loaded (their
    # workers start in seconds on an idle one), far shorter than the trials' 1,000 epochs.
    job = small_job(tmp_path, search={"num_samples": 20, "time_budget_s": 40}, tracking={"enabled": False})
    job["space"].update(epochs=1000, batch_size=8)  # longer than the budget: running trials are cut
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output  # a budget reached is a normal end, not an interruption
    assert "the time budget (40 s) ended the search after" in result.output
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert 1 <= len(trials) < 20
    assert {t["status"] for t in trials} <= {"completed", "stopped early", "not run"}
    assert any(t["status"] == "stopped early" for t in trials)


def test_tracking_to_an_mlflow_server(ray_runtime, tmp_path: Path) -> None:
    # What a team runs on a cluster: one MLflow server (here on 127.0.0.1, a SQLite backend);
    # the driver is its only client.
    import signal

    from support import MlflowServer

    server = MlflowServer(tmp_path).start()
    port = server.port
    try:
        uri = f"http://127.0.0.1:{port}"
        # Credentials in the URI (the server takes any): used, and written nowhere.
        secret = "pa55-w0rd-never-shown"
        job = small_job(tmp_path, tracking={"uri": f"http://alice:{secret}@127.0.0.1:{port}"},
                        search={"num_samples": 2})
        result, out = run_job(tmp_path, job)
        assert result.exit_code == 0, result.output
        assert f"MLflow:   {uri}" in result.output
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
        assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # a parent and two trials
        assert not (tmp_path / "mlflow.db").exists()
        assert secret not in result.output
        for written in out.rglob("*"):
            if written.is_file() and written.suffix in (".yaml", ".json", ".jsonl", ".html", ".journal", ".parquet"):
                assert secret.encode() not in written.read_bytes(), written
        for run in runs:
            assert not [k for k, v in run.data.params.items() if secret in v], run.data.params
            assert not [k for k, v in run.data.tags.items() if secret in v]
    finally:
        server.kill(signal.SIGTERM)


def test_a_search_that_minimizes_val_loss(ray_runtime, tmp_path: Path) -> None:
    job = small_job(tmp_path, search={"num_samples": 3, "metric": "val_loss", "mode": "min"},
                    tracking={"enabled": False})
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["metric"] == "val_loss" and best["mode"] == "min"
    assert best["validation"]["val_loss"] == min(t["best_val_loss"] for t in trials)
    assert "best trials by val_loss" in result.output


def test_max_concurrent_trials_caps_the_trials_at_once(ray_runtime, tmp_path: Path) -> None:
    from hpsearch.record.trial_log import read_events

    job = small_job(tmp_path, search={"num_samples": 3, "max_concurrent_trials": 1}, tracking={"enabled": False})
    result, out = run_job(tmp_path, job)  # the test runtime has 2 CPUs: room for 2
    assert result.exit_code == 0, result.output
    assert "1 at a time" in result.output
    spans: dict[str, list[float]] = {}
    for e in read_events(out / "hpsearch_trials.jsonl"):
        if e.get("trial_id"):
            spans.setdefault(e["trial_id"], []).append(e["time"])
    ordered = sorted((min(t), max(t)) for t in spans.values())
    assert len(ordered) == 3 and all(end <= start for (_, end), (start, _) in zip(ordered, ordered[1:]))


def test_tune_s_extra_snapshots_are_spaced_not_one_every_second_checkpoint(
        ray_runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Left to itself, Tune snapshots the experiment each time a trial has checkpointed num_to_keep
    # (2) times since the last snapshot: about 40 snapshots for these 4 trials of 20 short epochs,
    # on top of its periodic ones (every >= 10 s). hpsearch spaces those extra ones (a resume puts
    # back a checkpoint deleted since the snapshot).
    import time

    from ray.tune.execution.tune_controller import TuneController

    from hpsearch.tune.snapshot import FORCED_SNAPSHOT_MIN_S

    saves: list[float] = []
    save_to_dir = TuneController.save_to_dir

    def counted(self: TuneController) -> None:
        saves.append(time.monotonic())
        save_to_dir(self)

    monkeypatch.setattr(TuneController, "save_to_dir", counted)
    job = small_job(tmp_path, search={"num_samples": 4}, tracking={"enabled": False})
    job["space"]["epochs"] = 20
    result, out = run_job(tmp_path, job)
    assert result.exit_code == 0, result.output
    assert len(pq.read_table(out / "epochs.parquet")) == 80  # every trial ran (and checkpointed) 20 epochs
    span = saves[-1] - saves[0]
    at_most = span / FORCED_SNAPSHOT_MIN_S + span / 10 + 3  # spaced extra ones, periodic ones, first and last
    assert 2 <= len(saves) <= at_most, (len(saves), span)


WARM_WORKERS = r"""
import json, os, sys, time
from hpsearch.tune import runtime

runtime.init_ray(None)
from ray import tune

def trial(config):
    tune.report({"torch_before_trial": "torch" in sys.modules, "pid": os.getpid()})

time.sleep(8)  # the prestarted workers have imported what a trial needs
def workers():  # this process's descendants that are Ray workers (starting, or idle once up)
    parent, args = {}, {}
    for d in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{d}/stat").read()
            args[int(d)] = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    def mine(pid):
        while pid in parent and pid != os.getpid():
            pid = parent[pid]
        return pid == os.getpid()
    return [pid for pid, a in args.items() if mine(pid) and ("default_worker" in a or a.startswith("ray::IDLE"))]

prestarted = workers()
grid = tune.Tuner(tune.with_resources(trial, {"cpu": 1}), param_space={"x": tune.grid_search([0, 1])},
                  tune_config=tune.TuneConfig(reuse_actors=True),
                  run_config=tune.RunConfig(storage_path=sys.argv[1], verbose=0, callbacks=[tune.Callback()])).fit()
print(json.dumps({"prestarted": prestarted, "results": [r.metrics for r in grid], "mlflow": "mlflow" in sys.modules}))
runtime.shutdown_ray()
"""


def test_embedded_ray_s_trials_start_in_prestarted_workers_with_torch_imported(tmp_path: Path) -> None:
    """Ray starts workers with the driver, and each imports torch and the training function as it
    starts: a trial finds them imported (and, when it gets one of those workers, no seconds of
    imports after fit() starts)."""
    import subprocess
    import sys

    script = tmp_path / "warm.py"
    script.write_text(WARM_WORKERS)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "runs")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(seen["results"]) == 2 and all(r["torch_before_trial"] for r in seen["results"])
    # Whether a trial gets a prestarted worker is a race Ray decides (a worker still importing is
    # passed over, as under the load of a parallel test run); the imports hold either way.
    assert seen["prestarted"]
    # Tune names a search's callbacks for Ray's usage statistics by importing its MLflow
    # integration, and MLflow (a second, as trials start); with the statistics off, it does not.
    assert not seen["mlflow"]

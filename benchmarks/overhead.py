"""What a trial costs beyond its training: hpsearch against the Optuna loop a person would write.

    python benchmarks/overhead.py [--trials 10 100] [--epochs 1 3] [--skip-tracking-on] [--skip-tune] [--out DIR]

The same training function (:func:`hpsearch.trainable.train`), the same space and the same number
of digits trials, run by:

- optuna: a plain Optuna loop, ``study.optimize`` in as many processes as trial slots (2 here),
  sharing one journal-file study: what a user writes instead of a search tool;
- hpsearch: ``hpsearch run`` (embedded Ray, TPE, FIFO: every trial to its end), tracking off;
- hpsearch+mlflow: the same with MLflow on (a SQLite file);
- tune: the floor of any tool built on Ray Tune: plain Tune (``ray.init``, Ray's own OptunaSearch,
  FIFO, actors reused, 2 trials at a time) running the same function, reporting every epoch, with
  no checkpoint, callback, record or tracking. hpsearch's cost above it is hpsearch's; the rest
  is Tune's own (``--skip-tune`` leaves it out).

Each from a fresh process, one after the other. Printed per method and trial count: wall time from
the command's start, time to the first reported epoch, driver overhead per trial (slot-seconds not
spent training, per trial: (wall x slots - training time) / trials, where training time is what the
epochs report; also counted from the first result on, without the start-up), the peak memory of
the process tree, and the ratios to the Optuna loop. The overhead per trial at each count shows
whether the driver's cost grows with the search.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
SLOTS = 2

SPACE = {
    "num_hidden_layers": {"type": "int", "low": 1, "high": 3},
    "neurons_per_layer": {"type": "int", "low": 32, "high": 128, "step": 16},
    "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 64]},
}


def space_with_epochs(epochs: tuple[int, int]) -> dict:
    low, high = epochs
    return {**SPACE, "epochs": low if low == high else {"type": "int", "low": low, "high": high}}


# --------------------------------------------------------------------------------------------
# (a) The Optuna loop a person writes.
# --------------------------------------------------------------------------------------------


def _optuna_worker(journal: str, trials: int, epochs: tuple[int, int], out: str, t0: float) -> None:
    import optuna
    import torch

    from hpsearch.data import load
    from hpsearch.spec import DataSpec, ModelSpec
    from hpsearch.trainable import train

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load(DataSpec(dataset="digits", val_fraction=0.2), seed=0).for_trials()
    study = optuna.load_study(study_name="loop", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(journal)))
    trained, first = 0.0, None

    def objective(trial: optuna.Trial) -> float:
        config = {"num_hidden_layers": trial.suggest_int("num_hidden_layers", 1, 3),
                  "neurons_per_layer": trial.suggest_int("neurons_per_layer", 32, 128, step=16),
                  "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True),
                  "batch_size": trial.suggest_categorical("batch_size", [32, 64]),
                  "epochs": trial.suggest_int("epochs", *epochs) if epochs[0] != epochs[1] else epochs[0]}
        best = 0.0

        def report(metrics: dict, state: dict | None) -> None:
            nonlocal trained, first, best
            first = first or time.time() - t0
            trained += metrics["epoch_time_s"]
            best = max(best, metrics["val_accuracy"])

        train(config, data=data, model_spec=ModelSpec(), report=report, num_threads=1, seed=trial.number)
        return best

    study.optimize(objective, n_trials=trials)
    Path(out).write_text(json.dumps({"trained_s": trained, "first_s": first}))


def run_optuna(trials: int, epochs: tuple[int, int], folder: Path) -> dict:
    import optuna

    t0 = time.time()
    journal = str(folder / "loop.journal")
    optuna.create_study(study_name="loop", direction="maximize", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(journal)))
    ctx = mp.get_context("spawn")
    shares = [trials // SLOTS + (i < trials % SLOTS) for i in range(SLOTS)]
    procs = [ctx.Process(target=_optuna_worker, args=(journal, n, epochs, str(folder / f"w{i}.json"), t0))
             for i, n in enumerate(shares)]
    with PeakMemory(os.getpid()) as mem:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    wall = time.time() - t0
    parts = [json.loads((folder / f"w{i}.json").read_text()) for i in range(SLOTS)]
    return {"wall_s": wall, "first_s": min(p["first_s"] for p in parts if p["first_s"]),
            "trained_s": sum(p["trained_s"] for p in parts), "peak_mb": mem.peak_mb}


# --------------------------------------------------------------------------------------------
# (b) hpsearch.
# --------------------------------------------------------------------------------------------


def run_hpsearch(trials: int, epochs: tuple[int, int], folder: Path, *, tracking: bool) -> dict:
    job = {"name": "overhead", "seed": 0, "data": {"dataset": "digits", "val_fraction": 0.2},
           "space": space_with_epochs(epochs),
           "search": {"num_samples": trials, "scheduler": {"name": "fifo"}, "enqueue": "none",
                      "final": {"seeds": 0}},
           "resources": {"cpu": 1, "gpu": 0},
           "tracking": {"enabled": tracking, "uri": f"sqlite:///{folder / 'mlflow.db'}"},
           "storage": str(folder / "runs")}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch.cli", "run", str(path)], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakMemory(proc.pid) as mem:
        output, _ = proc.communicate()
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"hpsearch failed ({proc.returncode}):\n{output[-3000:]}")
    log = folder / "runs" / "overhead" / "hpsearch_trials.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    results = [e for e in events if e["event"] == "result"]
    return {"wall_s": wall, "first_s": min(e["time"] for e in results) - t0,
            "trained_s": sum(e["epoch_time_s"] for e in results), "peak_mb": mem.peak_mb}


# --------------------------------------------------------------------------------------------
# (c) Plain Ray Tune: the same trials, nothing of hpsearch's around them.
# --------------------------------------------------------------------------------------------


def run_tune(trials: int, epochs: tuple[int, int], folder: Path) -> dict:
    """Plain Tune in a fresh process (its start-up counted, as hpsearch's command's is)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--tune-child", str(trials), str(epochs[0]), str(epochs[1]),
                             str(folder), str(t0)], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    with PeakMemory(proc.pid) as mem:
        output, _ = proc.communicate()
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"plain Tune failed ({proc.returncode}):\n{output[-3000:]}")
    r = json.loads((folder / "tune.json").read_text())
    return {"wall_s": wall, "first_s": r["first_s"], "trained_s": r["trained_s"], "peak_mb": mem.peak_mb}


def _tune_child(trials: int, epochs: tuple[int, int], folder: Path, t0: float) -> None:
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from hpsearch.data import load
    from hpsearch.spec import DataSpec, ModelSpec

    def trial_fn(config: dict, data: object = None) -> None:
        import torch

        from hpsearch.trainable import train

        torch.set_num_threads(1)
        train(config, data=data, model_spec=ModelSpec(), num_threads=1, seed=0,
              report=lambda metrics, state: tune.report(metrics))

    class Clock(tune.Callback):
        first, trained = None, 0.0

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001, ANN003
            Clock.first = Clock.first or time.time() - t0
            Clock.trained += result["epoch_time_s"]

    ray.init(num_cpus=SLOTS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    data = load(DataSpec(dataset="digits", val_fraction=0.2), seed=0).for_trials()
    low, high = epochs
    space = {"num_hidden_layers": tune.randint(1, 4), "neurons_per_layer": tune.qrandint(32, 128, 16),
             "learning_rate": tune.loguniform(1e-3, 1e-1), "batch_size": tune.choice([32, 64]),
             "epochs": low if low == high else tune.randint(low, high + 1)}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial_fn, data=data), {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=OptunaSearch(metric="val_accuracy", mode="max", seed=0),
                                    num_samples=trials, max_concurrent_trials=SLOTS, reuse_actors=True),
        run_config=tune.RunConfig(name="floor", storage_path=str(folder / "ray_results"), callbacks=[Clock()],
                                  verbose=0))
    tuner.fit()
    ray.shutdown()
    (folder / "tune.json").write_text(json.dumps({"first_s": Clock.first, "trained_s": Clock.trained}))


class PeakMemory:
    """The peak resident memory of a process and all its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_mb = pid, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
            except psutil.Error:
                continue
            self.peak_mb = max(self.peak_mb, rss / 2**20)


# --------------------------------------------------------------------------------------------


def main() -> None:
    if sys.argv[1:2] == ["--tune-child"]:
        trials, low, high, folder, t0 = sys.argv[2:7]
        _tune_child(int(trials), (int(low), int(high)), Path(folder), float(t0))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--epochs", type=int, nargs=2, default=[1, 3], metavar=("LOW", "HIGH"))
    ap.add_argument("--skip-tracking-on", action="store_true", help="leave out hpsearch with MLflow on")
    ap.add_argument("--skip-tune", action="store_true", help="leave out plain Ray Tune (the floor)")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs and a JSON of the figures here")
    args = ap.parse_args()
    epochs = (args.epochs[0], args.epochs[1])
    root = args.out or Path(tempfile.mkdtemp(prefix="hpsearch-overhead-"))
    methods = (["optuna", "hpsearch"] + ([] if args.skip_tracking_on else ["hpsearch+mlflow"])
               + ([] if args.skip_tune else ["tune"]))
    rows = []
    for n in args.trials:
        for method in methods:
            folder = root / f"{method}-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            if method == "optuna":
                r = run_optuna(n, epochs, folder)
            elif method == "tune":
                r = run_tune(n, epochs, folder)
            else:
                r = run_hpsearch(n, epochs, folder, tracking=method == "hpsearch+mlflow")
            # After the first result: the per-trial cost without the start-up spread over the trials.
            r.update(method=method, trials=n, overhead_per_trial_s=(r["wall_s"] * SLOTS - r["trained_s"]) / n,
                     steady_per_trial_s=((r["wall_s"] - r["first_s"]) * SLOTS - r["trained_s"]) / n)
            rows.append(r)
            print(f"{method:>16} {n:>5} trials: wall {r['wall_s']:7.1f} s, first result {r['first_s']:5.1f} s, "
                  f"overhead {r['overhead_per_trial_s']:5.2f} slot-s/trial ({r['steady_per_trial_s']:5.2f} after the "
                  f"first result), training {r['trained_s']:6.1f} s, peak {r['peak_mb']:6.0f} MB", flush=True)
    print(f"\n{SLOTS} trial slots, digits, {epochs[0]}-{epochs[1]} epochs per trial; ratios to the Optuna loop:")
    for n in args.trials:
        base = next(r for r in rows if r["method"] == "optuna" and r["trials"] == n)
        for r in rows:
            if r["trials"] == n and r["method"] != "optuna":
                print(f"  {n:>5} trials, {r['method']:<16} wall {r['wall_s'] / base['wall_s']:.2f}x, "
                      f"first result {r['first_s'] / base['first_s']:.2f}x, "
                      f"overhead per trial {r['overhead_per_trial_s'] / max(1e-9, base['overhead_per_trial_s']):.2f}x, "
                      f"peak memory {r['peak_mb'] / base['peak_mb']:.2f}x")
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    if len(args.trials) > 1:
        print("driver overhead per trial as the search grows (largest / smallest count):")
        for method, rs in by_method.items():
            rs = sorted(rs, key=lambda r: r["trials"])
            print(f"  {method:<16} {rs[-1]['overhead_per_trial_s'] / max(1e-9, rs[0]['overhead_per_trial_s']):.2f}x, "
                  f"after the first result {rs[-1]['steady_per_trial_s'] / max(1e-9, rs[0]['steady_per_trial_s']):.2f}x "
                  f"({rs[0]['trials']} -> {rs[-1]['trials']} trials); peak memory "
                  f"{rs[-1]['peak_mb'] - rs[0]['peak_mb']:+.0f} MB")
    (root / "overhead.json").write_text(json.dumps(rows, indent=2))
    print(f"\nfigures: {root / 'overhead.json'}")


if __name__ == "__main__":
    main()

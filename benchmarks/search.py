"""How much of a search's wall time goes into training: hpsearch against a hand-written Tune search.

    python benchmarks/search.py [--trials 24] [--skip-baseline] [--gpu 0] [--out DIR]

Both run the same fixed search (Fashion-MNIST MLP, the same space, Optuna TPE with the same seed,
ASHA, 1 CPU per trial) from a fresh process:

- hpsearch: ``hpsearch run`` on a job file written here (MLflow on, into a temporary SQLite file);
- baseline: the script people write from the Ray Tune + Optuna tutorials: a trainable that builds
  a torchvision dataset and DataLoader, the tutorial loop, ``tune.report`` per epoch, and Tune's
  defaults (fresh actors per trial, its result loggers on).

Printed for each: utilization = (sum of the trials' training time) / (wall time from process start
x trial slots), where training time is what each epoch spent training and evaluating; the time
from process start to the first reported result; trials and epochs per minute; the driver's and
one worker's peak memory. Then the ratios, hpsearch over baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fashion_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

SPACE = {
    "num_hidden_layers": {"type": "int", "low": 1, "high": 3},
    "neurons_per_layer": {"type": "int", "low": 64, "high": 128, "step": 16},
    "learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "batch_size": {"type": "categorical", "choices": [64, 128]},
    "epochs": {"type": "int", "low": 2, "high": 6, "step": 2},
}


def job_file(folder: Path, trials: int, gpu: float, *, data_dir: Path, tracking: bool) -> Path:
    job = {
        "name": "bench",
        "seed": 0,
        "data": {"dataset": "fashion_mnist", "root": str(data_dir), "download": False},
        "space": SPACE,
        # No final retraining: the baseline has none, and its epochs are not the trials' (utilization).
        "search": {"num_samples": trials, "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
                   "final": {"seeds": 0}},
        "resources": {"cpu": 1, "gpu": gpu},
        "tracking": {"enabled": tracking, "uri": f"sqlite:///{folder / 'mlflow.db'}"},
        "storage": str(folder / "runs"),
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


BASELINE = textwrap.dedent('''
    # The hand-written search: Ray Tune + Optuna + ASHA with a tutorial trainable and Tune's defaults.
    import json, sys, time
    import torch, torch.nn as nn, torch.nn.functional as F, torchvision
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch
    import optuna

    ROOT, TRIALS, OUT = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def objective(config):
        torch.set_num_threads(1)
        tf = torchvision.transforms.Compose([torchvision.transforms.ToTensor(),
                                             torchvision.transforms.Normalize((0.2860,), (0.3530,))])
        full = torchvision.datasets.FashionMNIST(ROOT, train=True, download=False, transform=tf)
        train, val = torch.utils.data.random_split(full, [54000, 6000], torch.Generator().manual_seed(0))
        tl = torch.utils.data.DataLoader(train, batch_size=config["batch_size"], shuffle=True)
        vl = torch.utils.data.DataLoader(val, batch_size=1000)
        layers, width = [nn.Flatten()], 784
        for _ in range(config["num_hidden_layers"]):
            layers += [nn.Linear(width, config["neurons_per_layer"]), nn.BatchNorm1d(config["neurons_per_layer"]),
                       nn.ReLU(), nn.Dropout(0.2)]
            width = config["neurons_per_layer"]
        model = nn.Sequential(*layers, nn.Linear(width, 10))
        opt = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
        for epoch in range(1, config["epochs"] + 1):
            t0 = time.perf_counter()
            model.train()
            for xb, yb in tl:
                opt.zero_grad(); loss = F.cross_entropy(model(xb), yb); loss.backward(); opt.step()
            model.eval(); correct = 0
            with torch.no_grad():
                for xb, yb in vl:
                    correct += (model(xb).argmax(1) == yb).sum().item()
            tune.report({"epoch": epoch, "val_accuracy": correct / 6000, "epoch_time_s": time.perf_counter() - t0,
                         "wall": time.time()})

    def space(trial):
        trial.suggest_int("num_hidden_layers", 1, 3)
        trial.suggest_int("neurons_per_layer", 64, 128, step=16)
        trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True)
        trial.suggest_categorical("batch_size", [64, 128])
        trial.suggest_int("epochs", 2, 6, step=2)

    tuner = tune.Tuner(
        tune.with_resources(objective, {"cpu": 1}),
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(space=space, metric="val_accuracy", mode="max",
                                    sampler=optuna.samplers.TPESampler(seed=0)),
            scheduler=ASHAScheduler(time_attr="epoch", metric="val_accuracy", mode="max", max_t=6,
                                    grace_period=2, reduction_factor=2),
            num_samples=TRIALS),
        run_config=tune.RunConfig(storage_path=OUT, name="baseline", verbose=0))
    grid = tuner.fit()
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        if df is not None:
            rows += [{"trial_id": r.metrics.get("trial_id"), "epoch": int(e), "epoch_time_s": float(t), "wall": float(w)}
                     for e, t, w in zip(df["epoch"], df["epoch_time_s"], df["wall"])]
    json.dump(rows, open(OUT + "/epochs.json", "w"))
''')


class MemoryWatch(threading.Thread):
    """Peak RSS of the driver process and of the largest Ray worker, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.driver_mb, self.worker_mb, self.running = pid, 0.0, 0.0, True

    def run(self) -> None:
        while self.running:
            try:
                driver = psutil.Process(self.pid)
                self.driver_mb = max(self.driver_mb, driver.memory_info().rss / 2**20)
                for child in driver.children(recursive=True):
                    try:
                        if child.name().startswith("ray::"):
                            self.worker_mb = max(self.worker_mb, child.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            time.sleep(0.2)


def measure(cmd: list[str], *, cwd: Path, epochs_of: callable, slots: int, env: dict) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = MemoryWatch(proc.pid)
    watch.start()
    output, _ = proc.communicate()
    wall = time.time() - t0
    watch.running = False
    if proc.returncode != 0:
        sys.exit(f"{cmd} failed ({proc.returncode}):\n{output[-3000:]}")
    epochs = epochs_of()
    train_s = sum(e["epoch_time_s"] for e in epochs)
    trials = {e["trial_id"] for e in epochs}
    return {
        "wall_s": wall,
        "utilization": train_s / (wall * slots),
        "first_result_s": min(e["wall"] for e in epochs) - t0,
        "trials_per_min": len(trials) / wall * 60,
        "epochs_per_min": len(epochs) / wall * 60,
        "epochs": len(epochs),
        "trials": len(trials),
        "driver_mb": watch.driver_mb,
        "worker_mb": watch.worker_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--gpu", type=float, default=0.0)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--no-tracking", action="store_true", help="run hpsearch with MLflow off")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = ap.parse_args()
    slots = psutil.cpu_count(logical=True) if args.gpu == 0 else None
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)

    figures = {}
    with tempfile.TemporaryDirectory(prefix="hpsearch-bench-") as tmp:
        folder = Path(tmp)
        data_dir, real = fashion_dir()
        if not real:
            print(f"data: SYNTHETIC Fashion-MNIST-shaped data from {data_dir} (timings only)")
        path = job_file(folder, args.trials, args.gpu, data_dir=data_dir, tracking=not args.no_tracking)

        def hp_epochs() -> list[dict]:
            rows = []
            for line in (folder / "runs" / "bench" / "hpsearch_trials.jsonl").read_text().splitlines():
                e = json.loads(line)
                if e["event"] == "result":
                    rows.append({"trial_id": e["trial_id"], "epoch_time_s": e["epoch_time_s"], "wall": e["time"]})
            return rows

        gpu_slots = None
        if args.gpu:
            import torch

            gpu_slots = int(torch.cuda.device_count() / args.gpu)
        figures["hpsearch"] = measure([sys.executable, "-m", "hpsearch.cli", "run", str(path)], cwd=folder,
                                      epochs_of=hp_epochs, slots=slots or gpu_slots, env=env)
        if not args.skip_baseline and args.gpu == 0:
            root = folder / "tv"
            (root / "FashionMNIST" / "raw").mkdir(parents=True)
            import gzip
            import shutil

            for gz in data_dir.glob("*.gz"):
                with gzip.open(gz) as src, open(root / "FashionMNIST" / "raw" / gz.name[:-3], "wb") as dst:
                    shutil.copyfileobj(src, dst)
            script = folder / "baseline.py"
            script.write_text(BASELINE)
            (folder / "base").mkdir()
            figures["baseline"] = measure(
                [sys.executable, str(script), str(root), str(args.trials), str(folder / "base")], cwd=folder,
                epochs_of=lambda: json.loads((folder / "base" / "epochs.json").read_text()), slots=slots, env=env)

    print(f"search of {args.trials} trials, Fashion-MNIST MLP, 1 CPU"
          f"{f' and {args.gpu:g} GPU' if args.gpu else ''} per trial, {slots or gpu_slots} slots")
    for name, f in figures.items():
        print(f"  {name:<9} wall {f['wall_s']:6.1f} s  utilization {f['utilization']:.3f}  "
              f"first result {f['first_result_s']:5.1f} s  {f['trials']} trials / {f['epochs']} epochs  "
              f"({f['trials_per_min']:.1f} trials/min, {f['epochs_per_min']:.1f} epochs/min)  "
              f"driver {f['driver_mb']:.0f} MiB, worker {f['worker_mb']:.0f} MiB")
    if "baseline" in figures:
        h, b = figures["hpsearch"], figures["baseline"]
        print(f"ratios hpsearch/baseline: utilization {h['utilization'] / b['utilization']:.2f}x, "
              f"epochs per minute {h['epochs_per_min'] / b['epochs_per_min']:.2f}x, "
              f"time to first result {b['first_result_s'] / h['first_result_s']:.2f}x sooner")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "search.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""How good is the search? Every method side by side on the same budget, several seeds each.

    python benchmarks/search_quality.py [--budget-s 180] [--seeds 0 1 2] [--space seed|shipped]
                                        [--methods defaults random stock hpsearch grid]
                                        [--train-size 60000] [--final-seeds 1] [--out DIR]

Each method is one real ``hpsearch run`` in a fresh process (embedded Ray, MLflow off), on the same
space, the same seed and the same wall-clock budget for its trials (``search.time_budget_s``):

- ``defaults``: no search: the PyTorch tutorial's defaults trained once (3 x 128 MLP, batch norm,
  dropout 0.2, Adam 1e-3, batch 64, 20 epochs, constant learning rate). The baseline.
- ``random``: random search, every trial run to its end (FIFO).
- ``stock``: Ray Tune's stock ``OptunaSearch`` (TPE with Optuna's defaults) + ASHA: a trial that
  ASHA stopped is told to TPE as COMPLETE with its early value; no enqueued first trial.
- ``hpsearch``: hpsearch's default search, as a job file gets it: TPE (multivariate, grouped,
  constant liar, shorter start-up), stopped trials PRUNED, the defaults enqueued first, ASHA
  comparing trials at the same point of their learning-rate schedules.
- ``grid``: a small grid (learning rate x layers x batch size, the rest at the defaults), FIFO.

Every method's pick is then scored the same honest way: retrained on train + validation
(``search.final.seeds`` seeds, default 1 here: the search seeds give the spread) and scored on the
test set. Printed: a table (mean ± std over seeds), the ratios the search-quality claim rests on,
and where saved, JSON and a PNG of best-so-far validation accuracy against epochs consumed and
against wall time (mean ± one standard deviation over seeds).

``--space seed`` searches the seed's classic space (``jobs/mnist.yaml``'s ranges, unchanged);
``--space shipped`` the space of ``jobs/fashion_mnist.yaml``. ``--train-size`` keeps that many
training images (a reduced variant for many seeds; the test set stays whole). Without Debian's
Fashion-MNIST (``apt-get install dataset-fashion-mnist``) synthetic data of the same shape is used:
the benchmark runs, its accuracies then mean nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fashion_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METHODS = ("defaults", "random", "stock", "hpsearch", "grid")

# The PyTorch tutorial's defaults: what a person trains without a search.
TUTORIAL = {"num_hidden_layers": 3, "neurons_per_layer": 128, "dropout_rate": 0.2, "learning_rate": 1e-3,
            "batch_size": 64, "optimizer": "Adam", "weight_decay": 0.0, "epochs": 20, "lr_schedule": "constant"}
GRID = {"learning_rate": {"type": "categorical", "choices": [3e-4, 1e-3, 3e-3]},
        "num_hidden_layers": {"type": "categorical", "choices": [1, 2, 3]},
        "batch_size": {"type": "categorical", "choices": [64, 128]}}

# Ray Tune's stock OptunaSearch and a stock TPE sampler, in place of hpsearch's own.
STOCK_LAUNCHER = """
import sys
import optuna
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
import hpsearch.space, hpsearch.tune.scheduler, hpsearch.tune.searcher

class StockOptunaSearch(OptunaSearch):
    def __init__(self, *, points_to_evaluate=None, **kwargs):
        super().__init__(**kwargs)  # no enqueued defaults

hpsearch.tune.searcher.HonestOptunaSearch = StockOptunaSearch
hpsearch.tune.scheduler.ASHAByPhase = ASHAScheduler  # one set of rungs, every trial compared with every trial
hpsearch.space.make_sampler = lambda job: optuna.samplers.TPESampler(seed=job.seed)
from hpsearch.cli import main
sys.argv = ["hpsearch", *sys.argv[1:]]
main()
"""


def prepare_data(train_size: int, out: Path) -> tuple[Path, bool]:
    """A folder with Fashion-MNIST's four IDX files, the training set cut to ``train_size``."""
    folder, real = fashion_dir()
    if train_size >= 60_000:
        return folder, real
    sub = out / "data"
    sub.mkdir(parents=True, exist_ok=True)

    def read(name: str) -> tuple[bytes, np.ndarray]:
        raw = gzip.decompress((folder / name).read_bytes())
        ndim = raw[3]
        header = 4 + 4 * ndim
        return raw[:header], np.frombuffer(raw, np.uint8, offset=header)

    keep = np.sort(np.random.default_rng(0).permutation(60_000)[:train_size])
    h, images = read("train-images-idx3-ubyte.gz")
    images = images.reshape(60_000, 784)[keep]
    _, labels = read("train-labels-idx1-ubyte.gz")
    labels = labels[keep]
    n = train_size.to_bytes(4, "big")
    (sub / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(h[:4] + n + h[8:] + images.tobytes(), 1))
    (sub / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + n + labels.tobytes(), 1))
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (sub / name).write_bytes((folder / name).read_bytes())
    return sub, real


def base_job(space_name: str) -> dict:
    """The job a method's run starts from: the space (and ASHA settings) of a shipped job file."""
    source = REPO / "jobs" / ("mnist.yaml" if space_name == "seed" else "fashion_mnist.yaml")
    job = yaml.safe_load(source.read_text())
    return {"space": job["space"], "scheduler": job["search"]["scheduler"]}


def method_job(method: str, *, base: dict, seed: int, budget_s: float, final_seeds: int, data_dir: Path,
               storage: Path) -> dict:
    search: dict = {"num_samples": 1000, "time_budget_s": budget_s, "final": {"seeds": final_seeds},
                    "max_failures": 0}
    space = dict(base["space"])
    if method == "defaults":
        space = dict(TUTORIAL)
        search.update(num_samples=1, scheduler={"name": "fifo"}, enqueue="none")
        search.pop("time_budget_s")
    elif method == "random":
        search.update(searcher={"name": "optuna", "sampler": "random"}, scheduler={"name": "fifo"}, enqueue="none")
    elif method in ("stock", "hpsearch"):
        search.update(searcher={"name": "optuna", "sampler": "tpe"}, scheduler=base["scheduler"])
        if method == "stock":
            search["enqueue"] = "none"
    elif method == "grid":
        space = {**TUTORIAL, **GRID}
        size = math.prod(len(p["choices"]) for p in GRID.values())
        search.update(num_samples=size, searcher={"name": "optuna", "sampler": "grid"}, scheduler={"name": "fifo"})
    else:
        raise ValueError(method)
    return {
        "name": f"{method}-seed{seed}", "seed": seed,
        "data": {"dataset": "fashion_mnist", "root": str(data_dir), "download": False},
        "space": space, "search": search, "resources": {"cpu": 1, "gpu": 0},
        "tracking": {"enabled": False}, "storage": str(storage),
    }


def run_method(method: str, job: dict, folder: Path) -> dict:
    """One search in a fresh process; its curve, best values and final scores."""
    path = folder / f"{job['name']}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = ([sys.executable, "-c", STOCK_LAUNCHER] if method == "stock" else [sys.executable, "-m", "hpsearch.cli"])
    t0 = time.time()
    proc = subprocess.run([*cmd, "run", str(path)], cwd=folder, env=env, capture_output=True, text=True, check=False)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{method} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    out = Path(job["storage"]) / job["name"]
    events = [json.loads(line) for line in (out / "hpsearch_trials.jsonl").read_text().splitlines() if line.strip()]
    start = min(e["time"] for e in events if e["event"] == "start")
    results = sorted((e for e in events if e["event"] == "result"), key=lambda e: e["time"])
    curve, best = [], -math.inf
    for i, e in enumerate(results, 1):  # retries may report an epoch twice: it was trained twice
        v = e.get("val_accuracy")
        if isinstance(v, (int, float)) and math.isfinite(v):
            best = max(best, v)
        curve.append((i, e["time"] - start, best if math.isfinite(best) else None))
    best_yaml = yaml.safe_load((out / "best.yaml").read_text())
    final = best_yaml.get("retrained") or {}
    return {
        "method": method, "seed": job["seed"], "wall_s": round(wall, 1), "epochs": len(results),
        "trials": len({e["trial_id"] for e in events if e["event"] == "start"}),
        "best_val": best_yaml["validation"]["val_accuracy"], "checkpoint_test": best_yaml.get("test_accuracy"),
        "retrained_test": final.get("mean"), "retrained": final.get("test_accuracy"),
        "hyperparameters": best_yaml["hyperparameters"], "curve": curve,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def epochs_to_reach(run: dict, target: float) -> float:
    """Epochs consumed before the run's best-so-far validation accuracy reached ``target``."""
    for epochs, _, best in run["curve"]:
        if best is not None and best >= target:
            return epochs
    return math.inf


def best_at(run: dict, epochs: int) -> float:
    """A run's best validation accuracy after ``epochs`` epochs consumed (its final best after its end)."""
    best = -math.inf
    for consumed, _, value in run["curve"]:
        if consumed > epochs:
            break
        if value is not None:
            best = value
    return best


def mean_curve_epochs_to_reach(runs: list[dict], target: float) -> float:
    """Epochs consumed before the mean over ``runs`` of their best-so-far reached ``target``."""
    for epochs in range(1, max(r["epochs"] for r in runs) + 1):
        if float(np.mean([best_at(r, epochs) for r in runs])) >= target:
            return epochs
    return math.inf


def summarize(runs: list[dict], methods: list[str]) -> dict:
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    rows = {}
    base_test = _mean_std([r["retrained_test"] for r in by.get("defaults", [])])[0]
    for m, rs in by.items():
        if not rs:
            continue
        val, val_sd = _mean_std([r["best_val"] for r in rs])
        test, test_sd = _mean_std([r["retrained_test"] for r in rs])
        rows[m] = {"seeds": len(rs), "best_val": val, "best_val_std": val_sd, "retrained_test": test,
                   "retrained_test_std": test_sd, "vs_defaults_points": (test - base_test) * 100,
                   "epochs": float(np.mean([r["epochs"] for r in rs])),
                   "trials": float(np.mean([r["trials"] for r in rs]))}
    claims = {}
    if by.get("hpsearch") and by.get("random"):
        ratios = []
        for h in by["hpsearch"]:
            r = next((x for x in by["random"] if x["seed"] == h["seed"]), None)
            if r:
                ratios.append(epochs_to_reach(h, r["best_val"]) / max(1, r["epochs"]))
        claims["hpsearch_epochs_to_random_best_over_random_epochs"] = float(np.mean(ratios)) if ratios else None
        claims["per_seed"] = ratios
        # The same on the mean curves over seeds (what the PNG draws): the epoch at which hpsearch's
        # mean best-so-far reaches random's mean final best, over random's mean epochs.
        target = float(np.mean([r["best_val"] for r in by["random"]]))
        reached = mean_curve_epochs_to_reach(by["hpsearch"], target)
        claims["mean_curve_ratio"] = reached / float(np.mean([r["epochs"] for r in by["random"]]))
    return {"rows": rows, "claims": claims}


def print_table(summary: dict, *, budget_s: float, space: str, train_size: int, real: bool) -> None:
    rows = summary["rows"]
    print(f"\nsearch quality: Fashion-MNIST{'' if real else ' (SYNTHETIC: figures mean nothing)'}, "
          f"{train_size} training images, space '{space}', {budget_s:g} s of trials per search, 2 trials at a time")
    print(f"{'method':<10}{'seeds':>6}{'best val':>18}{'retrained test':>20}{'vs defaults':>13}{'epochs':>9}{'trials':>8}")
    for m, r in rows.items():
        print(f"{m:<10}{r['seeds']:>6}{r['best_val']:>11.4f} ±{r['best_val_std']:.4f}"
              f"{r['retrained_test']:>13.4f} ±{r['retrained_test_std']:.4f}{r['vs_defaults_points']:>+10.2f} pt"
              f"{r['epochs']:>9.0f}{r['trials']:>8.1f}")
    c = summary["claims"]
    if "hpsearch" in rows:
        h = rows["hpsearch"]
        print()
        if "defaults" in rows:
            print(f"hpsearch vs defaults, retrained test accuracy: {h['vs_defaults_points']:+.2f} points "
                  f"({h['retrained_test'] / rows['defaults']['retrained_test']:.4f}x)")
        if "stock" in rows:
            print(f"hpsearch vs Ray's stock OptunaSearch + ASHA: {(h['retrained_test'] - rows['stock']['retrained_test']) * 100:+.2f} "
                  f"points retrained test, {(h['best_val'] - rows['stock']['best_val']) * 100:+.2f} points best val")
        if c.get("hpsearch_epochs_to_random_best_over_random_epochs") is not None:
            print(f"epochs hpsearch needed to reach random+FIFO's final best val, over random's epochs: "
                  f"{c['hpsearch_epochs_to_random_best_over_random_epochs']:.3f} (per seed: "
                  + ", ".join(f"{x:.3f}" for x in c["per_seed"]) + ")")
            print(f"the same on the mean curves over seeds (hpsearch's mean best-so-far reaching random's mean final "
                  f"best, over random's mean epochs): {c['mean_curve_ratio']:.3f}")


def plot(runs: list[dict], methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for m in methods:
        rs = [r for r in runs if r["method"] == m and r["curve"]]
        if not rs:
            continue
        for ax, col in ((axes[0], 0), (axes[1], 1)):
            top = max(r["curve"][-1][col] for r in rs)
            grid = np.linspace(0, top, 200)
            ys = []
            for r in rs:
                xs = np.array([p[col] for p in r["curve"]], float)
                vals = np.array([np.nan if p[2] is None else p[2] for p in r["curve"]], float)
                idx = np.searchsorted(xs, grid, side="right") - 1
                y = np.where(idx >= 0, vals[np.clip(idx, 0, None)], np.nan)
                ys.append(y)
            ys = np.array(ys)
            with warnings.catch_warnings():  # before a run's first result its curve is NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, sd = np.nanmean(ys, 0), np.nanstd(ys, 0)
            sd[np.isnan(ys).any(0)] = np.nan  # a band only where every seed has a value
            (line,) = ax.plot(grid, mean, label=f"{m} ({len(rs)} seed{'' if len(rs) == 1 else 's'})")
            ax.fill_between(grid, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    for ax, label in ((axes[0], "epochs consumed"), (axes[1], "seconds since the first trial started")):
        ax.set_xlabel(label)
        ax.set_ylabel("best validation accuracy so far")
        ax.grid(alpha=0.3)
        lo = min((p[2] for r in runs for p in r["curve"] if p[2] is not None), default=0.8)
        ax.set_ylim(max(lo, 0.84), None)
    axes[0].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=180, help="seconds of trials per search (default 180)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--space", choices=("seed", "shipped"), default="seed")
    ap.add_argument("--train-size", type=int, default=60_000, help="training images kept (of 60000)")
    ap.add_argument("--final-seeds", type=int, default=1, help="retrainings of each search's pick")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs, JSON and PNG here")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="hpsearch-quality-"))
    out.mkdir(parents=True, exist_ok=True)
    data_dir, real = prepare_data(args.train_size, out)
    base = base_job(args.space)
    runs = []
    t_all = time.time()
    for seed in args.seeds:  # seed by seed, every method in turn: a load on the machine hits all alike
        for method in args.methods:
            job = method_job(method, base=base, seed=seed, budget_s=args.budget_s, final_seeds=args.final_seeds,
                             data_dir=data_dir, storage=out / "runs")
            run = run_method(method, job, out)
            runs.append(run)
            print(f"{method:<9} seed {seed}: best val {run['best_val']:.4f}, retrained test "
                  f"{run['retrained_test'] if run['retrained_test'] is None else round(run['retrained_test'], 4)}, "
                  f"{run['trials']} trials, {run['epochs']} epochs, {run['wall_s']:.0f} s", flush=True)
    summary = summarize(runs, args.methods)
    print_table(summary, budget_s=args.budget_s, space=args.space, train_size=args.train_size, real=real)
    meta = {"budget_s": args.budget_s, "seeds": args.seeds, "space": args.space, "train_size": args.train_size,
            "final_seeds": args.final_seeds, "real_data": real, "total_s": round(time.time() - t_all),
            "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "revision": _revision()}
    (out / "search_quality.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    plot(runs, args.methods, out / "search_quality.png",
         f"Fashion-MNIST, space '{args.space}', {args.budget_s:g} s per search, {len(args.seeds)} seeds")
    print(f"\n{len(runs)} searches in {meta['total_s']} s; JSON and PNG in {out}")


def _revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()

"""Seconds per epoch of one MLP on Fashion-MNIST, three ways, measured in one run.

    python benchmarks/trainable.py [--device cpu|cuda] [--epochs 5] [--batch-sizes 64 128]

- tutorial: torchvision's FashionMNIST with ToTensor + Normalize transforms, a shuffling DataLoader
  (pin_memory on CUDA), ``.to(device)`` per batch — the loop of the PyTorch tutorials;
- classic:  a map-style Dataset over preloaded, normalised tensors + DataLoader, ``.to(device)`` per
  batch — the usual "CustomDataset" Optuna objective;
- hpsearch: the project's own path (:func:`hpsearch.trainable.train_epoch` on device-resident data).

Same model (784-128x3-10, batch norm, dropout 0.2, Adam 1e-3), same initial weights, same number of
epochs; after them, each model's test accuracy (they must agree within 0.5 points). Prints seconds
per epoch (the median over epochs after the first), the ratios against hpsearch, the device,
versions and peak memory. One torch thread on the CPU, as a 1-CPU trial has.
"""

from __future__ import annotations

import argparse
import gzip
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import fashion_dir  # noqa: E402

from hpsearch import data as hdata  # noqa: E402
from hpsearch.models import mlp  # noqa: E402
from hpsearch.spec import DataSpec  # noqa: E402
from hpsearch.trainable import evaluate, in_batches, shuffled_batches, train_epoch  # noqa: E402


def make_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return mlp(in_features=784, num_classes=10, num_hidden_layers=3, neurons_per_layer=128,
               dropout_rate=0.2, batch_norm=True).to(device)


def make_optimizer(model: torch.nn.Module, device: torch.device, *, tuned: bool) -> torch.optim.Optimizer:
    if tuned:  # what hpsearch uses (hpsearch.models.build_optimizer)
        from hpsearch.models import build_optimizer

        hp = {"learning_rate": 1e-3, "weight_decay": 0.0, "optimizer": "Adam", "momentum": 0.0}
        return build_optimizer(model, hp, device=device)
    return torch.optim.Adam(model.parameters(), lr=1e-3)  # the tutorial's


def loader_epoch(model, optimizer, loader, device) -> None:
    """The tutorial loop: a DataLoader, a copy to the device per batch, a host sync per step."""
    model.train()
    running = 0.0
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        running += loss.item()  # as tutorials log it


class TensorDatasetClassic(Dataset):
    """The usual "CustomDataset": preloaded tensors, one sample per __getitem__."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def torchvision_root(source: Path) -> Path:
    """torchvision's FashionMNIST wants <root>/FashionMNIST/raw/<uncompressed files>."""
    root = Path(tempfile.mkdtemp(prefix="hpsearch-bench-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in source.glob("*.gz"):
        with gzip.open(gz) as src, open(raw / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["tutorial", "classic", "hpsearch"])
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"

    print(f"device: {torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()}"
          f" ({args.device}, {args.threads} thread{'s' if args.threads > 1 else ''})")
    print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")

    source, real = fashion_dir()
    print(f"data: {'Fashion-MNIST' if real else 'SYNTHETIC Fashion-MNIST-shaped data (timings only)'} from {source}")
    # The same split for everyone: hpsearch's loader (train = 54k after a seeded 10% validation split).
    ds = hdata.load(DataSpec(dataset="fashion_mnist", root=str(source), download=False, val_fraction=0.1), seed=0)
    x_train, y_train = hdata.to_device(ds.train, ds, torch.device("cpu"))
    x_test, y_test = hdata.to_device(ds.test, ds, device)
    mean, std = ds.mean, ds.std

    root = torchvision_root(source)
    tv = torchvision.datasets.FashionMNIST(
        str(root), train=True, download=False,
        transform=torchvision.transforms.Compose([torchvision.transforms.ToTensor(),
                                                  torchvision.transforms.Normalize(mean, std)]))
    train_idx, _ = hdata.split_indices(len(tv), val_fraction=0.1, seed=0)
    tv = torch.utils.data.Subset(tv, train_idx.tolist())

    rows = []
    for bs in args.batch_sizes:
        times: dict[str, float] = {}
        accs: dict[str, float] = {}
        for method in args.methods:
            model = make_model(device)
            opt = make_optimizer(model, device, tuned=(method == "hpsearch"))
            if method == "tutorial":
                loader = DataLoader(tv, batch_size=bs, shuffle=True, pin_memory=cuda)
                step = lambda: loader_epoch(model, opt, loader, device)  # noqa: E731
            elif method == "classic":
                loader = DataLoader(TensorDatasetClassic(x_train, y_train), batch_size=bs, shuffle=True,
                                    pin_memory=cuda)
                step = lambda: loader_epoch(model, opt, loader, device)  # noqa: E731
            else:
                xd, yd = x_train.to(device), y_train.to(device)
                gen = torch.Generator(device=device)
                gen.manual_seed(0)
                step = lambda: train_epoch(model, opt, shuffled_batches(xd, yd, batch_size=bs, generator=gen))  # noqa: E731
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            per_epoch = []
            for _ in range(args.epochs):
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize(device)
                per_epoch.append(time.perf_counter() - t0)
            times[method] = statistics.median(per_epoch[1:] or per_epoch)
            accs[method] = evaluate(model, in_batches(x_test, y_test))[1]
            mem = (f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB on GPU" if cuda
                   else f"{peak_rss_mb():.0f} MiB peak RSS (process)")
            print(f"batch {bs:>4}  {method:<9} {times[method]:7.3f} s/epoch  test acc {accs[method]:.4f}  {mem}",
                  flush=True)
        rows.append((bs, times, accs))

    print("\nratios (time of the other way / time of hpsearch; > 1 means hpsearch is faster):")
    for bs, times, accs in rows:
        if "hpsearch" not in times:
            continue
        parts = [f"{m} {times[m] / times['hpsearch']:.2f}x (test accuracy {100 * (accs['hpsearch'] - accs[m]):+.2f} "
                 "points for hpsearch)" for m in times if m != "hpsearch"]
        print(f"  batch {bs:>4}: " + ", ".join(parts))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Shared by the benchmarks: where Fashion-MNIST comes from."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FILES = {"train-images-idx3-ubyte.gz": 0, "train-labels-idx1-ubyte.gz": 0,
         "t10k-images-idx3-ubyte.gz": 0, "t10k-labels-idx1-ubyte.gz": 0}


def fashion_dir() -> tuple[Path, bool]:
    """A folder with the four Fashion-MNIST files, and whether they are the real ones.

    Where the real files are missing (a GPU machine without network), synthetic ones of the same
    format and size are written: timings hold, accuracies then mean nothing.
    """
    if all((DEBIAN_DIR / name).is_file() for name in FILES):
        return DEBIAN_DIR, True
    folder = Path(tempfile.mkdtemp(prefix="hpsearch-synthetic-fashion-"))
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for lab in range(10):  # a learnable pattern per class: a bright band of rows
            images[labels == lab, 2 + 2 * lab: 4 + 2 * lab, :] = 220
        header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes(), 1))
        header = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big")
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes(), 1))
    return folder, False

"""Data sets → in-memory arrays: train / validation (for the search) and test (for the best only).

Images stay ``uint8`` until they reach the trial's device: a quarter of the memory in Ray's object
store (Fashion-MNIST's 54k training images are 42 MB, not 170 MB), read zero-copy by every trial on
the node. Normalisation (``(x/255 - mean) / std`` with the training split's statistics) happens
once per trial on the device, in :func:`to_device`.

MNIST and Fashion-MNIST come as the four IDX files (``.gz`` or not). They are looked for in
``data.root``, in torchvision's layout below it (``<root>/MNIST/raw``), and in the folder Debian's
``dataset-<name>`` package installs; torchvision downloads them when none is found and
``download: true``. ``digits`` is scikit-learn's 8×8 digits, which ships inside the package.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hpsearch.errors import DataError

if TYPE_CHECKING:
    import torch

    from hpsearch.spec import DataSpec

logger = logging.getLogger(__name__)

# name -> (torchvision class, Debian folder, number of classes)
_IDX_SETS = {
    "mnist": ("MNIST", "/usr/share/datasets/mnist", 10),
    "fashion_mnist": ("FashionMNIST", "/usr/share/datasets/fashion-mnist", 10),
}
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Split:
    """Images (N, C, H, W) as uint8 (or float32 for data sets that are not 8-bit) and int64 labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    """What a search trains on. ``test`` stays in the driver; trials get :meth:`for_trials`."""

    name: str
    train: Split
    val: Split
    test: Split | None
    num_classes: int
    mean: float  # of the training split, on the [0, 1] scale
    std: float
    scale: float  # the value of a white pixel (255 for 8-bit images, 16 for digits)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def for_trials(self) -> Dataset:
        """The same data without the test split: the test set is touched once, for the best trial."""
        return Dataset(self.name, self.train, self.val, None, self.num_classes, self.mean, self.std, self.scale)


def load(spec: DataSpec, *, seed: int) -> Dataset:
    """Load the data set a job names, split off validation (seeded), keep test apart."""
    if spec.dataset == "digits":
        images, labels, test_images, test_labels, scale = _digits(spec, seed=seed)
        num_classes = 10
    else:
        cls_name, _, num_classes = _IDX_SETS[spec.dataset]
        files = _find_idx_files(spec)
        images = _read_idx(files["train_images"], ndim=3)
        labels = _read_idx(files["train_labels"], ndim=1)
        test_images = _read_idx(files["test_images"], ndim=3)
        test_labels = _read_idx(files["test_labels"], ndim=1)
        for img, lab, which in ((images, labels, "train"), (test_images, test_labels, "test")):
            if len(img) != len(lab):
                raise DataError(
                    f"{files[which + '_images'].parent}: {len(img)} {which} images but {len(lab)} labels; "
                    "the files do not belong together (re-download them)"
                )
            if len(lab) and int(lab.max()) >= num_classes:
                raise DataError(f"{files[which + '_labels']}: label {int(lab.max())} is not one of 0..{num_classes - 1}")
        images, test_images = images[:, None], test_images[:, None]  # (N, 1, H, W)
        scale = 255.0

    train_idx, val_idx = split_indices(len(labels), val_fraction=spec.val_fraction, seed=seed)
    train = Split(np.ascontiguousarray(images[train_idx]), labels[train_idx].astype(np.int64))
    val = Split(np.ascontiguousarray(images[val_idx]), labels[val_idx].astype(np.int64))
    test = Split(np.ascontiguousarray(test_images), test_labels.astype(np.int64))

    pixels = train.x.astype(np.float64) / scale
    mean, std = float(pixels.mean()), float(pixels.std()) or 1.0
    logger.info("data %s: %d train, %d val, %d test, shape %s", spec.dataset, len(train), len(val), len(test),
                train.x.shape[1:])
    return Dataset(spec.dataset, train, val, test, num_classes, mean, std, scale)


def split_indices(n: int, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded train/validation split of ``n`` training samples: (train indices, val indices)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def to_device(split: Split, data: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy one split to ``device`` once and normalise it there, as float32."""
    import warnings

    import torch

    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only; we never write to them (the float copy is new).
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(split.x)
        y = torch.from_numpy(split.y)
    x = x.to(device, non_blocking=True).float()
    x.mul_(1.0 / (data.scale * data.std)).sub_(data.mean / data.std)
    return x, y.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# IDX files (MNIST and Fashion-MNIST).
# --------------------------------------------------------------------------------------------


def _candidate_dirs(spec: DataSpec) -> list[Path]:
    cls_name, debian_dir, _ = _IDX_SETS[spec.dataset]
    root = Path(os.path.expanduser(spec.root))
    return [root, root / cls_name / "raw", Path(debian_dir)]


def _find_in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _IDX_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _find_idx_files(spec: DataSpec) -> dict[str, Path]:
    dirs = _candidate_dirs(spec)
    for folder in dirs:
        found = _find_in(folder)
        if found:
            logger.info("reading %s from %s", spec.dataset, folder)
            return found
    root = Path(os.path.expanduser(spec.root))
    names = ", ".join(f"{stem}.gz" for stem in _IDX_FILES.values())
    where = f"put the four files ({names}) into {root} and run again"
    if not spec.download:
        raise DataError(
            f"data.root: no {spec.dataset} IDX files in {' or '.join(map(str, dirs))}; {where}, "
            "or set data.download: true"
        )
    _download(spec, root)
    found = _find_in(root / _IDX_SETS[spec.dataset][0] / "raw")
    if not found:
        raise DataError(f"data.root: the {spec.dataset} download into {root} left no IDX files; {where}")
    return found


def _download(spec: DataSpec, root: Path) -> None:
    cls_name = _IDX_SETS[spec.dataset][0]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.root: cannot create {root} to download {spec.dataset} into: {e}") from None
    import torchvision

    logger.info("downloading %s into %s", spec.dataset, root)
    names = ", ".join(f"{stem}.gz" for stem in _IDX_FILES.values())
    try:
        for train in (True, False):
            getattr(torchvision.datasets, cls_name)(str(root), train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError; all mean "no files"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"data.download: could not download {spec.dataset} ({reason}). Without network access, "
            f"put the four files ({names}) into {root} (or point data.root at a folder that holds them) "
            "and set data.download: false"
        ) from None


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read one IDX file (gzip or plain); refuse a corrupt or truncated one with the file's name."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e}); the file is corrupt or truncated, replace it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number); replace it with the original file")
    if raw[3] != ndim:
        raise DataError(f"{path}: has {raw[3]} dimensions, expected {ndim}; is it the right file?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header; replace the file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, but its header promises {expected}; the file is truncated "
                        "or corrupt, replace it")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(np.uint8 if raw[2] == 0x08 else dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------------
# scikit-learn digits (no test split of its own: one is split off, seeded).
# --------------------------------------------------------------------------------------------


def _digits(spec: DataSpec, *, seed: int) -> tuple[Any, ...]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed + 1).permutation(len(labels))
    n_test = max(1, int(round(spec.test_fraction * len(labels))))
    test_idx, rest = order[:n_test], order[n_test:]
    return images[rest], labels[rest], images[test_idx], labels[test_idx], 16.0

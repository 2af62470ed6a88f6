"""Data sets → in-memory arrays: train / validation (for the search) and test (for the best only).

Images stay ``uint8`` until they reach the trial's device: a quarter of the memory in Ray's object
store (Fashion-MNIST's 54k training images are 42 MB, not 170 MB), read zero-copy by every trial on
the node. Normalisation (``(x/255 - mean) / std`` per channel, with the training split's
statistics) happens on the device, in :func:`to_device` and :func:`normalize`.

``cifar10`` is read from torchvision's ``cifar-10-batches-py`` folder (downloaded by torchvision
when allowed). ``image_folder`` is torchvision's ``ImageFolder`` layout (``<root>/<class>/<image>``,
or ``<root>/train/<class>/...`` with a ``test/`` beside it): decoded once and kept in memory
(``loader: memory``), or, for image sets larger than memory, read from the files by a DataLoader
in each trial (``loader: stream``; the files must be visible to every node).

MNIST and Fashion-MNIST come as the four IDX files (``.gz`` or not). They are looked for in
``data.root``, in torchvision's layout below it (``<root>/MNIST/raw``), and in the folder Debian's
``dataset-<name>`` package installs; torchvision downloads them when none is found and
``download: true``. ``digits`` is scikit-learn's 8×8 digits, which ships inside the package.
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hpsearch.errors import DataError

if TYPE_CHECKING:
    import torch

    from hpsearch.spec import AugmentSpec, DataSpec

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
class Items:
    """Samples of the user's own map-style torch Datasets, read by a DataLoader in each trial:
    (the pickled Dataset, the indices of its samples) per part. Pickled in the driver and read
    back in the trial, once the job's code folders are on its import path."""

    parts: tuple[tuple[bytes, np.ndarray], ...]

    def __len__(self) -> int:
        return sum(len(idx) for _, idx in self.parts)

    def __add__(self, other: Items) -> Items:
        return Items(self.parts + other.parts)

    def dataset(self) -> Any:
        from torch.utils.data import ConcatDataset, Subset

        parts = [Subset(_unpickled(raw), idx.tolist()) for raw, idx in self.parts]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)


@functools.lru_cache(maxsize=4)
def _unpickled(raw: bytes) -> Any:
    import pickle

    return pickle.loads(raw)


@dataclass(frozen=True)
class Split:
    """Samples as an array (images (N, C, H, W) uint8, or a factory's float32 (N, ...)) and int64
    labels; or, streamed, the image files and labels, or a factory's Dataset items."""

    x: np.ndarray | None
    y: np.ndarray
    files: tuple[str, ...] | None = None  # loader: stream (x is None then)
    items: Items | None = None  # a factory's torch Datasets (x is None, y empty then)

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else len(self.y)


@dataclass(frozen=True)
class Dataset:
    """What a search trains on. ``test`` stays in the driver; trials get :meth:`for_trials`."""

    name: str
    train: Split
    val: Split
    test: Split | None
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the training split, on the [0, 1] scale
    std: tuple[float, ...]
    scale: float  # the value of a white pixel (255 for 8-bit images, 16 for digits)
    shape: tuple[int, int, int]  # (C, H, W) of one image as the model receives it
    classes: tuple[str, ...] = ()
    augment: AugmentSpec | None = None  # applied to training batches on the device
    num_workers: int = 0  # DataLoader workers of a streamed data set

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def streamed(self) -> bool:
        return self.train.x is None

    def for_trials(self) -> Dataset:
        """The same data without the test split: the test set is touched once, for the best trial."""
        return replace(self, test=None)


def load(spec: DataSpec, *, seed: int, code: tuple[str, ...] = ()) -> Dataset:
    """Load the data set a job names, split off validation (seeded), keep test apart.

    ``code``: the folders a factory (``dataset: python``) is imported from.
    """
    if spec.dataset == "image_folder":
        return _image_folder(spec, seed=seed)
    if spec.dataset == "python":
        from hpsearch.user_data import from_factory

        return from_factory(spec, seed=seed, code=code)
    classes: tuple[str, ...] = ()
    if spec.dataset == "digits":
        images, labels, test_images, test_labels, scale = _digits(spec, seed=seed)
        num_classes = 10
    elif spec.dataset == "cifar10":
        images, labels, test_images, test_labels, classes = _cifar10(spec)
        num_classes, scale = 10, 255.0
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

    mean, std = channel_stats(train.x, scale)
    logger.info("data %s: %d train, %d val, %d test, shape %s", spec.dataset, len(train), len(val), len(test),
                train.x.shape[1:])
    return Dataset(spec.dataset, train, val, test, num_classes, mean, std, scale, shape=tuple(train.x.shape[1:]),
                   classes=classes, augment=spec.augment)


def channel_stats(x: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of (N, C, H, W) images, on the [0, 1] scale.

    uint8 images (all but digits) are counted into a 256-bin histogram per channel, and the exact
    moments come from it: 0.06 s for Fashion-MNIST where a float64 pass took 2.9 s, on the path
    to the first trial.
    """
    mean, std = [], []
    for c in range(x.shape[1]):
        if x.dtype == np.uint8:
            # In chunks: bincount widens its input to int64, and one 8x copy of the whole set
            # costs more in fresh pages (~1 s) than the counting itself.
            flat = np.ascontiguousarray(x[:, c]).reshape(-1)
            counts = sum((np.bincount(flat[i:i + 2**20], minlength=256) for i in range(0, len(flat), 2**20)),
                         np.zeros(256, np.int64)).astype(np.float64)
            values = np.arange(256, dtype=np.float64) / scale
            m = float(counts @ values / counts.sum())
            var = float(counts @ (values - m) ** 2 / counts.sum())
        else:
            pixels = x[:, c].astype(np.float64) / scale  # one channel at a time: bounded memory
            m, var = float(pixels.mean()), float(pixels.var())
        mean.append(m)
        std.append(math.sqrt(var) or 1.0)
    return tuple(mean), tuple(std)


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
        # Arrays from Ray's object store are read-only; we never write to them (normalize copies).
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(split.x)
        y = torch.from_numpy(split.y)
    return normalize(x.to(device, non_blocking=True), data), y.to(device, non_blocking=True)


def normalize(x: torch.Tensor, data: Dataset) -> torch.Tensor:
    """uint8 (N, C, H, W) images (or a factory's (N, C, ...) / (N, features) inputs) → float32
    ``(x/scale - mean) / std`` per channel (per feature)."""
    mean, std = _channel_tensors(data.mean, data.std, str(x.device), x.dim())
    # A new tensor first, then in place on it: ``x`` itself is never written. For float32 inputs
    # ``x.float()`` is ``x``, and on the CPU ``x`` may be a view of Ray's shared object store, which
    # every trial process maps: normalising it in place normalised the data again in each process.
    return x.float().mul(1.0 / data.scale).sub_(mean).div_(std)


@functools.lru_cache(maxsize=8)
def _channel_tensors(mean: tuple[float, ...], std: tuple[float, ...], device: str, dim: int = 4) -> tuple[Any, Any]:
    # Once per data set and device: a streamed data set normalises every batch with these.
    import torch

    shape = (1, -1) + (1,) * (dim - 2)
    return torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape)


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
    names = ", ".join(f"{stem}.gz" for stem in _IDX_FILES.values())
    _download_with(spec, root, _IDX_SETS[spec.dataset][0],
                   f"put the four files ({names}) into {root} (or point data.root at a folder that holds them)")


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
    images, labels = _digits_arrays()
    images = images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = labels.astype(np.int64)
    order = np.random.default_rng(seed + 1).permutation(len(labels))
    n_test = max(1, int(round(spec.test_fraction * len(labels))))
    test_idx, rest = order[:n_test], order[n_test:]
    return images[rest], labels[rest], images[test_idx], labels[test_idx], 16.0


def _digits_arrays() -> tuple[Any, Any]:
    """scikit-learn's digits as (images (1797, 8, 8), labels), read from the file it ships with: what
    ``load_digits()`` reads, without importing scikit-learn (1.4 s of a small machine's core)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    csv = next((Path(f) / "datasets" / "data" / "digits.csv.gz" for f in folders
                if (Path(f) / "datasets" / "data" / "digits.csv.gz").is_file()), None)
    if csv is None:  # a scikit-learn that keeps it elsewhere
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(csv, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1]


# --------------------------------------------------------------------------------------------
# CIFAR-10, in torchvision's format: cifar-10-batches-py/{data_batch_1..5, test_batch}.
# --------------------------------------------------------------------------------------------

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _cifar10(spec: DataSpec) -> tuple[Any, ...]:
    root = Path(os.path.expanduser(spec.root))
    candidates = [root / _CIFAR_DIR, root]
    folder = next((c for c in candidates if all((c / f).is_file() for f in (*_CIFAR_TRAIN, "test_batch"))), None)
    if folder is None:
        where = (f"put torchvision's {_CIFAR_DIR} folder (data_batch_1..5, test_batch, from "
                 f"cifar-10-python.tar.gz) into {root}")
        if not spec.download:
            raise DataError(f"data.root: no CIFAR-10 batches in {' or '.join(map(str, candidates))}; {where}, "
                            "or set data.download: true")
        _download_with(spec, root, "CIFAR10", where)
        folder = root / _CIFAR_DIR
    parts = [_cifar_batch(folder / name) for name in (*_CIFAR_TRAIN, "test_batch")]
    images = np.concatenate([x for x, _ in parts[:-1]])
    labels = np.concatenate([y for _, y in parts[:-1]])
    classes: tuple[str, ...] = ()
    meta = folder / "batches.meta"
    if meta.is_file():
        classes = tuple(_unpickle(meta).get("label_names", ()))
    return images, labels, parts[-1][0], parts[-1][1], classes


def _unpickle(path: Path) -> dict[str, Any]:
    import pickle

    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # the format CIFAR-10 ships in (as torchvision reads it)
    except Exception as e:
        raise DataError(f"{path}: cannot be read as a CIFAR-10 batch ({type(e).__name__}: {e}); replace the "
                        "file with the original") from None


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    try:
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR-10 batch ({e}); replace the file with the original") from None
    if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"{path}: {len(x)} images, {len(y)} labels in 0..9 expected; replace the file")
    return x, y


def _download_with(spec: DataSpec, root: Path, cls_name: str, where: str) -> None:
    """Download a torchvision data set (``cls_name``, both splits) into ``root``; ``where`` tells
    users without network access where the files go instead."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.root: cannot create {root} to download {spec.dataset} into: {e}") from None
    import torchvision

    logger.info("downloading %s into %s", spec.dataset, root)
    try:
        for train in (True, False):
            getattr(torchvision.datasets, cls_name)(str(root), train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError; all mean "no files"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data.download: could not download {spec.dataset} ({reason}). Without network access, "
                        f"{where} and set data.download: false") from None


# --------------------------------------------------------------------------------------------
# Image folders: torchvision's ImageFolder layout, <root>/<class>/<image>.
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_images(folder: Path) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """(classes, files, labels) of an ImageFolder tree: one sub-folder per class, sorted by name."""
    if not folder.is_dir():
        raise DataError(f"data.root: {folder} is not a folder; image_folder expects <root>/<class>/<image> "
                        "(or <root>/train/<class>/... with <root>/test/ beside it)")
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise DataError(f"data.root: {folder} has no class folders; put each class's images in "
                        f"{folder}/<class name>/")
    files, labels = [], []
    ignored: dict[str, int] = {}
    for label, name in enumerate(classes):
        found = []
        for f in sorted((folder / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(str(f))
            elif f.is_file() and not f.name.startswith("."):
                ignored[f.suffix.lower() or f.name] = ignored.get(f.suffix.lower() or f.name, 0) + 1
        if not found:
            raise DataError(f"{folder / name}: no images ({', '.join(IMAGE_EXTENSIONS)}); every class folder "
                            "needs at least one")
        if len(found) == 1:
            logger.warning("%s: one image only; a class needs several to be both trained on and scored",
                           folder / name)
        files += found
        labels += [label] * len(found)
    if ignored:
        logger.warning("%s: ignored %d file(s) that are not images (%s)", folder, sum(ignored.values()),
                       ", ".join(f"{n} {kind}" for kind, n in sorted(ignored.items())))
    return classes, files, np.asarray(labels, dtype=np.int64)


def check_images(files: list[str]) -> None:
    """Every file opens as an image (its header read, not its pixels): a streamed set's broken
    file is named before any trial, not by every trial that reaches it."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def opens(path: str) -> str | None:
        try:
            with Image.open(path) as img:
                img.verify()
            return None
        except Exception as e:
            return f"{path}: cannot be read as an image ({e}); remove or replace it"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = [p for p in pool.map(opens, files) if p]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def read_image(path: str, size: int) -> np.ndarray:
    """One image file → (3, size, size) uint8, resized (antialiased) as torchvision's Resize would."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    except Exception as e:
        raise DataError(f"{path}: cannot be read as an image ({e}); remove or replace it") from None


def _image_folder(spec: DataSpec, *, seed: int) -> Dataset:
    root = Path(os.path.expanduser(spec.root))
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes, files, labels = find_images(root / "train")
        test_classes, test_files, test_labels = find_images(root / "test")
        if test_classes != classes:
            raise DataError(f"{root}/test: its classes {list(test_classes)} differ from train's {list(classes)}; "
                            "both need the same class folders")
    else:
        classes, all_files, all_labels = find_images(root)
        order = np.random.default_rng(seed + 1).permutation(len(all_labels))
        n_test = max(1, int(round(spec.test_fraction * len(all_labels))))
        test_idx, rest = np.sort(order[:n_test]), np.sort(order[n_test:])
        files, labels = [all_files[i] for i in rest], all_labels[rest]
        test_files, test_labels = [all_files[i] for i in test_idx], all_labels[test_idx]
    if len(labels) < 2:
        raise DataError(f"data.root: {root} has {len(labels)} training image(s); a search needs more")
    train_idx, val_idx = split_indices(len(labels), val_fraction=spec.val_fraction, seed=seed)
    size = spec.image_size
    shape = (3, size, size)

    if spec.loader == "stream":
        check_images(files + test_files)

        def split(idx: Any, names: list[str], y: np.ndarray) -> Split:
            return Split(None, y[idx], tuple(names[i] for i in idx))

        train = split(train_idx, files, labels)
        val = split(val_idx, files, labels)
        test = split(np.arange(len(test_labels)), test_files, test_labels)
        # Statistics from a sample: reading every file of a large set twice is what streaming avoids.
        sample = np.random.default_rng(seed).permutation(len(train))[:512]
        mean, std = channel_stats(np.stack([read_image(train.files[i], size) for i in sample]), 255.0)
    else:
        images = _read_images(files, size)
        train = Split(images[train_idx], labels[train_idx])
        val = Split(images[val_idx], labels[val_idx])
        test = Split(_read_images(test_files, size), test_labels)
        mean, std = channel_stats(train.x, 255.0)
    logger.info("data image_folder %s: %d classes, %d train, %d val, %d test, %s", root, len(classes),
                len(train), len(val), len(test), "streamed" if spec.loader == "stream" else "in memory")
    return Dataset("image_folder", train, val, test, len(classes), mean, std, 255.0, shape=shape,
                   classes=classes, augment=spec.augment, num_workers=spec.num_workers)


def _read_images(files: list[str], size: int) -> np.ndarray:
    """Decode and resize every file into one uint8 array, in threads (PIL releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty((len(files), 3, size, size), dtype=np.uint8)

    def read(i: int) -> None:
        out[i] = read_image(files[i], size)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(read, range(len(files))))
    return out


class ImageFiles:
    """A map-style torch Dataset over image files: (uint8 (3, S, S) tensor, label), for DataLoader."""

    def __init__(self, split: Split, size: int) -> None:
        assert split.files is not None
        self.files, self.labels, self.size = split.files, split.y, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch

        return torch.from_numpy(read_image(self.files[i], self.size)), int(self.labels[i])

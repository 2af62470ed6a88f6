"""``dataset: python``: the user's own data, from a factory the job names (``data.factory``).

The factory is called once, in the driver, with ``data.options`` as keyword arguments. It returns
a mapping (or a ``(train, test)`` pair)::

    {"train": (x, y), "test": (x, y),          # required: train; test is split off if missing
     "val": (x, y),                            # optional: else split off (data.val_fraction)
     "num_classes": 10, "classes": [...],      # optional (required with Datasets)
     "mean": [...], "std": [...]}              # optional normalisation, per channel / feature

where each ``(x, y)`` is two NumPy arrays or tensors (inputs of any shape, integer labels), or
each split is a map-style ``torch.utils.data.Dataset`` of ``(x, label)`` items for data too big
for memory (then each trial reads it through a DataLoader, as for ``loader: stream``).

Everything after is hpsearch's, as for the built-in data: the seeded splits, normalisation
statistics from the training split (unless given), the checks below before any trial, and the
same trials. Arrays travel to the trials through Ray's object store; Datasets are pickled here and
read back in each trial (their class must be importable there: the job's code travels with it).

Refused, with the split, the index and the value: labels that are not integers in
``0..num_classes-1``, inputs and labels of different lengths, NaN or infinite inputs, an empty
split, splits whose samples differ in shape.
"""

from __future__ import annotations

import logging
import math
import pickle
from typing import Any, Mapping

import numpy as np

from hpsearch import entrypoints
from hpsearch.data import Dataset, Items, Split, channel_stats, split_indices
from hpsearch.errors import EntryPointError
from hpsearch.spec import DataSpec

logger = logging.getLogger(__name__)

FIELD = "data.factory"
KEYS = ("train", "val", "test", "num_classes", "classes", "mean", "std")
SAMPLE = 512  # items of a Dataset read to check it and to compute its statistics


def from_factory(spec: DataSpec, *, seed: int, code: tuple[str, ...]) -> Dataset:
    """Call the job's data factory and turn what it returns into a :class:`Dataset`."""
    ref = spec.factory or ""
    fn = entrypoints.load(FIELD, ref, code)
    returned = entrypoints.call(FIELD, ref, fn, **spec.options)
    parts = _parts(ref, returned)
    given = {name: _split(ref, name, parts[name]) for name in ("train", "val", "test") if parts.get(name) is not None}
    if "train" not in given:
        raise _bad(ref, "returned no training data: give a 'train' entry, (x, y) or a Dataset")

    arrays = [s for s in given.values() if s.x is not None]
    shapes = {name: _sample_shape(s) for name, s in given.items()}
    if len(set(shapes.values())) > 1:
        raise _bad(ref, "the splits' samples differ in shape: " + ", ".join(f"{n} {shapes[n]}" for n in shapes))
    num_classes = _num_classes(ref, parts.get("num_classes"), given)

    train = given["train"]
    test = given.get("test")
    if test is None:  # split off, seeded (like digits and image folders)
        rest, test_idx = split_indices(len(train), val_fraction=spec.test_fraction, seed=seed + 1)
        train, test = _subset(train, rest), _subset(train, test_idx)
    val = given.get("val")
    if val is None:
        train_idx, val_idx = split_indices(len(train), val_fraction=spec.val_fraction, seed=seed)
        train, val = _subset(train, train_idx), _subset(train, val_idx)
    for name, s in (("train", train), ("val", val), ("test", test)):
        if len(s) == 0:
            raise _bad(ref, f"the {name} split is empty; give it samples (or more data to split it from)")

    sample = train.x if train.x is not None else _read_sample(ref, train)[0]
    scale = 255.0 if sample.dtype == np.uint8 else 1.0
    mean, std = _statistics(ref, parts, sample, scale)
    shape = shapes["train"]
    if (spec.augment.crop_padding or spec.augment.horizontal_flip) and len(shape) != 3:
        raise EntryPointError(f"data.augment: random crops and flips apply to images (C, H, W); {ref} gives "
                              f"samples of shape {shape}")
    classes = tuple(str(c) for c in parts.get("classes") or ())
    if classes and len(classes) != num_classes:
        raise _bad(ref, f"gives {len(classes)} class names for {num_classes} classes")
    logger.info("data %s: %d train, %d val, %d test, samples of shape %s%s", ref, len(train), len(val), len(test),
                shape, "" if arrays else ", read by a DataLoader")
    return Dataset(ref, train, val, test, num_classes, mean, std, scale, shape=shape, classes=classes,
                   augment=spec.augment, num_workers=spec.num_workers)


def _bad(ref: str, problem: str) -> EntryPointError:
    return EntryPointError(f"{FIELD}: {ref} {problem}")


def _parts(ref: str, returned: Any) -> dict[str, Any]:
    if isinstance(returned, Mapping):
        unknown = [k for k in returned if k not in KEYS]
        if unknown:
            raise _bad(ref, f"returned unknown keys {unknown} (known: {', '.join(KEYS)})")
        return dict(returned)
    if isinstance(returned, tuple) and len(returned) == 2:
        return {"train": returned[0], "test": returned[1]}
    if isinstance(returned, tuple) and len(returned) == 4:
        return {"train": returned[:2], "test": returned[2:]}
    raise _bad(ref, f"returned a {type(returned).__name__}; return a mapping {{'train': (x, y), 'test': (x, y), ...}}"
                    ", a (train, test) pair, or (x_train, y_train, x_test, y_test)")


def _is_array(value: Any) -> bool:
    return isinstance(value, (list, np.ndarray)) or (hasattr(value, "shape") and hasattr(value, "dtype"))


def _split(ref: str, name: str, value: Any) -> Split:
    """One split as hpsearch keeps it: arrays checked and converted, or a Dataset pickled."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and _is_array(value[0]):
        return _arrays(ref, name, value[0], value[1])
    if hasattr(value, "__getitem__") and hasattr(value, "__len__") and not _is_array(value):
        try:
            raw = pickle.dumps(value)
        except Exception as e:
            raise _bad(ref, f"{name}: its {type(value).__name__} cannot be sent to the trials (pickle: {e}); a "
                            "Dataset should hold paths or arrays, and open files in __getitem__") from None
        split = Split(None, np.empty(0, np.int64), items=Items(((raw, np.arange(len(value))),)))
        _read_sample(ref, split, name)  # its first items checked now, not in a trial
        return split
    raise _bad(ref, f"{name}: expected (inputs, labels) as arrays or tensors, or a map-style torch Dataset; "
                    f"got a {type(value).__name__}")


def _numpy(ref: str, where: str, value: Any) -> np.ndarray:
    try:
        if hasattr(value, "detach"):  # a torch tensor, perhaps on a GPU
            value = value.detach().cpu().numpy()
        return np.asarray(value)
    except Exception as e:
        raise _bad(ref, f"{where}: cannot be read as an array ({e})") from None


def _arrays(ref: str, name: str, x: Any, y: Any) -> Split:
    x, y = _numpy(ref, f"{name} inputs", x), _numpy(ref, f"{name} labels", y)
    if x.ndim == 0 or y.ndim != 1:
        raise _bad(ref, f"{name}: inputs must be (samples, ...) and labels (samples,), got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise _bad(ref, f"{name}: {len(x)} inputs but {len(y)} labels; give one label per sample")
    if x.dtype.kind not in "biuf":
        raise _bad(ref, f"{name} inputs: must be numbers, got dtype {x.dtype}")
    x = x[:, None] if x.ndim == 1 else x  # one feature per sample
    if x.dtype != np.uint8:
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.dtype != np.uint8 and len(x):
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            value = x.reshape(len(x), -1)[i][~np.isfinite(x.reshape(len(x), -1)[i])][0]
            raise _bad(ref, f"{name} inputs: sample {i} holds {value}; inputs must be finite (fill or drop "
                            f"missing values), {int(bad.sum())} samples do")
    return Split(np.ascontiguousarray(x), _labels(ref, name, y))


def _labels(ref: str, name: str, y: np.ndarray, offset: int = 0) -> np.ndarray:
    if y.dtype.kind == "f":
        whole = np.isfinite(y) & (y == np.round(y))
        if not whole.all():
            i = int(np.argmax(~whole))
            raise _bad(ref, f"{name} labels: label {i + offset} is {y[i]}; labels are class indices 0, 1, 2, ...")
    elif y.dtype.kind not in "biu":
        raise _bad(ref, f"{name} labels: must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        i = int(np.argmin(y))
        raise _bad(ref, f"{name} labels: label {i + offset} is {y[i]}; labels are class indices 0, 1, 2, ...")
    return y


def _read_sample(ref: str, split: Split, name: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The first items of a Dataset split (inputs stacked, labels), checked like arrays are."""
    assert split.items is not None
    data = split.items.dataset()
    xs, ys = [], []
    for i in range(min(SAMPLE, len(data))):
        try:
            item = data[i]
            x, y = item
        except Exception as e:
            raise _bad(ref, f"{name}: item {i} cannot be read as (input, label): {type(e).__name__}: {e}",
                       ) from None
        xs.append(_numpy(ref, f"{name} item {i}", x))
        ys.append(_numpy(ref, f"{name} item {i}'s label", y).reshape(-1)[:1])
    if not xs:
        return np.empty((0, 1), np.float32), np.empty(0, np.int64)
    if len({a.shape for a in xs}) > 1:
        raise _bad(ref, f"{name}: its items differ in shape ({xs[0].shape} and others); batches need one shape")
    x = np.stack(xs)
    checked = _arrays(ref, f"{name} (its first {len(xs)} items)", x, np.concatenate(ys))
    return (x if x.dtype == np.uint8 else checked.x), checked.y


def _sample_shape(split: Split) -> tuple[int, ...]:
    if split.x is not None:
        return tuple(split.x.shape[1:])
    first = np.asarray(split.items.dataset()[0][0]) if len(split) else np.empty(1)  # type: ignore[union-attr]
    return tuple(first.shape) or (1,)


def _num_classes(ref: str, given: Any, splits: dict[str, Split]) -> int:
    labelled = {name: s.y if s.items is None else _read_sample(ref, s, name)[1] for name, s in splits.items()}
    if given is None:
        if any(s.items is not None for s in splits.values()):
            raise _bad(ref, "returned Datasets; say how many classes with 'num_classes' in the mapping it returns")
        given = int(max(int(y.max()) for y in labelled.values() if len(y))) + 1
    if not isinstance(given, int) or isinstance(given, bool) or given < 2:
        raise _bad(ref, f"num_classes must be an integer >= 2, got {given!r}")
    for name, y in labelled.items():
        if len(y) and y.max() >= given:
            i = int(np.argmax(y))
            raise _bad(ref, f"{name} labels: label {i} is {y[i]}, not one of 0..{given - 1} (num_classes {given})")
    return given


def _subset(split: Split, idx: np.ndarray) -> Split:
    if split.items is not None:
        ((raw, base),) = split.items.parts
        return Split(None, split.y, items=Items(((raw, base[idx]),)))
    return Split(np.ascontiguousarray(split.x[idx]), split.y[idx])


def _statistics(ref: str, parts: Mapping[str, Any], sample: np.ndarray, scale: float) -> tuple[tuple[float, ...], ...]:
    """Per channel (per feature) mean and std on the [0, 1] scale hpsearch normalises with: the
    factory's own (on its inputs' scale), or the training split's."""
    channels = sample.shape[1]
    if parts.get("mean") is None and parts.get("std") is None:
        return channel_stats(sample, scale)
    out = []
    for key, fallback in (("mean", 0.0), ("std", 1.0)):
        value = parts.get(key)
        values = [fallback] * channels if value is None else list(np.asarray(value, dtype=np.float64).reshape(-1))
        if len(values) == 1:
            values = values * channels
        if len(values) != channels or not all(math.isfinite(v) for v in values) or (key == "std" and min(values) <= 0):
            raise _bad(ref, f"{key}: expected {channels} finite values (one per channel / feature)"
                            f"{', each > 0' if key == 'std' else ''}, got {value!r}")
        out.append(tuple(v / scale for v in values))
    return out[0], out[1]

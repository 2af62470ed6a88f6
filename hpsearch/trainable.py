"""The one training function that runs every trial.

It knows torch, not Ray or MLflow: whoever calls it passes a ``report(metrics, state)`` callable
(``ray.tune.report`` wrapped by :mod:`hpsearch.tune.trial`, ``list.append`` in a test, a timer in a benchmark) and,
to resume, the ``state`` a previous report handed out.

Why it is shaped this way (measured, see DESIGN.md and benchmarks/):
- The data is copied to the trial's device once and batched by indexing with a random permutation
  each epoch: no per-sample ``Dataset.__getitem__``, no per-batch host→device copy. Image sets too
  large for memory (``loader: stream``) go through a DataLoader with workers and pinned memory.
- Augmentation (random crop, flip) runs on the device, on whole batches.
- No host sync per step: losses are summed on the device and read once per epoch.
- Evaluation runs in large batches under ``torch.inference_mode()``.
- One thread per CPU the trial holds: more threads than cores fight each other.
- Convolutional models run channels-last on the CPU: 1.3–1.5× faster per training step than the
  default layout for the small CNNs of jobs/fashion_mnist_cnn.yaml on one thread
  (benchmarks/cnn_layout.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hpsearch.data import Dataset, ImageFiles, Split, normalize, to_device
from hpsearch.models import build_model, build_optimizer, set_learning_rate
from hpsearch.spec import AugmentSpec, ModelSpec

Report = Callable[[dict[str, Any], "dict[str, Any] | None"], None]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

EVAL_BATCH = 8192  # samples per evaluation forward pass of in-memory data
EVAL_BATCH_BYTES = 256 * 2**20  # ...fewer when images are large (about this much input per pass)


def train(
    config: Mapping[str, Any],
    *,
    data: Dataset,
    model_spec: ModelSpec,
    report: Report,
    state: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
    seed: int = 0,
    pretrained: Mapping[str, Any] | None = None,
    validate_every_epoch: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train one configuration, reporting after every epoch. Returns the last metrics reported.

    ``report`` receives ``epoch, train_loss, val_loss, val_accuracy, diverged, epoch_time_s`` and
    the state to checkpoint (model, optimizer, epoch); the state holds live tensors, so save or copy
    it before returning. A non-finite training loss ends the trial at
    once: the epoch is reported with ``diverged=True`` and NaN metrics, without a checkpoint.
    ``pretrained``: ResNet-18's starting weights (:func:`hpsearch.models.pretrained_weights`).
    ``validate_every_epoch=False``: score ``data.val`` after the last epoch only (the others
    report NaN validation metrics): the final retraining, whose ``val`` is the test set.
    ``stop_after``: end after this epoch, the learning-rate schedule still that of ``epochs``.
    """
    # one piece: the training loop of a PyTorch tutorial, read top to bottom (set-up, epochs,
    # report); split, its hot path would hide behind calls.
    # -- setup --------------------------------------------------------------------------------
    hp = model_spec.resolve(config)
    device = torch.device(device)
    if num_threads is not None and device.type == "cpu":
        torch.set_num_threads(max(1, int(num_threads)))
    torch.manual_seed(seed)
    batch_size, epochs = int(hp["batch_size"]), int(hp["epochs"])
    last_epoch = min(epochs, stop_after) if stop_after else epochs

    # -- model, and the data as batches (resident data: onto the device once per worker) -------
    model, source = _model_and_batches(model_spec, hp, data, device,
                                       pretrained=None if state is not None else pretrained)
    optimizer = build_optimizer(model, hp, device=device)
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])

    # -- the loop -----------------------------------------------------------------------------
    metrics: dict[str, Any] = {}
    generator = torch.Generator(device=device)
    for epoch in range(start_epoch + 1, last_epoch + 1):
        t0 = time.perf_counter()
        # Seeded per epoch, so a trial resumed from a checkpoint sees the batches (and dropout masks
        # and augmentations) it would have seen.
        generator.manual_seed(seed * 1_000_003 + epoch)
        torch.manual_seed(seed * 1_000_003 + epoch)
        set_learning_rate(optimizer, schedule=hp["lr_schedule"], epoch=epoch, epochs=epochs)
        train_loss = train_epoch(model, optimizer, source.train_batches(batch_size, generator),
                                 augment=data.augment, generator=generator)
        if not math.isfinite(train_loss):
            nan = float("nan")
            metrics = {"epoch": epoch, "train_loss": nan, "val_loss": nan, "val_accuracy": nan,
                       "diverged": True, "epoch_time_s": time.perf_counter() - t0}
            report(metrics, None)
            return metrics
        if validate_every_epoch or epoch == last_epoch:
            val_loss, val_accuracy = evaluate(model, source.eval_batches(data.val))
        else:
            val_loss = val_accuracy = float("nan")
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy,
                   "diverged": False, "epoch_time_s": time.perf_counter() - t0}
        report(metrics, {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    return metrics


def _model_and_batches(model_spec: ModelSpec, hp: Mapping[str, Any], data: Dataset, device: torch.device, *,
                       pretrained: Mapping[str, Any] | None = None) -> tuple[nn.Module, BatchSource]:
    """The model on ``device`` and the source of its batches, in one memory layout."""
    model = build_model(model_spec, hp, input_shape=data.input_shape, num_classes=data.num_classes,
                        pretrained=pretrained).to(device)
    # Convolutions on the CPU are markedly faster channels-last; CUDA picks its own layouts well.
    # Not for a factory's model: its own code may view() its inputs, which needs them contiguous.
    channels_last = model_spec.kind in ("cnn", "resnet18") and device.type == "cpu" and len(data.input_shape) == 3
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, BatchSource(data, device, channels_last=channels_last)


class BatchSource:
    """Normalised ``(x, y)`` batches on the trial's device, from resident tensors or streamed files."""

    def __init__(self, data: Dataset, device: torch.device, *, channels_last: bool = False) -> None:
        self.data, self.device, self.channels_last = data, device, channels_last

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Batches:
        if not self.data.streamed:
            x, y, _, _ = resident(self.data, self.device, channels_last=self.channels_last)
            return shuffled_batches(x, y, batch_size=batch_size, generator=generator)
        # The DataLoader shuffles with its own CPU generator, seeded from the trial's.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        return self._stream(self.data.train, batch_size, shuffle=True, seed=seed)

    def eval_batches(self, split: Split) -> Batches:
        if split is self.data.val and not self.data.streamed:
            _, _, x, y = resident(self.data, self.device, channels_last=self.channels_last)
            return in_batches(x, y, batch_size=eval_batch(self.data))
        if split.x is not None:
            x, y = _on_device(split, self.data, self.device, self.channels_last)
            return in_batches(x, y, batch_size=eval_batch(self.data))
        return self._stream(split, 256, shuffle=False, seed=0)

    def _stream(self, split: Split, batch_size: int, *, shuffle: bool, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        workers = self.data.num_workers
        items = split.items.dataset() if split.items is not None else ImageFiles(split, self.data.input_shape[-1])
        loader = DataLoader(
            items, batch_size=batch_size, shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed), num_workers=workers,
            pin_memory=self.device.type == "cuda", drop_last=shuffle and len(split) % batch_size == 1,
            persistent_workers=False, prefetch_factor=4 if workers else None,
        )
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in loader:
            x = normalize(x.to(self.device, non_blocking=True), self.data).contiguous(memory_format=memory_format)
            yield x, y.to(self.device, non_blocking=True).long()


def eval_batch(data: Dataset) -> int:
    per_image = 4 * max(1, int(torch.Size(data.input_shape).numel()))
    return max(64, min(EVAL_BATCH, EVAL_BATCH_BYTES // per_image))


_RESIDENT: dict[tuple, tuple[torch.Tensor, ...]] = {}


def resident(data: Dataset, device: torch.device, *, channels_last: bool = False) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val) on ``device``, normalised; kept for the process's next trial.

    A reused actor runs trial after trial on the same data: copying and normalising it again
    (~0.15 s for Fashion-MNIST) is pure overhead. Training only reads these tensors.
    """
    key = (data.name, data.train.x.shape, data.val.x.shape, data.mean, data.std, str(device), channels_last)
    if key not in _RESIDENT:
        _RESIDENT.clear()  # one data set at a time per process
        _RESIDENT[key] = (*_on_device(data.train, data, device, channels_last),
                          *_on_device(data.val, data, device, channels_last))
    return _RESIDENT[key]


def _on_device(split: Split, data: Dataset, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, ...]:
    x, y = to_device(split, data, device)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                     generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (x, y) in random order, by indexing: the data never leaves the device."""
    n = len(y)
    # A last batch of one sample breaks BatchNorm in training mode; drop just that sample.
    stop = n - 1 if n % batch_size == 1 and n > 1 else n
    perm = torch.randperm(n, device=x.device, generator=generator)
    for start in range(0, stop, batch_size):
        idx = perm[start:min(start + batch_size, stop)]
        yield x[idx], y[idx]


def in_batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int = EVAL_BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(y), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    *,
    augment: AugmentSpec | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """One pass over the batches; returns the mean batch loss (NaN/inf if it diverged)."""
    model.train()
    total: torch.Tensor | None = None
    steps = 0
    augmenting = augment is not None and bool(augment.crop_padding or augment.horizontal_flip)
    for x, y in batches:
        if augmenting:
            x = augment_batch(x, augment, generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = loss.detach() if total is None else total + loss.detach()  # on the device: no sync per step
        steps += 1
    return float(total) / steps if total is not None else float("nan")


def augment_batch(x: torch.Tensor, augment: AugmentSpec, generator: torch.Generator | None) -> torch.Tensor:
    """Random crops of the padded images and random horizontal flips, per image, on the device."""
    n, c, h, w = x.shape
    if augment.horizontal_flip:
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    p = augment.crop_padding
    if p:
        # Zero padding is the mean colour after normalisation. Each image picks its own offset:
        # gather its rows, then its columns, from the padded batch.
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * p)
        padded = padded.gather(2, rows)
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
        x = padded.gather(3, cols)
    return x


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over the batches."""
    model.eval()
    loss_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    n = 0
    for x, y in batches:
        out = model(x)
        batch_loss = F.cross_entropy(out, y, reduction="sum")
        batch_correct = (out.argmax(dim=1) == y).sum()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        n += len(y)
    if n == 0:
        return float("nan"), float("nan")
    return float(loss_sum) / n, int(correct) / n


def retrain(
    config: Mapping[str, Any],
    *,
    data: Dataset,
    model_spec: ModelSpec,
    epochs: int,
    seed: int,
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
    pretrained: Mapping[str, Any] | None = None,
) -> float:
    """The final score of a configuration: trained from scratch on train + validation with
    ``seed`` up to ``epochs`` (the epoch the search picked; the learning-rate schedule is the
    configuration's own, over its planned epochs), then scored once on the test set. NaN if it
    diverged.

    The search picked the configuration (and its epoch) on the validation split, so its own
    checkpoint's validation accuracy is optimistic and its training saw 1 - val_fraction of the
    data; this score is neither.
    """
    assert data.test is not None, "retraining needs the driver's data, with its test split"
    final = replace(data, train=join_splits(data.train, data.val), val=data.test, test=None)
    last = train(config, data=final, model_spec=model_spec, report=lambda m, s: None, device=device,
                 num_threads=num_threads, seed=seed, pretrained=pretrained, validate_every_epoch=False,
                 stop_after=int(epochs))
    return float("nan") if last.get("diverged") else float(last["val_accuracy"])


def join_splits(a: Split, b: Split) -> Split:
    """Both splits' samples in one (training on train + validation)."""
    import numpy as np

    x = None if a.x is None or b.x is None else np.concatenate([a.x, b.x])
    files = None if a.files is None or b.files is None else tuple(a.files) + tuple(b.files)
    items = None if a.items is None or b.items is None else a.items + b.items
    return Split(x, np.concatenate([a.y, b.y]), files, items)


def score_test_set(
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    data: Dataset,
    model_spec: ModelSpec,
    device: str | torch.device = "cpu",
) -> float:
    """Accuracy of a checkpointed model on the held-out test split (touched once, for the best)."""
    assert data.test is not None, "test_accuracy needs the driver's data, with its test split"
    device = torch.device(device)
    hp = model_spec.resolve(config)
    model, source = _model_and_batches(model_spec, hp, data, device)
    model.load_state_dict(state["model"])
    return evaluate(model, source.eval_batches(data.test))[1]


def check_model(config: Mapping[str, Any], *, data: Dataset, model_spec: ModelSpec) -> None:
    """Build a factory's model once, in the driver, and run two validation samples through it and
    back: a factory that raises or returns what cannot be trained stops the search before any
    trial, with the entry point named. Raises :class:`hpsearch.errors.EntryPointError`."""
    from hpsearch.errors import EntryPointError

    hp = model_spec.resolve(config)
    data = replace(data, num_workers=0)  # two samples: no DataLoader workers for them
    model, source = _model_and_batches(model_spec, hp, data, torch.device("cpu"))
    x, y = next(iter(source.eval_batches(data.val)))
    x, y = x[:2], y[:2]
    where = f"model.factory: {model_spec.factory}"
    if not any(p.requires_grad for p in model.parameters()):
        raise EntryPointError(f"{where}: its model has no trainable parameters (hyperparameters {hp})")
    model.train()
    try:
        out = model(x)
    except Exception as e:
        from hpsearch.entrypoints import user_traceback

        raise EntryPointError(f"{where}: its model fails on a batch of shape {tuple(x.shape)} "
                              f"(the data's samples are {tuple(data.input_shape)}): {type(e).__name__}: {e}",
                              user_traceback(e)) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(y), data.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EntryPointError(f"{where}: its model must return one score per class, (batch, {data.num_classes}), "
                              f"for a batch of shape {tuple(x.shape)}; it returned {got}")
    F.cross_entropy(out, y).backward()


# --------------------------------------------------------------------------------------------
# What the Tune side needs of torch: devices, checkpoint files, the best model's test score.
# (hpsearch.tune and hpsearch.search never import torch themselves.)
# --------------------------------------------------------------------------------------------


class TrialOutOfMemory(RuntimeError):
    """A trial ran out of GPU memory (one line a user can act on, not the allocator's page)."""


def pick_device(gpus: float) -> str:
    """``cuda`` for a trial that holds a GPU on a machine that has one, else ``cpu``."""
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def train_on_device(config: Mapping[str, Any], *, gpus: float, cpus: float, **kwargs: Any) -> dict[str, Any]:
    """:func:`train` on the trial's device and threads; CUDA's out-of-memory error said plainly."""
    try:
        return train(config, device=pick_device(gpus), num_threads=max(1, int(cpus)), **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise TrialOutOfMemory(
            f"CUDA out of memory (batch_size={config.get('batch_size')}, "
            f"{gpus:g} GPU per trial): use a smaller batch_size, or fewer trials per GPU "
            "(a larger resources.gpu)"
        ) from None


def save_state(state: Mapping[str, Any], file: Any) -> None:
    """Write a checkpoint's state (model, optimizer, epoch) to a path or an open binary file."""
    torch.save(dict(state), file)


def load_state(raw: bytes) -> dict[str, Any]:
    """A checkpoint's state from its bytes, on the CPU (tensors only: no pickled code runs)."""
    import io

    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def score_checkpoint(raw: bytes, config: Mapping[str, Any], *, data: Dataset, model_spec: ModelSpec,
                     gpus: float) -> tuple[float, Callable[[Any], None]]:
    """The test accuracy of a checkpoint (its ``state.pt`` bytes), and a function that writes its
    model's weights to an open binary file (``best_model.pt``)."""
    state = load_state(raw)
    accuracy = score_test_set(state, config, data=data, model_spec=model_spec, device=pick_device(gpus))
    return accuracy, lambda f: torch.save(state["model"], f)


def retrain_on_device(config: Mapping[str, Any], *, gpus: float, cpus: float, **kwargs: Any) -> float:
    """:func:`retrain` on the task's device and threads."""
    return retrain(config, device=pick_device(gpus), num_threads=max(1, int(cpus)), **kwargs)

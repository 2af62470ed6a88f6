"""The one training function that runs every trial.

It knows torch, not Ray or MLflow: whoever calls it passes a ``report(metrics, state)`` callable
(``ray.tune.report`` wrapped by the runner, ``list.append`` in a test, a timer in a benchmark) and,
to resume, the ``state`` a previous report handed out.

Why it is shaped this way (measured, see DESIGN.md and benchmarks/):
- The data is copied to the trial's device once and batched by indexing with a random permutation
  each epoch: no per-sample ``Dataset.__getitem__``, no per-batch host→device copy.
- No host sync per step: losses are summed on the device and read once per epoch.
- Evaluation runs in large batches under ``torch.inference_mode()``.
- One thread per CPU the trial holds: more threads than cores fight each other.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hpsearch.data import Dataset, to_device
from hpsearch.models import build_model, build_optimizer
from hpsearch.spec import ModelSpec, resolve_hyperparameters

Report = Callable[[dict[str, Any], "dict[str, Any] | None"], None]

EVAL_BATCH = 8192  # samples per evaluation forward pass; memory is small for MLP-sized models


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
) -> dict[str, Any]:
    """Train one configuration, reporting after every epoch. Returns the last metrics reported.

    ``report`` receives ``epoch, train_loss, val_loss, val_accuracy, diverged, epoch_time_s`` and
    the state to checkpoint (model, optimizer, epoch); the state holds live tensors, so save or copy
    it before returning. A non-finite training loss ends the trial at
    once: the epoch is reported with ``diverged=True`` and NaN metrics, without a checkpoint.
    """
    # -- setup --------------------------------------------------------------------------------
    hp = resolve_hyperparameters(config)
    device = torch.device(device)
    if num_threads is not None and device.type == "cpu":
        torch.set_num_threads(max(1, int(num_threads)))
    torch.manual_seed(seed)

    # -- data: onto the device once (and once per worker: Tune reuses it for the next trials) --
    x_train, y_train, x_val, y_val = resident(data, device)

    # -- model and optimizer ------------------------------------------------------------------
    model = build_model(model_spec, hp, input_shape=data.input_shape, num_classes=data.num_classes).to(device)
    optimizer = build_optimizer(model.parameters(), hp, device=device)
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])

    # -- the loop -----------------------------------------------------------------------------
    metrics: dict[str, Any] = {}
    generator = torch.Generator(device=device)
    for epoch in range(start_epoch + 1, int(hp["epochs"]) + 1):
        t0 = time.perf_counter()
        # Seeded per epoch, so a trial resumed from a checkpoint sees the batches (and dropout masks)
        # it would have seen.
        generator.manual_seed(seed * 1_000_003 + epoch)
        torch.manual_seed(seed * 1_000_003 + epoch)
        train_loss = train_epoch(model, optimizer, x_train, y_train,
                                 batch_size=int(hp["batch_size"]), generator=generator)
        if not math.isfinite(train_loss):
            nan = float("nan")
            metrics = {"epoch": epoch, "train_loss": nan, "val_loss": nan, "val_accuracy": nan,
                       "diverged": True, "epoch_time_s": time.perf_counter() - t0}
            report(metrics, None)
            return metrics
        val_loss, val_accuracy = evaluate(model, x_val, y_val)
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy,
                   "diverged": False, "epoch_time_s": time.perf_counter() - t0}
        report(metrics, {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    return metrics


_RESIDENT: dict[tuple, tuple[torch.Tensor, ...]] = {}


def resident(data: Dataset, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val) on ``device``, normalised; kept for the process's next trial.

    A reused actor runs trial after trial on the same data: copying and normalising it again
    (~0.15 s for Fashion-MNIST) is pure overhead. Training only reads these tensors.
    """
    key = (data.name, data.train.x.shape, data.val.x.shape, data.mean, data.std, str(device))
    if key not in _RESIDENT:
        _RESIDENT.clear()  # one data set at a time per process
        _RESIDENT[key] = (*to_device(data.train, data, device), *to_device(data.val, data, device))
    return _RESIDENT[key]


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One pass over (x, y) in random order; returns the mean batch loss (NaN/inf if it diverged)."""
    model.train()
    n = len(y)
    # A last batch of one sample breaks BatchNorm in training mode; drop just that sample.
    stop = n - 1 if n % batch_size == 1 and n > 1 else n
    perm = torch.randperm(n, device=x.device, generator=generator)
    total = torch.zeros((), device=x.device)
    steps = 0
    for start in range(0, stop, batch_size):
        idx = perm[start:min(start + batch_size, stop)]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()  # stays on the device: no sync per step
        steps += 1
    return float(total) / max(steps, 1)


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in large batches."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(y), batch_size):
        out = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss_sum += F.cross_entropy(out, target, reduction="sum")
        correct += (out.argmax(dim=1) == target).sum()
    n = max(len(y), 1)
    return float(loss_sum) / n, int(correct) / n


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
    hp = resolve_hyperparameters(config)
    model = build_model(model_spec, hp, input_shape=data.input_shape, num_classes=data.num_classes).to(device)
    model.load_state_dict(state["model"])
    x_test, y_test = to_device(data.test, data, device)
    return evaluate(model, x_test, y_test)[1]

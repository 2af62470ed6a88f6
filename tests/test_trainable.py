"""The training function on its own: report = list.append, no Ray."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hpsearch.data import load
from hpsearch.spec import DataSpec, ModelSpec
from hpsearch.trainable import score_test_set, train


@pytest.fixture(scope="module")
def digits():
    return load(DataSpec(dataset="digits"), seed=0)


def _train(data, config, state=None):
    reports: list[tuple[dict, dict | None]] = []
    train(config, data=data.for_trials(), model_spec=ModelSpec(), report=lambda m, s: reports.append((m, copy.deepcopy(s))),
          state=state, num_threads=1, seed=0)
    return reports


def test_reports_every_epoch_and_learns(digits) -> None:
    reports = _train(digits, {"epochs": 5, "learning_rate": 0.01, "batch_size": 32})
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3, 4, 5]
    for m, state in reports:
        assert set(m) >= {"epoch", "train_loss", "val_loss", "val_accuracy", "diverged"}
        assert state is not None and state["epoch"] == m["epoch"]
    assert reports[-1][0]["val_accuracy"] > 0.85
    assert reports[-1][0]["train_loss"] < reports[0][0]["train_loss"]
    assert score_test_set(reports[-1][1], {"epochs": 5}, data=digits, model_spec=ModelSpec()) > 0.85


def test_resumes_from_a_checkpoint_where_it_left_off(digits) -> None:
    config = {"epochs": 4, "learning_rate": 0.01, "batch_size": 32, "optimizer": "SGD", "momentum": 0.9}
    full = _train(digits, config)
    resumed = _train(digits, config, state=full[1][1])  # as if the trial crashed after epoch 2
    assert [m["epoch"] for m, _ in resumed] == [3, 4]
    # Same batches, same weights: the resumed run ends where the uninterrupted one did.
    assert resumed[-1][0]["val_loss"] == pytest.approx(full[-1][0]["val_loss"], rel=1e-4)


def test_non_finite_loss_ends_the_trial_in_its_first_epoch(digits) -> None:
    reports = _train(digits, {"epochs": 20, "learning_rate": 1e12, "optimizer": "SGD", "batch_size": 16})
    assert len(reports) == 1
    metrics, state = reports[0]
    assert metrics["diverged"] is True and math.isnan(metrics["val_accuracy"]) and state is None


def test_every_optimizer_and_no_batch_norm(digits) -> None:
    for opt in ("Adam", "AdamW", "SGD"):
        reports: list = []
        train({"epochs": 1, "optimizer": opt, "num_hidden_layers": 0}, data=digits.for_trials(),
              model_spec=ModelSpec(batch_norm=False), report=lambda m, s: reports.append(m), num_threads=1)
        assert len(reports) == 1 and not reports[0]["diverged"]


def test_threads_follow_the_trial_cpus(digits) -> None:
    before = torch.get_num_threads()
    try:
        train({"epochs": 1}, data=digits.for_trials(), model_spec=ModelSpec(), report=lambda m, s: None,
              num_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cuda_out_of_memory_is_said_as_one_line_a_user_can_act_on(digits, monkeypatch: pytest.MonkeyPatch) -> None:
    # Raised as torch raises it on a GPU; tested on the CPU through the trial's training call.
    from hpsearch import trainable

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(trainable, "train", out_of_memory)
    with pytest.raises(trainable.TrialOutOfMemory) as caught:
        trainable.train_on_device({"batch_size": 4096}, gpus=0.25, cpus=1, data=digits, model_spec=ModelSpec(),
                                  report=lambda m, s: None)
    message = str(caught.value)
    assert "batch_size=4096" in message and "0.25 GPU per trial" in message and "smaller batch_size" in message
    assert caught.value.__cause__ is None and "Tried to allocate" not in message  # the allocator's page, gone

"""Model builders (mlp, cnn, resnet18), the learning-rate schedule and on-device augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpsearch.errors import ModelError
from hpsearch.models import ResNet18Transfer, build_model, build_optimizer, pretrained_weights, set_learning_rate
from hpsearch.hyperparameters import resolve_hyperparameters
from hpsearch.spec import AugmentSpec, ModelSpec
from hpsearch.trainable import augment_batch


def _hp(**kw):
    return resolve_hyperparameters(kw)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_cnn_takes_one_and_three_channel_images(shape) -> None:
    model = build_model(ModelSpec(kind="cnn"), _hp(conv_blocks=4, conv_channels=8, kernel_size=5), input_shape=shape,
                        num_classes=7)
    assert model(torch.randn(5, *shape)).shape == (5, 7)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64] and convs[0].kernel_size == (5, 5)
    # 8x8 images pool three times (8 -> 4 -> 2 -> 1); the fourth block keeps 1x1.
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == (3 if shape[1] == 8 else 4)


def test_image_size_resizes_on_the_way_in() -> None:
    model = build_model(ModelSpec(kind="mlp"), _hp(image_size=14, num_hidden_layers=1), input_shape=(1, 28, 28),
                        num_classes=10)
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear.in_features == 14 * 14 and model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_resnet18_adapts_grayscale_and_freezes_from_the_bottom() -> None:
    spec = ModelSpec(kind="resnet18")
    model = build_model(spec, _hp(trainable_stages=1, dropout_rate=0.1), input_shape=(1, 16, 16), num_classes=4)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    model.train()
    assert not model.layer3.training and model.layer4.training  # frozen stages keep their BN statistics
    before = model.stem[1].running_mean.clone()
    model(torch.randn(4, 1, 16, 16) + 3)
    assert torch.equal(before, model.stem[1].running_mean)

    opt = build_optimizer(model, _hp(learning_rate=0.01, backbone_lr_factor=0.1), device=torch.device("cpu"))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.001])
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)

    head_only = build_model(spec, _hp(trainable_stages=0), input_shape=(3, 16, 16), num_classes=4)
    assert isinstance(head_only, ResNet18Transfer)
    assert len(build_optimizer(head_only, _hp(), device=torch.device("cpu")).param_groups) == 1


def test_cosine_schedule_falls_from_the_base_rate() -> None:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, _hp(learning_rate=0.1), device=torch.device("cpu"))
    rates = []
    for epoch in range(1, 5):
        set_learning_rate(opt, schedule="cosine", epoch=epoch, epochs=4)
        rates.append(opt.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(0.1) and rates == sorted(rates, reverse=True) and rates[-1] > 0
    set_learning_rate(opt, schedule="constant", epoch=3, epochs=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_augmentation_crops_and_flips_each_image_on_its_own() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6).repeat(50, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    flipped = augment_batch(x, AugmentSpec(horizontal_flip=True), g)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 20 < int(mirrored.sum()) < 80

    cropped = augment_batch(x, AugmentSpec(crop_padding=2), torch.Generator().manual_seed(1))
    assert cropped.shape == x.shape
    # Every crop is the image shifted by at most 2 pixels, zeros where it came from the padding.
    shifts = set()
    for i in range(len(x)):
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.nn.functional.pad(x[i], (2, 2, 2, 2))[:, 2 + dy: 8 + dy, 2 + dx: 8 + dx]
                if torch.equal(shifted, cropped[i]):
                    shifts.add((dy, dx))
                    break
            else:
                continue
            break
        else:
            raise AssertionError(f"image {i} is no shifted crop")
    assert len(shifts) > 5
    again = augment_batch(x, AugmentSpec(crop_padding=2), torch.Generator().manual_seed(1))
    assert torch.equal(cropped, again)  # seeded: a resumed trial sees the same augmentations


def test_missing_pretrained_weights_say_where_to_put_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelError) as e:
        pretrained_weights(ModelSpec(kind="resnet18", weights="IMAGENET1K_V1", download=False))
    msg = str(e.value)
    assert "model.weights" in msg and str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "model.weights: none" in msg
    assert pretrained_weights(ModelSpec(kind="resnet18", weights="none")) is None


def test_cached_pretrained_weights_are_read(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from torchvision.models import resnet18

    state = resnet18(weights=None).state_dict()
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / "resnet18-f37072fd.pth")
    loaded = pretrained_weights(ModelSpec(kind="resnet18", weights="IMAGENET1K_V1", download=False))
    model = build_model(ModelSpec(kind="resnet18"), _hp(), input_shape=(3, 8, 8), num_classes=2, pretrained=loaded)
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])

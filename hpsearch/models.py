"""Model builders: hyperparameters → ``nn.Module``, and the optimizer for it.

- ``mlp``: the one users know from the classic PyTorch tutorial::

      Flatten → num_hidden_layers × (Linear → BatchNorm1d? → ReLU → Dropout) → Linear(classes)

- ``cnn``: ``conv_blocks × (Conv → BatchNorm2d? → ReLU → MaxPool 2×2)``, channels doubling from
  ``conv_channels`` each block, then the MLP above as its dense head.
- ``resnet18``: torchvision's ResNet-18, its ``fc`` replaced by ``Dropout → Linear(classes)``; its
  stages frozen from the bottom up to leave ``trainable_stages`` training (the frozen ones keep
  their batch-norm statistics), the backbone at ``backbone_lr_factor × learning_rate``.

- ``python``: the user's own, from the factory ``model.factory`` names (:func:`from_factory`).

Every kind takes ``image_size`` (resize on the device, 0 = keep) and 1- or 3-channel images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hpsearch import entrypoints
from hpsearch.errors import EntryPointError, ModelError
from hpsearch.hyperparameters import lr_factor
from hpsearch.spec import ModelSpec

logger = logging.getLogger(__name__)


def build_model(spec: ModelSpec, hp: Mapping[str, Any], *, input_shape: tuple[int, ...], num_classes: int,
                pretrained: Mapping[str, Any] | None = None) -> nn.Module:
    """The model a trial trains. ``pretrained``: ResNet-18's weights (see :func:`pretrained_weights`)."""
    size = int(hp["image_size"])
    shape = tuple(input_shape)
    if size and len(shape) == 3 and shape[1:] != (size, size):
        shape = (shape[0], size, size)
    prefix: list[nn.Module] = [Resize(size)] if shape != tuple(input_shape) else []
    dropout = float(hp.get("dropout_rate", 0.0))
    if spec.kind == "mlp":
        body: nn.Module = mlp(
            in_features=int(torch.Size(shape).numel()), num_classes=num_classes,
            num_hidden_layers=int(hp["num_hidden_layers"]), neurons_per_layer=int(hp["neurons_per_layer"]),
            dropout_rate=dropout, batch_norm=spec.batch_norm,
        )
    elif spec.kind == "cnn":
        body = cnn(
            input_shape=shape, num_classes=num_classes, conv_blocks=int(hp["conv_blocks"]),
            conv_channels=int(hp["conv_channels"]), kernel_size=int(hp["kernel_size"]),
            num_hidden_layers=int(hp["num_hidden_layers"]), neurons_per_layer=int(hp["neurons_per_layer"]),
            dropout_rate=dropout, batch_norm=spec.batch_norm,
        )
    elif spec.kind == "python":
        body = from_factory(spec, hp, input_shape=shape, num_classes=num_classes)
    elif spec.kind == "resnet18":
        body = ResNet18Transfer(num_classes=num_classes, in_channels=shape[0], dropout_rate=dropout,
                                trainable_stages=int(hp["trainable_stages"]), pretrained=pretrained)
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}")  # spec validation makes this unreachable
    return nn.Sequential(*prefix, body) if prefix else body


def from_factory(spec: ModelSpec, hp: Mapping[str, Any], *, input_shape: tuple[int, ...],
                 num_classes: int) -> nn.Module:
    """The user's model: ``factory(hyperparameters, input_shape=..., num_classes=...)``, where
    the hyperparameters are the trial's (the training function's and the factory's own)."""
    reference = spec.factory or ""
    factory = entrypoints.load("model.factory", reference, ())
    given = spec.for_factory(hp)

    def hint(error: Exception) -> str | None:
        if isinstance(error, KeyError) and error.args and error.args[0] not in given:
            return (f"the hyperparameters it is given are {', '.join(given)} (its own are those "
                    "model.hyperparameters names)")
        return None

    model = entrypoints.call("model.factory", reference, factory, given, input_shape=tuple(input_shape),
                             num_classes=num_classes, hint=hint)
    if not isinstance(model, nn.Module):
        raise EntryPointError(f"model.factory: {reference} returned a {type(model).__name__}; it must return a "
                              "torch.nn.Module")
    return model


class Resize(nn.Module):
    """Bilinear resize to ``size × size`` on the device (the model's input resolution)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def mlp(
    *,
    in_features: int,
    num_classes: int,
    num_hidden_layers: int,
    neurons_per_layer: int,
    dropout_rate: float,
    batch_norm: bool,
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(num_hidden_layers):
        # No bias before batch norm: its shift makes the Linear's bias redundant.
        layers.append(nn.Linear(width, neurons_per_layer, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(neurons_per_layer))
        layers.append(nn.ReLU(inplace=True))
        if dropout_rate > 0:
            layers.append(nn.Dropout(dropout_rate))
        width = neurons_per_layer
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    conv_blocks: int,
    conv_channels: int,
    kernel_size: int,
    num_hidden_layers: int,
    neurons_per_layer: int,
    dropout_rate: float,
    batch_norm: bool,
) -> nn.Sequential:
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for block in range(conv_blocks):
        out = conv_channels * 2**block
        layers.append(nn.Conv2d(channels, out, kernel_size, padding=kernel_size // 2, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        # Pool while there is something to pool: more blocks than halvings keep the last size.
        if min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels = out
    head = mlp(in_features=channels * height * width, num_classes=num_classes, num_hidden_layers=num_hidden_layers,
               neurons_per_layer=neurons_per_layer, dropout_rate=dropout_rate, batch_norm=batch_norm)
    return nn.Sequential(*layers, *head)


class ResNet18Transfer(nn.Module):
    """torchvision's ResNet-18 with a new head; the bottom ``5 - trainable_stages`` stages frozen."""

    STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, *, num_classes: int, in_channels: int, dropout_rate: float, trainable_stages: int,
                 pretrained: Mapping[str, Any] | None) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        if pretrained is not None:
            net.load_state_dict(pretrained)
        self.in_channels = in_channels
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.pool = net.avgpool
        self.fc = nn.Sequential(nn.Dropout(dropout_rate), nn.Linear(net.fc.in_features, num_classes))
        self.frozen = [getattr(self, name) for name in self.STAGES[: len(self.STAGES) - trainable_stages]]
        for module in self.frozen:
            module.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:  # grayscale: the same image on the three channels ImageNet weights expect
            x = x.expand(-1, 3, -1, -1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))

    def train(self, mode: bool = True) -> ResNet18Transfer:
        super().train(mode)
        for module in self.frozen:  # frozen stages keep their (pretrained) batch-norm statistics
            module.eval()
        return self

    def param_groups(self, lr: float, backbone_lr_factor: float) -> list[dict[str, Any]]:
        backbone = [p for name in self.STAGES for p in getattr(self, name).parameters() if p.requires_grad]
        groups = [{"params": list(self.fc.parameters()), "lr": lr}]
        if backbone:
            groups.append({"params": backbone, "lr": lr * backbone_lr_factor})
        return groups


def build_optimizer(model: nn.Module, hp: Mapping[str, Any], *, device: torch.device) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum) with weight decay, as in torch; only trainable parameters."""
    lr, wd = float(hp["learning_rate"]), float(hp["weight_decay"])
    # A model with a backbone (ResNet-18, also behind a Resize) gives its own learning-rate groups.
    backbone = next((m for m in model.modules() if isinstance(m, ResNet18Transfer)), None)
    if backbone is not None:
        params: Any = backbone.param_groups(lr, float(hp["backbone_lr_factor"]))
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    # Fused kernels update every parameter in one pass: measured ~15% faster per epoch than the
    # foreach default for the MLP on one CPU thread (benchmarks/trainable.py), and faster on CUDA.
    fast = {"fused": True}
    name = hp["optimizer"]
    if name == "Adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=wd, **fast)
    elif name == "AdamW":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, **fast)
    elif name == "SGD":
        opt = torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(hp["momentum"]), **fast)
    else:
        raise ValueError(f"unknown optimizer {name!r}")  # spec validation makes this unreachable
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]  # what the schedule scales (saved with the optimizer's state)
    return opt


def set_learning_rate(optimizer: torch.optim.Optimizer, *, schedule: str, epoch: int, epochs: int) -> None:
    """The learning rate of ``epoch`` (1-based): constant, or cosine from base to near 0."""
    factor = lr_factor(schedule, epoch=epoch, epochs=epochs)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# --------------------------------------------------------------------------------------------
# Pretrained weights: read (or downloaded) once, in the driver, before any trial starts.
# --------------------------------------------------------------------------------------------


def pretrained_weights(spec: ModelSpec) -> dict[str, Any] | None:
    """ResNet-18's pretrained ``state_dict`` the job names, from torch's cache ($TORCH_HOME).

    Raises :class:`ModelError` with the file's expected path when it is neither cached nor
    downloadable, so the search stops before any trial. The driver hands the weights to the
    trials through Ray's object store: worker nodes need neither the file nor network access.
    """
    if spec.kind != "resnet18" or spec.weights == "none":
        return None
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.DEFAULT if spec.weights == "DEFAULT" else ResNet18_Weights[spec.weights]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(weights.url)
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"model.weights: {path} cannot be read ({e}); delete it so it is downloaded again, "
                             f"or replace it with {weights.url}") from None
    how = (f"download {weights.url} to {path} (the folder is $TORCH_HOME/hub/checkpoints; TORCH_HOME "
           "defaults to ~/.cache/torch), or use model.weights: none")
    if not spec.download:
        raise ModelError(f"model.weights: {spec.weights} is not in torch's cache ({path}); {how}")
    logger.info("downloading ResNet-18 %s weights into %s", spec.weights, folder)
    try:
        return torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False, check_hash=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.weights: {spec.weights} is not in torch's cache and could not be downloaded "
                         f"({reason}); {how}") from None

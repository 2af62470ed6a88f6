"""A small residual network for 28x28 images, built from the trial's hyperparameters.

hpsearch calls ``build(hyperparameters, input_shape=..., num_classes=...)`` once per trial and
trains what it returns with its own training function (optimizer, learning-rate schedule,
checkpoints, early stopping): the model is the only code here.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, and the input added back (He et al., 2016)."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(x + self.body(x))


class ResidualNet(nn.Module):
    """A stem, then ``stages`` x (``blocks`` residual blocks, 2x downsampling), then a linear head."""

    def __init__(self, in_channels: int, num_classes: int, *, channels: int, stages: int, blocks: int,
                 dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        for stage in range(stages):
            layers += [ResidualBlock(channels, dropout) for _ in range(blocks)]
            if stage < stages - 1:  # downsample, and widen
                layers += [nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(2 * channels), nn.ReLU(inplace=True)]
                channels *= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build(hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The trial's model: ``channels``, ``stages``, ``blocks`` and ``dropout`` come from the job's space."""
    return ResidualNet(input_shape[0], num_classes, channels=int(hp["channels"]), stages=int(hp["stages"]),
                       blocks=int(hp["blocks"]), dropout=float(hp["dropout"]))

"""Small CNN in PyTorch; parameter names match models.cnn.spec. Takes NHWC input."""

import torch
from torch import nn

from models.base import ModelSpec
from models.cnn.spec import CHANNELS, HIDDEN


class CNN(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, w, c = spec.input_shape
        self.conv1 = nn.Conv2d(c, CHANNELS[0], 3, padding=1)
        self.conv2 = nn.Conv2d(CHANNELS[0], CHANNELS[1], 3, padding=1)
        self.fc1 = nn.Linear((h // 2) * (w // 2) * CHANNELS[1], HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)                  # NHWC data as a channels-last NCHW view
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = nn.functional.max_pool2d(x, 2)
        x = x.permute(0, 2, 3, 1).flatten(1)       # flatten in (H, W, C) order, as Keras does
        return self.fc2(torch.relu(self.fc1(x)))


def build(spec: ModelSpec) -> nn.Module:
    return CNN(spec)

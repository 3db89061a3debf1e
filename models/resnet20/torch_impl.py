"""ResNet-20 in PyTorch; parameter names match models.resnet20.spec. Takes NHWC input."""

import torch
from torch import nn

from models.base import ModelSpec
from models.resnet20.spec import BLOCKS_PER_STAGE, STAGES
from models.torch_layers import conv_bn, nhwc_to_nchw_view


class BasicBlock(nn.Module):
    def __init__(self, cin: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, c, 3, stride, 1)
        self.conv2, self.bn2 = conv_bn(c, c, 3, 1, 1)
        self.shortcut = nn.Sequential(*conv_bn(cin, c, 1, stride, 0)) \
            if stride != 1 or cin != c else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    # stages are set with setattr (layer1..layer3), named as in the canonical layout
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(spec.input_shape[2], 16, 3, 1, 1)
        cin = 16
        for s, (c, stride) in enumerate(STAGES, start=1):
            blocks = []
            for i in range(BLOCKS_PER_STAGE):
                blocks.append(BasicBlock(cin, c, stride if i == 0 else 1))
                cin = c
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(nhwc_to_nchw_view(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def build(spec: ModelSpec) -> nn.Module:
    return ResNet20(spec)

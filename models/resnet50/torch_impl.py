"""ResNet-50 v1.5 in PyTorch; parameter names match models.resnet50.spec. Takes NHWC input."""

import torch
from torch import nn

from models.base import ModelSpec
from models.resnet50.spec import EXPANSION, STAGES
from models.torch_layers import conv_bn, nhwc_to_nchw_view


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, downsample: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, width, 1, 1, 0)
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride, 1)
        self.conv3, self.bn3 = conv_bn(width, width * EXPANSION, 1, 1, 0)
        self.downsample = nn.Sequential(*conv_bn(cin, width * EXPANSION, 1, stride, 0)) \
            if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.downsample(x))


class ResNet50(nn.Module):
    # stages are set with setattr (layer1..layer4), named as in the canonical layout
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(spec.input_shape[2], 64, 7, 2, 3)
        cin = 64
        for s, (width, blocks, stride) in enumerate(STAGES, start=1):
            layer = []
            for i in range(blocks):
                layer.append(Bottleneck(cin, width, stride if i == 0 else 1, downsample=i == 0))
                cin = width * EXPANSION
            setattr(self, f"layer{s}", nn.Sequential(*layer))
        self.fc = nn.Linear(cin, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(nhwc_to_nchw_view(x))))
        x = nn.functional.max_pool2d(x, 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def build(spec: ModelSpec) -> nn.Module:
    return ResNet50(spec)

"""PyTorch building blocks shared by the ResNets (imported only by torch_impl modules)."""

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int, stride: int, pad: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    # eps and momentum spelled out: the Keras twin uses epsilon=1e-5, momentum=0.9 (= 1 - 0.1)
    return (nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))


def nhwc_to_nchw_view(x: torch.Tensor) -> torch.Tensor:
    """NHWC data as an NCHW tensor in channels-last memory: a view, no copy."""
    return x.permute(0, 3, 1, 2)

"""MLP in PyTorch; parameter names match models.mlp.spec."""

import torch
from torch import nn

from models.base import ModelSpec


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        dense = [p for p in spec.params if p.name.endswith(".weight")]
        for p in dense:
            setattr(self, p.name.split(".")[0], nn.Linear(p.shape[1], p.shape[0]))
        self.names = [p.name.split(".")[0] for p in dense]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for name in self.names[:-1]:
            x = torch.relu(getattr(self, name)(x))
        return getattr(self, self.names[-1])(x)


def build(spec: ModelSpec) -> nn.Module:
    return MLP(spec)

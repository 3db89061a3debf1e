"""Your own PyTorch model, data and loss, trained by the harness.

A regression MLP on scikit-learn's bundled diabetes data (442 patients, 10 features, no
download), mean squared error, mean absolute error as a metric. The training split is a
map-style ``torch.utils.data.Dataset`` (the harness samples, shards and batches it); the test
split is plain arrays. Run it either way:

    horovodrun -np 2 python examples/torch_own_model.py --epochs 30
    harness train --task examples/torch_own_model.py:task --epochs 30
    harness launch --launcher horovodrun -np 2 -- --task examples/torch_own_model.py:task

Every ``harness train`` flag works in both (``--lr``, ``--out-dir``, ``--mode async``, ...).
"""

import sys

import numpy as np
import torch
from torch import nn

import diabetes_data
import harness


class Patients(torch.utils.data.Dataset):
    """Map-style: one (features, target) pair of numpy values per index."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x.astype(np.float32), y.astype(np.float32)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def data() -> harness.Data:
    x_train, y_train, x_test, y_test = diabetes_data.split()
    return harness.Data(train=Patients(x_train, y_train), test=(x_test, y_test),
                        name="diabetes")


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 1))


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out.squeeze(1), y)


def mae(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.squeeze(1) - y).abs().mean()


task = harness.Task(framework="torch", name="diabetes_mlp", model=model, loss=mse,
                    loss_name="mse", metrics={"mae": mae}, data=data,
                    defaults={"lr": 0.01, "batch_size": 16, "epochs": 20})

if __name__ == "__main__":
    sys.exit(harness.run(task, argv=sys.argv[1:]))

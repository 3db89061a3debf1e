"""PyTorch's tensor operations for the compressors in harness/compress.py (eager: state is a
box holding a tensor), with Horovod's collectives (or none, on one rank)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from harness.compress import HorovodCollectives

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int8": torch.int8, "int16": torch.int16, "uint8": torch.uint8,
           "int32": torch.int32, "int64": torch.int64}


class _Box:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class TorchOps(HorovodCollectives):
    """``hvd``: horovod.torch (None: one rank, collectives are the identity)."""

    def __init__(self, hvd: Any = None, device: torch.device | str = "cpu") -> None:
        self.hvd = hvd
        self.size = 1 if hvd is None else hvd.size()
        self.device = torch.device(device)
        self._bit_weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8,
                                         device=self.device)
        self._bit_shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=self.device)

    def all_finite(self, x):
        return torch.isfinite(x).all()

    def constant(self, a):
        return torch.from_numpy(np.array(a)).to(self.device)

    def zeros(self, n):
        return torch.zeros(n, device=self.device)

    def cast(self, x, dtype):
        return x.to(_DTYPES[dtype])

    def bitcast(self, x, dtype):
        return x.view(_DTYPES[dtype])

    def reshape(self, x, shape):
        return x.reshape(shape)

    def concat(self, xs):
        return torch.cat(xs)

    def pad(self, x, n):
        return torch.nn.functional.pad(x, (0, n - x.shape[0]))

    def round(self, x):
        return torch.round(x)

    def abs(self, x):
        return x.abs()

    def clip(self, x, lo, hi):
        return x.clamp(lo, hi)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def sum(self, x, axis=None, keepdims=False):
        return x.sum() if axis is None else x.sum(dim=axis, keepdim=keepdims)

    def max(self, x, axis, keepdims=False):
        return torch.amax(x, dim=axis, keepdim=keepdims)

    def sqrt(self, x):
        return torch.sqrt(x)

    def topk_indices(self, x, k):
        return torch.topk(x.abs(), k, sorted=True).indices.to(torch.int32)

    def gather(self, x, idx):
        return x[idx.long()]

    def scatter_sum(self, idx, values, n):
        return torch.zeros(n, device=values.device, dtype=values.dtype).index_add_(
            0, idx.long(), values)

    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        return (a.T if transpose_a else a) @ (b.T if transpose_b else b)

    def stack(self, xs, axis):
        return torch.stack(xs, dim=axis)

    def transpose(self, x):
        return x.T

    def pack_bits(self, bits):
        return (bits.reshape(-1, 8).to(torch.uint8) * self._bit_weights).sum(
            dim=1, dtype=torch.uint8)

    def unpack_bits(self, packed):
        return ((packed.unsqueeze(1) >> self._bit_shifts) & 1).reshape(-1)

    def nbytes(self, x):
        return x.numel() * x.element_size()

    def variable(self, name, init):
        return _Box(self.constant(init))

    def read(self, var):
        return var.value

    def assign(self, var, value):
        var.value = value.reshape(var.value.shape).to(var.value.dtype)

    def to_numpy(self, x):
        return x.detach().cpu().numpy()

"""The servers' optimizer: SGD with momentum in numpy, PyTorch's formulation.

    buf = momentum * buf + (g + weight_decay * w);   w = w - lr * buf

All arithmetic is float32, element-wise, so a shard computes exactly what a single server
would for the same elements (sharding changes nothing), and a serial loop with this class
reproduces a one-worker run bit for bit.
"""

from __future__ import annotations

import numpy as np


class SGDMomentum:
    def __init__(self, params: np.ndarray, momentum: float, weight_decay: float = 0.0) -> None:
        self.params = params
        self.momentum = np.float32(momentum)
        self.weight_decay = np.float32(weight_decay)
        self.buf = np.zeros_like(params)
        self.steps = 0
        self._tmp = np.empty_like(params)

    def step(self, grad: np.ndarray, lr: float) -> None:
        g = grad
        if self.weight_decay:
            np.multiply(self.params, self.weight_decay, out=self._tmp)
            self._tmp += grad
            g = self._tmp
        if self.momentum:
            if self.steps == 0:
                self.buf[...] = g          # PyTorch starts the buffer at the first gradient
            else:
                self.buf *= self.momentum
                self.buf += g
            g = self.buf
        np.multiply(g, np.float32(lr), out=self._tmp)
        self.params -= self._tmp
        self.steps += 1

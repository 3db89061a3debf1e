"""Framework-free model description: parameters in one canonical layout and their initial values.

The canonical layout is PyTorch's (dense ``(out, in)``, conv ``(out, in, kh, kw)``); the
TensorFlow implementations transpose on load and save, so a checkpoint or an initial-weight set
means the same thing in both frameworks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# kinds of parameters: how they are laid out in Keras (an embedding table is (vocab, dim) in
# both frameworks) and how they are initialised
DENSE, CONV, VECTOR, EMBEDDING = "dense", "conv", "vector", "embedding"
NORMAL_STD = 0.02           # the "normal" initialiser (GPT-2's)


@dataclass(frozen=True)
class ParamSpec:
    name: str                 # canonical (PyTorch state_dict) name, e.g. "layer1.0.conv1.weight"
    shape: tuple[int, ...]    # canonical shape
    kind: str                 # DENSE, CONV or VECTOR
    init: str                 # he_uniform | glorot_uniform | normal | zeros | ones
    trainable: bool = True    # False for batch-norm running statistics

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def to_keras_layout(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == DENSE:
        return array.T
    if kind == CONV:
        return array.transpose(2, 3, 1, 0)
    return array


def from_keras_layout(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == DENSE:
        return array.T
    if kind == CONV:
        return array.transpose(3, 2, 0, 1)
    return array


@dataclass
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]        # one sample, channels last: (H, W, C) or (features,)
    num_classes: int
    params: list[ParamSpec] = field(default_factory=list)
    flops_per_sample: int = 0           # forward multiply-adds x 2
    #: tokens in one sample (language models; 0 for the image models)
    tokens_per_sample: int = 0
    #: the architecture's size options (gpt: layers, dim, heads)
    options: dict = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """Trainable parameters (what papers and Keras' summary call parameters)."""
        return sum(p.size for p in self.params if p.trainable)

    @property
    def trainable(self) -> list[ParamSpec]:
        return [p for p in self.params if p.trainable]

    def init_weights(self, seed: int) -> dict[str, np.ndarray]:
        """Initial values, canonical layout, float32; identical for every framework and rank."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for p in self.params:
            if p.init == "zeros":
                out[p.name] = np.zeros(p.shape, np.float32)
            elif p.init == "ones":
                out[p.name] = np.ones(p.shape, np.float32)
            elif p.init == "normal":
                out[p.name] = rng.normal(0.0, NORMAL_STD, p.shape).astype(np.float32)
            else:
                fan_in = math.prod(p.shape[1:])
                fan_out = p.shape[0] * math.prod(p.shape[2:])
                if p.init == "he_uniform":
                    limit = math.sqrt(6.0 / fan_in)
                elif p.init == "glorot_uniform":
                    limit = math.sqrt(6.0 / (fan_in + fan_out))
                else:
                    raise ValueError(f"unknown initialiser {p.init!r} for {p.name}")
                out[p.name] = rng.uniform(-limit, limit, p.shape).astype(np.float32)
        return out


class SpecBuilder:
    """Collects parameters and FLOPs while a spec walks its architecture."""

    def __init__(self, name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
        self.spec = ModelSpec(name, tuple(input_shape), num_classes)

    def _add(self, name: str, shape: tuple[int, ...], kind: str, init: str,
             trainable: bool = True) -> None:
        self.spec.params.append(ParamSpec(name, tuple(shape), kind, init, trainable))

    def dense(self, name: str, fin: int, fout: int, init: str = "he_uniform") -> None:
        self._add(f"{name}.weight", (fout, fin), DENSE, init)
        self._add(f"{name}.bias", (fout,), VECTOR, "zeros")
        self.spec.flops_per_sample += 2 * fin * fout

    def conv(self, name: str, cin: int, cout: int, k: int, stride: int, pad: int,
             hw: tuple[int, int], bias: bool = False) -> tuple[int, int]:
        self._add(f"{name}.weight", (cout, cin, k, k), CONV, "he_uniform")
        if bias:
            self._add(f"{name}.bias", (cout,), VECTOR, "zeros")
        h = (hw[0] + 2 * pad - k) // stride + 1
        w = (hw[1] + 2 * pad - k) // stride + 1
        self.spec.flops_per_sample += 2 * k * k * cin * cout * h * w
        return h, w

    def bn(self, name: str, c: int) -> None:
        self._add(f"{name}.weight", (c,), VECTOR, "ones")
        self._add(f"{name}.bias", (c,), VECTOR, "zeros")
        self._add(f"{name}.running_mean", (c,), VECTOR, "zeros", trainable=False)
        self._add(f"{name}.running_var", (c,), VECTOR, "ones", trainable=False)

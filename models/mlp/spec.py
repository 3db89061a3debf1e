"""MLP: flatten -> 128 -> 64 -> classes, ReLU."""

import math

from models.base import ModelSpec, SpecBuilder

DEFAULT_INPUT_SHAPE = (8, 8, 1)
DEFAULT_CLASSES = 10
HIDDEN = (128, 64)


def build_spec(input_shape: tuple[int, ...], num_classes: int) -> ModelSpec:
    b = SpecBuilder("mlp", input_shape, num_classes)
    width = math.prod(input_shape)
    for i, h in enumerate(HIDDEN, start=1):
        b.dense(f"fc{i}", width, h)
        width = h
    b.dense(f"fc{len(HIDDEN) + 1}", width, num_classes, init="glorot_uniform")
    return b.spec

"""Small CNN for 8x8 digits: two 3x3 convs (16, 32), 2x2 max-pool, dense 64, classes.

The flatten is channels-last (H, W, C) in both frameworks so the dense weights mean the same.
"""

from models.base import ModelSpec, SpecBuilder

DEFAULT_INPUT_SHAPE = (8, 8, 1)
DEFAULT_CLASSES = 10
CHANNELS = (16, 32)
HIDDEN = 64


def build_spec(input_shape: tuple[int, ...], num_classes: int) -> ModelSpec:
    if len(input_shape) != 3 or input_shape[0] % 2 or input_shape[1] % 2:
        raise ValueError(f"cnn needs (H, W, C) images with even H and W, got {input_shape}")
    b = SpecBuilder("cnn", input_shape, num_classes)
    hw, cin = (input_shape[0], input_shape[1]), input_shape[2]
    for i, c in enumerate(CHANNELS, start=1):
        hw = b.conv(f"conv{i}", cin, c, k=3, stride=1, pad=1, hw=hw, bias=True)
        cin = c
    hw = (hw[0] // 2, hw[1] // 2)
    b.dense("fc1", hw[0] * hw[1] * cin, HIDDEN)
    b.dense("fc2", HIDDEN, num_classes, init="glorot_uniform")
    return b.spec

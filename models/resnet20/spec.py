"""ResNet-20 for 32x32 images (He et al. 2016, CIFAR variant): 3 stages x 3 basic blocks of
16/32/64 channels. Downsampling shortcuts are 1x1 convolutions with batch norm (option B)."""

from models.base import ModelSpec, SpecBuilder

DEFAULT_INPUT_SHAPE = (32, 32, 3)
DEFAULT_CLASSES = 10
STAGES = ((16, 1), (32, 2), (64, 2))   # (channels, first stride)
BLOCKS_PER_STAGE = 3


def build_spec(input_shape: tuple[int, ...], num_classes: int) -> ModelSpec:
    if len(input_shape) != 3:
        raise ValueError(f"resnet20 needs (H, W, C) images, got {input_shape}")
    b = SpecBuilder("resnet20", input_shape, num_classes)
    hw = b.conv("conv1", input_shape[2], 16, k=3, stride=1, pad=1, hw=input_shape[:2])
    b.bn("bn1", 16)
    cin = 16
    for s, (c, stride) in enumerate(STAGES, start=1):
        for i in range(BLOCKS_PER_STAGE):
            st = stride if i == 0 else 1
            p = f"layer{s}.{i}"
            hw_in = hw
            hw = b.conv(f"{p}.conv1", cin, c, k=3, stride=st, pad=1, hw=hw_in)
            b.bn(f"{p}.bn1", c)
            b.conv(f"{p}.conv2", c, c, k=3, stride=1, pad=1, hw=hw)
            b.bn(f"{p}.bn2", c)
            if st != 1 or cin != c:
                b.conv(f"{p}.shortcut.0", cin, c, k=1, stride=st, pad=0, hw=hw_in)
                b.bn(f"{p}.shortcut.1", c)
            cin = c
    b.dense("fc", cin, num_classes, init="glorot_uniform")
    return b.spec

"""ResNet-50 (v1.5: stride in the 3x3 convolution), the model of Horovod's synthetic
benchmarks. 25,557,032 parameters at 224x224x3 with 1000 classes."""

from models.base import ModelSpec, SpecBuilder

DEFAULT_INPUT_SHAPE = (224, 224, 3)
DEFAULT_CLASSES = 1000
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))   # (width, blocks, stride)
EXPANSION = 4


def build_spec(input_shape: tuple[int, ...], num_classes: int) -> ModelSpec:
    if len(input_shape) != 3:
        raise ValueError(f"resnet50 needs (H, W, C) images, got {input_shape}")
    b = SpecBuilder("resnet50", input_shape, num_classes)
    hw = b.conv("conv1", input_shape[2], 64, k=7, stride=2, pad=3, hw=input_shape[:2])
    b.bn("bn1", 64)
    hw = ((hw[0] + 2 - 3) // 2 + 1, (hw[1] + 2 - 3) // 2 + 1)   # 3x3/2 max-pool, padding 1
    cin = 64
    for s, (width, blocks, stride) in enumerate(STAGES, start=1):
        for i in range(blocks):
            st = stride if i == 0 else 1
            p = f"layer{s}.{i}"
            hw_in = hw
            b.conv(f"{p}.conv1", cin, width, k=1, stride=1, pad=0, hw=hw_in)
            b.bn(f"{p}.bn1", width)
            hw = b.conv(f"{p}.conv2", width, width, k=3, stride=st, pad=1, hw=hw_in)
            b.bn(f"{p}.bn2", width)
            b.conv(f"{p}.conv3", width, width * EXPANSION, k=1, stride=1, pad=0, hw=hw)
            b.bn(f"{p}.bn3", width * EXPANSION)
            if i == 0:
                b.conv(f"{p}.downsample.0", cin, width * EXPANSION, k=1, stride=st, pad=0,
                       hw=hw_in)
                b.bn(f"{p}.downsample.1", width * EXPANSION)
            cin = width * EXPANSION
    b.dense("fc", cin, num_classes, init="glorot_uniform")
    return b.spec

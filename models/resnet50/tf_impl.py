"""ResNet-50 v1.5 in Keras; layer names match models.resnet50.spec."""

from models.base import ModelSpec
from models.resnet50.spec import EXPANSION, STAGES
from models.tf_layers import bn, conv, relu


def build(spec: ModelSpec, keras):
    L = keras.layers
    inputs = keras.Input(shape=spec.input_shape)
    x = relu(keras, bn(keras, conv(keras, inputs, "conv1", 64, 7, 2, 3), "bn1"))
    # after ReLU every value is >= 0, so zero padding gives PyTorch's (-inf padded) max-pool
    x = L.MaxPooling2D(3, strides=2)(L.ZeroPadding2D(1)(x))
    for s, (width, blocks, stride) in enumerate(STAGES, start=1):
        for i in range(blocks):
            st, p = (stride if i == 0 else 1), f"layer{s}.{i}"
            out = relu(keras, bn(keras, conv(keras, x, f"{p}.conv1", width, 1, 1, 0), f"{p}.bn1"))
            out = relu(keras, bn(keras, conv(keras, out, f"{p}.conv2", width, 3, st, 1),
                                 f"{p}.bn2"))
            out = bn(keras, conv(keras, out, f"{p}.conv3", width * EXPANSION, 1, 1, 0), f"{p}.bn3")
            if i == 0:
                x = bn(keras, conv(keras, x, f"{p}.downsample.0", width * EXPANSION, 1, st, 0),
                       f"{p}.downsample.1")
            x = relu(keras, L.Add()([out, x]))
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(spec.num_classes, name="fc")(x)
    return keras.Model(inputs, outputs, name="resnet50")

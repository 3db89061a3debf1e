"""ResNet-20 in Keras; layer names match models.resnet20.spec."""

from models.base import ModelSpec
from models.resnet20.spec import BLOCKS_PER_STAGE, STAGES
from models.tf_layers import bn, conv, relu


def build(spec: ModelSpec, keras):
    inputs = keras.Input(shape=spec.input_shape)
    x = relu(keras, bn(keras, conv(keras, inputs, "conv1", 16, 3, 1, 1), "bn1"))
    cin = 16
    for s, (c, stride) in enumerate(STAGES, start=1):
        for i in range(BLOCKS_PER_STAGE):
            st, p = (stride if i == 0 else 1), f"layer{s}.{i}"
            out = relu(keras, bn(keras, conv(keras, x, f"{p}.conv1", c, 3, st, 1), f"{p}.bn1"))
            out = bn(keras, conv(keras, out, f"{p}.conv2", c, 3, 1, 1), f"{p}.bn2")
            if st != 1 or cin != c:
                x = bn(keras, conv(keras, x, f"{p}.shortcut.0", c, 1, st, 0), f"{p}.shortcut.1")
            x = relu(keras, keras.layers.Add()([out, x]))
            cin = c
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(spec.num_classes, name="fc")(x)
    return keras.Model(inputs, outputs, name="resnet20")

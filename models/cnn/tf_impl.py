"""Small CNN in Keras; layer names match models.cnn.spec."""

from models.base import ModelSpec
from models.cnn.spec import CHANNELS, HIDDEN


def build(spec: ModelSpec, keras):
    L = keras.layers
    inputs = keras.Input(shape=spec.input_shape)
    x = L.Conv2D(CHANNELS[0], 3, padding="same", activation="relu", name="conv1")(inputs)
    x = L.Conv2D(CHANNELS[1], 3, padding="same", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D(2)(x)
    x = L.Flatten()(x)
    x = L.Dense(HIDDEN, activation="relu", name="fc1")(x)
    outputs = L.Dense(spec.num_classes, name="fc2")(x)
    return keras.Model(inputs, outputs, name="cnn")

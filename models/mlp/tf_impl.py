"""MLP in Keras; layer names match models.mlp.spec."""

from models.base import ModelSpec


def build(spec: ModelSpec, keras):
    dense = [p for p in spec.params if p.name.endswith(".weight")]
    inputs = keras.Input(shape=spec.input_shape)
    x = keras.layers.Flatten()(inputs)
    for p in dense[:-1]:
        x = keras.layers.Dense(p.shape[0], activation="relu", name=p.name.split(".")[0])(x)
    outputs = keras.layers.Dense(dense[-1].shape[0], name=dense[-1].name.split(".")[0])(x)
    return keras.Model(inputs, outputs, name="mlp")

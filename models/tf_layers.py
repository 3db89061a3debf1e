"""Keras building blocks that reproduce PyTorch's padding and batch norm exactly.

Keras' ``padding="same"`` pads strided convolutions asymmetrically (more at the bottom/right);
PyTorch pads symmetrically. Explicit ZeroPadding2D + ``valid`` gives PyTorch's result.
"""


def conv(keras, x, name: str, filters: int, k: int, stride: int, pad: int, bias: bool = False,
         activation=None):
    L = keras.layers
    if pad and not (stride == 1 and 2 * pad == k - 1):
        x = L.ZeroPadding2D(pad, name=f"{name}.pad")(x)
        padding = "valid"
    else:
        padding = "same" if pad else "valid"
    return L.Conv2D(filters, k, strides=stride, padding=padding, use_bias=bias,
                    activation=activation, name=name)(x)


def bn(keras, x, name: str):
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x)


def relu(keras, x):
    return keras.layers.ReLU()(x)


def canonical_variables(model) -> dict:
    """Map canonical (PyTorch) parameter names to the Keras model's variables.

    Works for Keras 3 and tf_keras layers alike: it reads the layer types' attribute names.
    """
    out = {}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in ("Dense", "Conv2D"):
            out[f"{layer.name}.weight"] = layer.kernel
            if layer.use_bias:
                out[f"{layer.name}.bias"] = layer.bias
        elif kind == "Embedding":
            out[f"{layer.name}.weight"] = layer.embeddings
        elif kind == "LayerNormalization":
            out[f"{layer.name}.weight"] = layer.gamma
            out[f"{layer.name}.bias"] = layer.beta
        elif hasattr(layer, "canonical_weights"):      # the models' own layers (gpt)
            out.update({f"{layer.name}.{k}": v for k, v in layer.canonical_weights().items()})
        elif kind == "BatchNormalization":
            out[f"{layer.name}.weight"] = layer.gamma
            out[f"{layer.name}.bias"] = layer.beta
            out[f"{layer.name}.running_mean"] = layer.moving_mean
            out[f"{layer.name}.running_var"] = layer.moving_variance
        elif layer.weights:
            raise TypeError(f"layer {layer.name!r} ({kind}) has weights the harness cannot map")
    return out

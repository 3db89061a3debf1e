"""One model of your own in PyTorch and in Keras, compared by ``harness compare``.

``task`` holds both versions of a regression MLP on scikit-learn's bundled diabetes data. The
two map their weights to one canonical layout (PyTorch's: ``fc1.weight`` is ``(out, in)``;
Keras stores the transpose), so both start from the same seeded weights and the report checks
that their first losses agree (within 1e-5). Without a ``canonical`` mapping a comparison still
runs, and the report says that the initial weights differ.

    python examples/compare_own_model.py --out-dir results/compare-own [-- --epochs 5]
    # is the same as
    harness compare --np 1,2 --out-dir results/compare-own -- \\
        --task examples/compare_own_model.py:task

Frameworks are imported inside the functions: every process that reads this file (each run,
and ``harness compare``'s check, before the first run, that each framework can load the task)
imports only its own.
"""

import sys

import numpy as np

import diabetes_data
import harness

SIZES = [("fc1", 10, 64), ("fc2", 64, 32), ("fc3", 32, 1)]        # (name, inputs, outputs)


def data() -> harness.Data:
    x_train, y_train, x_test, y_test = diabetes_data.split()
    return harness.Data(train=(x_train, y_train), test=(x_test, y_test), name="diabetes")


def init(seed: int) -> dict:
    """Glorot-uniform weights and zero biases, canonical (PyTorch) layout."""
    rng, out = np.random.default_rng(seed), {}
    for name, fin, fout in SIZES:
        limit = np.sqrt(6.0 / (fin + fout))
        out[f"{name}.weight"] = rng.uniform(-limit, limit, (fout, fin)).astype(np.float32)
        out[f"{name}.bias"] = np.zeros(fout, np.float32)
    return out


# --- PyTorch ---------------------------------------------------------------------------------

def torch_model():
    from torch import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = (nn.Linear(i, o) for _, i, o in SIZES)

        def forward(self, x):
            return self.fc3(self.fc2(self.fc1(x).relu()).relu())

    return MLP()


def torch_mse(out, y):
    return ((out[:, 0] - y) ** 2).mean()


def same_names(model, w: dict) -> dict:          # state_dict names are the canonical ones
    return dict(w)


# --- Keras -----------------------------------------------------------------------------------

def keras_model():
    import keras

    inputs = keras.Input(shape=(10,))
    h = inputs
    for i, (name, _, fout) in enumerate(SIZES):
        h = keras.layers.Dense(fout, activation="relu" if i < len(SIZES) - 1 else None,
                               name=name)(h)
    return keras.Model(inputs, h)


def keras_mse(out, y):
    import tensorflow as tf

    return tf.reduce_mean(tf.square(out[:, 0] - tf.cast(y, out.dtype)))


def to_keras(model, w: dict) -> dict:
    """Canonical -> Keras variable paths; Dense kernels are (in, out)."""
    out = {}
    for name, _, _ in SIZES:
        out[f"{name}/kernel"] = w[f"{name}.weight"].T
        out[f"{name}/bias"] = w[f"{name}.bias"]
    return out


def from_keras(model, w: dict) -> dict:
    out = {}
    for name, _, _ in SIZES:
        out[f"{name}.weight"] = w[f"{name}/kernel"].T
        out[f"{name}.bias"] = w[f"{name}/bias"]
    return out


common = {"name": "diabetes_mlp", "data": data, "loss_name": "mse",
          "defaults": {"lr": 0.01, "batch_size": 16, "epochs": 10}}
task = harness.Tasks(
    torch=harness.Task(framework="torch", model=torch_model, loss=torch_mse,
                       canonical=harness.Canonical(init, same_names, same_names), **common),
    tensorflow=harness.Task(framework="tensorflow", model=keras_model, loss=keras_mse,
                            canonical=harness.Canonical(init, to_keras, from_keras), **common))

if __name__ == "__main__":
    from harness.cli import main

    # this script's flags go to `harness compare`; those after `--` to every run
    args = sys.argv[1:]
    cut = args.index("--") if "--" in args else len(args)
    sys.exit(main(["compare", "--np", "1,2", *args[:cut], "--", "--task", f"{__file__}:task",
                   *args[cut + 1:]]))

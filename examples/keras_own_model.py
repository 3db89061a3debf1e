"""Your own Keras 3 model, data and loss, trained by the harness.

The same regression as ``torch_own_model.py`` (scikit-learn's bundled diabetes data, mean
squared error, mean absolute error), written as a plain ``keras.Model`` on arrays:

    horovodrun -np 2 python examples/keras_own_model.py --epochs 30
    harness train --task examples/keras_own_model.py:task --epochs 30
    harness train --task examples/keras_own_model.py:task --tf-loop fit   # model.fit

The task is a TensorFlow task, so ``--framework tensorflow`` is implied.
"""

import sys

import keras
import tensorflow as tf

import diabetes_data
import harness


def data() -> harness.Data:
    x_train, y_train, x_test, y_test = diabetes_data.split()
    return harness.Data(train=(x_train, y_train), test=(x_test, y_test), name="diabetes")


def model() -> keras.Model:
    inputs = keras.Input(shape=(10,))
    h = keras.layers.Dense(64, activation="relu")(inputs)
    h = keras.layers.Dense(32, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def mse(out, y):
    return tf.reduce_mean(tf.square(out[:, 0] - tf.cast(y, out.dtype)))


def mae(out, y):
    return tf.reduce_mean(tf.abs(out[:, 0] - tf.cast(y, out.dtype)))


task = harness.Task(framework="tensorflow", name="diabetes_mlp", model=model, loss=mse,
                    loss_name="mse", metrics={"mae": mae}, data=data,
                    defaults={"lr": 0.01, "batch_size": 16, "epochs": 20})

if __name__ == "__main__":
    sys.exit(harness.run(task, argv=sys.argv[1:]))

"""A task whose weights count how often each training sample was applied (tests/test_elastic.py).

Sample i's input is i; the model is one weight per sample, its output for a sample that weight,
and the loss the batch mean of the outputs. So one SGD step (lr = the global batch, no momentum,
lr_scaling none) lowers by exactly 1 the weight of every sample in the global batch, however the
batch is split over ranks, and the final weights are minus the number of times each sample was
trained on: a rolled-back step that was not undone, or a sample skipped or repeated in a resize,
shows in the checkpoint. Framework imports stay inside the functions (one framework a process).
"""

import os
import time

import numpy as np

import harness

N = 320          # training samples: 10 steps an epoch at a global batch of 32
#: seconds each PyTorch forward pass sleeps (a slow job, for a host to join while it runs)
STEP_S = float(os.environ.get("ELASTIC_TASK_STEP_S", "0"))


def data() -> harness.Data:
    x = np.arange(N, dtype=np.float32)[:, None]
    return harness.Data(train=(x, np.zeros(N, np.float32)), test=(x, np.zeros(N, np.float32)),
                        name="sample-ids")


def torch_model():
    import torch

    class Counter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(N))

        def forward(self, x):
            time.sleep(STEP_S)
            return self.w[x[:, 0].long()][:, None]

    return Counter()


def keras_model():
    import tensorflow as tf

    from harness.backends.horovod_tf import keras_module

    keras = keras_module()

    class Counter(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.w = self.add_weight(shape=(N,), initializer="zeros", name="w")

        def call(self, x):
            return tf.gather(self.w, tf.cast(x[:, 0], tf.int32))[:, None]

    return Counter()


def mean(out, y):
    return out.mean() if hasattr(out, "mean") else __import__("tensorflow").reduce_mean(out)


#: lr = the global batch of 32 (tests/test_elastic.py sets it, as global_batch_size or as
#: batch_size x ranks)
settings = {"lr": 32.0, "lr_scaling": "none", "momentum": 0.0, "shuffle": True}
task = harness.Tasks(
    torch=harness.Task(framework="torch", name="counter", model=torch_model, loss=mean,
                       loss_name="mean_output", data=data, defaults=settings),
    tensorflow=harness.Task(framework="tensorflow", name="counter", model=keras_model,
                            loss=mean, loss_name="mean_output", data=data, defaults=settings))

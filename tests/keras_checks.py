"""Horovod's Keras layer on Keras 3 (and tf_keras), checked under ``horovodrun -np 2``.

    horovodrun -np 2 python tests/keras_checks.py CHECK[,CHECK...] OUT.json

Each check writes one JSON object from rank 0 with values gathered from every rank, so the
test can compare ranks. Every rank starts from different weights and sees different data, so a
missing broadcast or an unaveraged gradient shows up as ranks that disagree.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

import horovod.tensorflow as hvd_tf  # noqa: E402
import horovod.tensorflow.keras as hvd  # noqa: E402

keras = tf.keras
hvd.init()
tf.config.threading.set_intra_op_parallelism_threads(1)
RANK, SIZE = hvd.rank(), hvd.size()


def gathered(values) -> list:
    """values (a flat float array) from every rank, as a list per rank."""
    arr = tf.constant(np.asarray(values, np.float64).reshape(1, -1))
    return hvd.allgather(arr).numpy().tolist()


def flat_weights(model) -> np.ndarray:
    return np.concatenate([np.asarray(w).ravel() for w in model.get_weights()])


def make_model(seed: int, bn: bool = False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
    if bn:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def data(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed + 100 * RANK)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0).astype(np.int64)


def check_fit() -> dict:
    """model.fit with DistributedOptimizer + broadcast, metric-average and warm-up callbacks."""
    model = make_model(seed=RANK)                     # different initial weights per rank
    base_lr = 0.05
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(learning_rate=base_lr * SIZE,
                                                        momentum=0.9))
    model.compile(optimizer=opt, metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    lrs = []

    class RecordLR(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            lrs.append(float(tf.convert_to_tensor(self.model.optimizer.learning_rate)))

    x, y = data()
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False, callbacks=[
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        hvd.callbacks.MetricAverageCallback(),
        hvd.callbacks.LearningRateWarmupCallback(initial_lr=base_lr * SIZE, warmup_epochs=2,
                                                 steps_per_epoch=4, verbose=0),
        RecordLR()])
    return {"weights": gathered(flat_weights(model)), "loss": gathered(history.history["loss"]),
            "accuracy": gathered(history.history["accuracy"]), "lrs": lrs,
            "base_lr": base_lr, "size": SIZE}


def check_accumulation() -> dict:
    """backward_passes_per_step=2, averaged: two batches == one step on both batches at once."""
    x, y = data(32)
    results = {}
    for k, batches in ((2, [(x[:16], y[:16]), (x[16:], y[16:])]), (1, [(x, y)])):
        model = make_model(seed=0)
        opt = hvd.DistributedOptimizer(keras.optimizers.SGD(learning_rate=0.1),
                                       backward_passes_per_step=k,
                                       average_aggregated_gradients=True)
        model.compile(optimizer=opt,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = flat_weights(model)
        for xb, yb in batches:
            model.train_on_batch(xb, yb)
            if k == 2 and xb is batches[0][0]:
                results["unchanged_after_first_pass"] = bool(np.array_equal(
                    before, flat_weights(model)))
        results[f"k{k}"] = flat_weights(model).tolist()
    results["k2_all_ranks"] = gathered(results["k2"])
    return results


def check_compression() -> dict:
    model = make_model(seed=0)
    opt = hvd.DistributedOptimizer(keras.optimizers.Adam(learning_rate=0.01),
                                   compression=hvd.Compression.fp16)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return {"weights": gathered(flat_weights(model))}


def check_tapes() -> dict:
    """DistributedGradientTape given Keras variables; PartialDistributedGradientTape."""
    model = make_model(seed=RANK)
    hvd_tf.broadcast_variables(model.variables, root_rank=0)     # Keras 3 variables directly
    x, y = data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape(persistent=True) as tape:
        loss = loss_fn(y, model(x, training=True))
    local = tape.gradient(loss, model.trainable_variables)
    dist = hvd_tf.DistributedGradientTape(tape).gradient(loss, model.trainable_variables)
    with tf.GradientTape() as tape2:
        loss2 = loss_fn(y, model(x, training=True))
    partial = hvd_tf.PartialDistributedGradientTape(
        tape2, local_layers=[model.layers[0]]).gradient(loss2, model.trainable_variables)
    flat = lambda gs: np.concatenate([np.asarray(g).ravel() for g in gs])  # noqa: E731
    n_local = sum(int(np.prod(v.shape)) for v in model.layers[0].trainable_variables)
    return {"weights": gathered(flat_weights(model)), "dist": gathered(flat(dist)),
            "local": gathered(flat(local)), "partial": gathered(flat(partial)),
            "n_local": n_local}


def check_syncbn() -> dict:
    """SyncBatchNormalization == BatchNormalization over every rank's batch together."""
    full = np.random.default_rng(7).standard_normal((SIZE * 8, 5)).astype(np.float32) * 3 + 1
    mine = full[RANK * 8:(RANK + 1) * 8]
    sync = hvd_tf.SyncBatchNormalization(momentum=0.5)
    out = sync(mine, training=True)
    ref = keras.layers.BatchNormalization(momentum=0.5)
    ref_out = ref(full, training=True)[RANK * 8:(RANK + 1) * 8]
    return {"max_diff": gathered([float(np.abs(np.asarray(out) - np.asarray(ref_out)).max())]),
            "moving_mean": gathered(np.asarray(sync.moving_mean)),
            "moving_var": gathered(np.asarray(sync.moving_variance)),
            "ref_moving_mean": np.asarray(ref.moving_mean).tolist()}


def check_schedule() -> dict:
    """LearningRateScheduleCallback on Keras 3, with momentum correction."""
    model = make_model(seed=0)
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(learning_rate=0.1, momentum=0.9))
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[
        hvd.callbacks.LearningRateScheduleCallback(initial_lr=0.1, multiplier=0.5,
                                                   start_epoch=2, staircase=True)])
    return {"lr": history.history["lr"], "weights": gathered(flat_weights(model))}


if __name__ == "__main__":
    # several checks per job: each horovodrun start costs seconds
    names, path = sys.argv[1].split(","), sys.argv[2]
    results = {name: globals()[f"check_{name}"]() for name in names}
    if RANK == 0:      # to a file: launchers split long output lines
        flavour = "tf_keras" if os.environ.get("TF_USE_LEGACY_KERAS") else "keras"
        version = getattr(keras, "__version__", None) or __import__(flavour).__version__
        with open(path, "w") as f:
            json.dump({"keras": version, "checks": results}, f)

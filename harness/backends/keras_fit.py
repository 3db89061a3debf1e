"""TensorFlow with ``model.fit``: Horovod's Keras DistributedOptimizer and callbacks.

``tf_loop = "fit"`` trains each epoch with ``model.fit`` on this rank's shard (the same samples
in the same order as the custom loop), with ``hvd.DistributedOptimizer``,
``BroadcastGlobalVariablesCallback``, ``MetricAverageCallback`` and, with ``warmup_epochs``,
``LearningRateWarmupCallback``. A harness callback records the same step records, agrees on
stopping and drives the watchdog, so metrics, checkpoints and results match the custom loop.
"""

from __future__ import annotations

import time

import numpy as np

from harness.backends.base import FitBackend
from harness.backends.horovod_tf import (HorovodTFBackend, make_optimizer, optimizer_variables,
                                         tf_variables)


class KerasFitBackend(HorovodTFBackend, FitBackend):
    """HorovodTFBackend whose training runs through ``model.fit``.

    The optimizer is built in ``setup``, so its variables exist before step 1 and the state is
    broadcast then (not with Horovod's BroadcastGlobalVariablesCallback after batch 1, which
    also overwrote each rank's local gradient accumulators with rank 0's when
    ``backward_passes_per_step`` > 1).
    """

    broadcast_after_first_step = False

    def setup(self, task, x, y, lr):
        super().setup(task, x, y, lr)
        import horovod.tensorflow.keras as hvd_keras

        keras, c = self.keras, self.cfg
        self.hvd_keras = hvd_keras
        base = make_optimizer(keras, c, lr)
        self.opt = hvd_keras.DistributedOptimizer(
            base, compression=(hvd_keras.Compression.fp16 if c.compression == "fp16"
                               else hvd_keras.Compression.none),
            backward_passes_per_step=c.backward_passes_per_step,
            average_aggregated_gradients=True, sparse_as_dense=True,
            gradient_predivide_factor=c.gradient_predivide_factor)
        loss_fn, tf = task.loss, self.tf
        y_dtype, y_shape = tf.as_dtype(y.dtype), [-1, *y.shape[1:]]

        def as_data(y_true):
            """y as the data holds it: Keras hands it over as float, and Keras 2 also gives
            it the output's rank ((B,) labels become (B, 1))."""
            return tf.reshape(tf.cast(y_true, y_dtype), y_shape)

        class TaskLoss(keras.losses.Loss):
            """The task's loss(output, y) as a Keras loss (which passes y first). A Loss
            subclass, not a plain function: Keras 3 reshapes y to the output's rank for those."""

            def call(self, y_true, y_pred):
                return loss_fn(y_pred, as_data(y_true))

        def metric(fn):
            return lambda y_true, y_pred: fn(y_pred, as_data(y_true))

        metrics = [keras.metrics.MeanMetricWrapper(metric(fn), name=name)
                   for name, fn in task.metrics.items()]
        self.model.compile(optimizer=self.opt, loss=TaskLoss(name=task.loss_name),
                           metrics=metrics)
        self.opt.build(self.model.trainable_variables)

    def callbacks(self) -> list:
        """Horovod's callbacks for one fit call. The learning rate is not among them: the
        harness's step callback sets it before every batch from the run's own schedule, so the
        fit loop follows the step loop's warm-up exactly and a resume mid-warm-up continues it
        (Horovod's LearningRateWarmupCallback counts batches from the start of each fit call)."""
        return [self.hvd_keras.callbacks.MetricAverageCallback()]

    def update_every(self) -> int:
        """Steps (micro-batches) per optimizer update: Horovod's optimizer accumulates
        ``backward_passes_per_step`` of them locally on each rank before it reduces."""
        return self.cfg.backward_passes_per_step

    def fit_epoch(self, x: np.ndarray, y: np.ndarray, batch: int, epoch: int,
                  callbacks: list) -> None:
        """One epoch (or its rest, after a resume) of this rank's batches, in order."""
        self.model.fit(x, y, batch_size=batch, epochs=epoch + 1, initial_epoch=epoch,
                       shuffle=False, verbose=0, callbacks=callbacks)

    def set_lr(self, lr: float) -> None:
        self.opt.learning_rate = lr

    def step_callback(self, on_step, before_step=None):
        """A Keras callback that calls ``before_step()`` before each batch and turns fit's
        running means into per-step values for ``on_step(loss, {metric: mean}, seconds)``.

        Keras reports the running mean of the fit call so far after each batch; batch i's own
        value is i * mean_i - (i - 1) * mean_(i-1) (equal batch sizes).
        """
        keras, names = self.keras, ["loss", *self.task.metrics]

        class HarnessStepCallback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self._prev = dict.fromkeys(names, 0.0)

            def on_train_batch_begin(self, batch, logs=None):
                if before_step is not None:
                    before_step()
                self._t0 = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                dt = time.perf_counter() - self._t0
                i, values = batch + 1, {}
                for k in names:
                    mean = float((logs or {}).get(k, 0.0))
                    values[k] = i * mean - (i - 1) * self._prev[k]
                    self._prev[k] = mean
                loss = values.pop("loss")
                on_step(loss, values, dt)

        return HarnessStepCallback()

    def broadcast_state(self, resumed: bool = False) -> None:
        # After a resume rank 0 holds the checkpoint: everyone takes it before the first batch
        # (BroadcastGlobalVariablesCallback would only do so after it).
        # each rank's gradient accumulators are its own (empty at an update boundary)
        opt_vars = [v for v in optimizer_variables(self.opt)
                    if "hvd_accumulator" not in (getattr(v, "path", None) or v.name)]
        variables = tf_variables(self.model.variables) + tf_variables(opt_vars)
        self.hvd.broadcast_variables(variables, root_rank=0)

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

from harness.backends.horovod_tf import HorovodTFBackend, tf_variables


class KerasFitBackend(HorovodTFBackend):
    """HorovodTFBackend whose training runs through ``model.fit``."""

    def setup(self, spec, weights, lr):
        super().setup(spec, weights, lr)
        import horovod.tensorflow.keras as hvd_keras

        keras, c = self.keras, self.cfg
        self.hvd_keras = hvd_keras
        base = (keras.optimizers.SGD(learning_rate=lr, momentum=c.momentum) if c.optimizer == "sgd"
                else keras.optimizers.Adam(learning_rate=lr, epsilon=1e-8))
        self.opt = hvd_keras.DistributedOptimizer(
            base, compression=(hvd_keras.Compression.fp16 if c.compression == "fp16"
                               else hvd_keras.Compression.none),
            backward_passes_per_step=c.backward_passes_per_step,
            average_aggregated_gradients=True,
            gradient_predivide_factor=c.gradient_predivide_factor)
        self.model.compile(optimizer=self.opt,
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           metrics=["accuracy"])
        self.opt.build(self.model.trainable_variables)
        self._broadcast_done = False

    def callbacks(self, steps_per_epoch: int, peak_lr: float, warmup_epochs: float) -> list:
        hvd_keras, out = self.hvd_keras, []
        if not self._broadcast_done:
            out.append(hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0))
            self._broadcast_done = True
        out.append(hvd_keras.callbacks.MetricAverageCallback())
        if warmup_epochs > 0:
            out.append(hvd_keras.callbacks.LearningRateWarmupCallback(
                initial_lr=peak_lr, warmup_epochs=warmup_epochs,
                steps_per_epoch=steps_per_epoch, momentum_correction=True))
        return out

    def fit_epoch(self, x: np.ndarray, y: np.ndarray, batch: int, epoch: int,
                  callbacks: list) -> None:
        """One epoch (or its rest, after a resume) of this rank's batches, in order."""
        self.model.fit(x, y, batch_size=batch, epochs=epoch + 1, initial_epoch=epoch,
                       shuffle=False, verbose=0, callbacks=callbacks)

    def set_lr(self, lr: float) -> None:
        self.opt.learning_rate = lr

    def current_lr(self) -> float:
        return float(self.tf.convert_to_tensor(self.opt.learning_rate))

    def step_callback(self, on_step):
        """A Keras callback that turns fit's running means into per-step values.

        Keras reports the running mean of the fit call so far after each batch; batch i's own
        value is i * mean_i - (i - 1) * mean_(i-1) (equal batch sizes).
        """
        keras = self.keras

        class HarnessStepCallback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self._prev = {"loss": 0.0, "accuracy": 0.0}

            def on_train_batch_begin(self, batch, logs=None):
                self._t0 = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                dt = time.perf_counter() - self._t0
                i, values = batch + 1, {}
                for k in ("loss", "accuracy"):
                    mean = float((logs or {}).get(k, 0.0))
                    values[k] = i * mean - (i - 1) * self._prev[k]
                    self._prev[k] = mean
                on_step(values["loss"], values["accuracy"], dt)

        return HarnessStepCallback()

    def broadcast_state(self, resumed: bool = False) -> None:
        # After a resume rank 0 holds the checkpoint: everyone takes it before the first batch
        # (BroadcastGlobalVariablesCallback would only do so after it).
        variables = tf_variables(self.model.variables) + \
            tf_variables(list(self.opt.variables))
        self.hvd.broadcast_variables(variables, root_rank=0)

"""TensorFlow 2 / Keras backends: Horovod (DistributedGradientTape), mpi4py flat allreduce, local.

TensorFlow side of the contract: the optimizer's variables exist only after it has applied a
step, so model *and* optimizer variables are broadcast right after step 1
(``broadcast_after_first_step``). Keras 3 variables have no ``.ref()``: Horovod is given the
underlying ``tf.Variable`` of each (``v.value``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np

from harness.backends.base import Backend, BackendInfo, StepResult
from harness.backends.comm import HorovodComm, LocalComm, MPIComm
from harness.backends.common import (FlatLayout, check_loss_tensor, check_metric, check_scalar,
                                     check_weight_names, initial_canonical_weights, misfit)
from harness.env import World
from harness.quiet import native_log_filter
from harness.task import Task, TaskError

_KERAS: Any = None          # the Keras module this process's backend chose


#: What Keras imports at start-up when it is installed, for features a training rank does not
#: use: scikit-learn for its estimator wrappers (``keras.wrappers``) and matplotlib for its
#: image gallery (``keras.visualization``). Together about 1.4 s of a TensorFlow rank's start-up
#: (one-off timing of `import tensorflow`, 4.5 s -> 3.1 s),
#: saved where the harness imports Keras first (not a task module that imports it at its top).
OPTIONAL_AT_IMPORT = ("sklearn", "matplotlib")

#: On CPU the flat exchange gives a gradient of this many bytes or more an allreduce of its own,
#: in place, rather than copy it into the flat buffer and out again (``_flat_allreduce``). The
#: two copies of 1 MiB take about 0.25 ms on the development machine; one more allreduce's
#: negotiation and latency on shared memory are a small part of that (docs/benchmarks.md). Set
#: on one host: between hosts each such gradient is a message of its own, which still pays
#: where a 1 MiB message takes longer than its latency
OWN_ALLREDUCE_BYTES = 1 << 20


@contextlib.contextmanager
def hidden_modules(names):
    """Within: ``import NAME`` raises ImportError for each of ``names`` not yet imported, as
    for a package that is not installed. After: importable again, as usual."""
    hidden = [n for n in names if n not in sys.modules]
    for n in hidden:
        sys.modules[n] = None                      # type: ignore[assignment]
    try:
        yield
    finally:
        for n in hidden:
            if n in sys.modules and sys.modules[n] is None:
                del sys.modules[n]


def import_keras(flavour: str):
    """(tensorflow, keras module) for ``keras3`` or ``legacy`` (tf_keras, Keras 2). Keras
    loads without scikit-learn and matplotlib (OPTIONAL_AT_IMPORT); the process can import
    them later, but Keras' scikit-learn wrappers and image gallery then say they are missing."""
    global _KERAS
    if flavour == "legacy":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    # TensorFlow's start-up notices are filtered (harness.quiet)
    with native_log_filter(), hidden_modules(OPTIONAL_AT_IMPORT):
        import tensorflow as tf

        if flavour == "legacy":
            import tf_keras as keras
        else:
            import keras
    _KERAS = keras
    return tf, keras


def keras_module():
    """The Keras this run trains with (``keras = 'legacy'`` gives tf_keras): what tasks that
    serve both flavours build their model with."""
    return _KERAS if _KERAS is not None else import_keras("keras3")[1]


#: optimizer-state meta of a Keras 3 SGD whose momentum variables hold PyTorch's buffer
#: (``TorchSGD``); a checkpoint without it holds Keras' velocity
TORCH_MOMENTUM = "torch"


def make_optimizer(keras, cfg, lr: float):
    """The run's Keras optimizer: SGD with momentum or Adam, each with PyTorch's update (below);
    tf_keras (keras = 'legacy') keeps its own."""
    if not hasattr(keras, "ops"):
        if cfg.optimizer == "sgd":
            return keras.optimizers.SGD(learning_rate=lr, momentum=cfg.momentum)
        return keras.optimizers.Adam(learning_rate=lr, epsilon=1e-8)
    if cfg.optimizer == "sgd":
        return _torch_sgd_class(keras)(learning_rate=lr, momentum=cfg.momentum)
    return _torch_adam_class(keras)(learning_rate=lr, epsilon=1e-8)


def _torch_sgd_class(keras):
    """Keras 3's SGD with PyTorch's momentum. Keras keeps a velocity of learning-rate-scaled
    gradients (v = m v - lr g; w += v), PyTorch a buffer of raw gradients that the current
    learning rate scales (b = m b + g; w -= lr b): the two agree only while the learning rate
    is constant, so every warm-up and every learning-rate scaling with the world size made
    the frameworks' runs differ (8 steps of the main job's cnn at 2 ranks: losses 0.036 apart
    by step 7; 4e-7 with this class). The variables are Keras' (one ``momentum`` per weight);
    what they hold is PyTorch's buffer."""
    ops = keras.ops

    class TorchSGD(keras.optimizers.SGD):
        def update_step(self, gradient, variable, learning_rate):
            dtype = variable.dtype
            lr = ops.cast(learning_rate, dtype)
            gradient = ops.cast(gradient, dtype)
            if self.momentum == 0:
                self.assign_sub(variable, ops.multiply(gradient, lr))
                return
            m = self.momentums[self._get_variable_index(variable)]
            self.assign(m, ops.add(ops.multiply(m, ops.cast(self.momentum, dtype)), gradient))
            self.assign_sub(variable, ops.multiply(m, lr))

    return TorchSGD


def _torch_adam_class(keras):
    """Keras 3's Adam with PyTorch's epsilon. Keras adds epsilon to sqrt(v) before the bias
    correction (the Adam paper's "epsilon hat"); PyTorch adds it after, so a parameter with a
    tiny gradient moves differently: after 50 Adam steps of the gpt from the same weights the
    losses differ by up to 4e-4 with Keras' Adam, 7e-6 with this one
    (tests/test_gpt.py). The moments and their updates are Keras'; only the last line
    differs."""
    ops = keras.ops

    class TorchAdam(keras.optimizers.Adam):
        def update_step(self, gradient, variable, learning_rate):
            dtype = variable.dtype
            lr = ops.cast(learning_rate, dtype)
            gradient = ops.cast(gradient, dtype)
            step = ops.cast(self.iterations + 1, dtype)
            bias1 = 1 - ops.power(ops.cast(self.beta_1, dtype), step)
            bias2 = 1 - ops.power(ops.cast(self.beta_2, dtype), step)
            m = self._momentums[self._get_variable_index(variable)]
            v = self._velocities[self._get_variable_index(variable)]
            self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
            self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v),
                                            1 - self.beta_2))
            denom = ops.add(ops.divide(ops.sqrt(v), ops.sqrt(bias2)), self.epsilon)
            self.assign_sub(variable, ops.multiply(ops.divide(m, denom), lr / bias1))

    return TorchAdam


def variable_name(v) -> str:
    """A Keras variable's own name in its model: its path (Keras 3, ``fc1/kernel``) or its
    name without TensorFlow's output index (Keras 2: ``fc1/kernel:0`` -> ``fc1/kernel``)."""
    name = getattr(v, "path", None) or v.name
    return name[:-2] if name.endswith(":0") else name


def tf_variables(variables) -> list:
    """The tf.Variable behind each Keras variable (Keras 3 wraps them; Keras 2 does not)."""
    import tensorflow as tf

    return [v if isinstance(v, tf.Variable) else v.value for v in variables]


def optimizer_variables(opt) -> list:
    v = opt.variables
    return list(v() if callable(v) else v)


def dense_gradients(grads, variables) -> list:
    """Zeros for variables the loss does not reach (TensorFlow gives None), as PyTorch's
    flat gradient buffer holds them: every rank reduces the same tensors. An embedding's
    gradient (``IndexedSlices``, a row per lookup) is summed into one dense tensor, as
    PyTorch's is: Keras' Adam would otherwise square each lookup's row apart and move a token
    seen twice in a batch further than PyTorch does."""
    import tensorflow as tf

    return [tf.zeros_like(v) if g is None else
            tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
            for g, v in zip(grads, variables)]


class TFBackend(Backend):
    framework = "tensorflow"
    broadcast_after_first_step = True

    def __init__(self, cfg, world: World, threads: int | None = None) -> None:
        super().__init__(cfg, world, threads)
        tf, keras = import_keras(cfg.keras)
        self.tf, self.keras = tf, keras
        try:
            tf.config.threading.set_intra_op_parallelism_threads(self.threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            # TensorFlow's thread pools exist already (an earlier run in this process, or
            # the user's own TensorFlow work) and cannot change: say so, and record the truth
            fixed = tf.config.threading.get_intra_op_parallelism_threads()
            if fixed != self.threads:
                if world.rank == 0:
                    logging.getLogger("harness").warning(
                        f"TensorFlow started in this process with {fixed or 'its default'} "
                        f"compute thread(s), which cannot change now: this run uses them, "
                        f"not the {self.threads} it would set (threads_per_rank). Start it in "
                        "a process of its own for its own thread count")
                # 0: TensorFlow's own choice, one thread per schedulable core
                self.threads = fixed or len(os.sched_getaffinity(0))
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[world.gpu(len(gpus))]
            tf.config.set_visible_devices(gpu, "GPU")
            tf.config.experimental.set_memory_growth(gpu, True)
        self.gpu = bool(gpus)

    # --- building ---
    def setup(self, task: Task, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        tf, keras, c = self.tf, self.keras, self.cfg
        self.task = task
        keras.utils.set_random_seed(c.seed)    # the user's own initialisation, the same each run
        model = task.model()
        if not isinstance(model, keras.Model):
            other = hasattr(model, "trainable_variables") and callable(model)
            raise TaskError(
                f"task {task.name!r}: model() returned {type(model).__module__}."
                f"{type(model).__name__}, not a {keras.__name__}.Model" +
                (f": this run trains with {keras.__name__} (keras = {c.keras!r}); build the model "
                 "with harness.backends.horovod_tf.keras_module(), or set keras to match"
                 if other else ": return the model (framework = 'tensorflow')"))
        self.model = model
        self._check_task(x, y)                 # builds a model without an Input, too
        self.variables: dict[str, Any] = {}
        for v in self.model.weights:
            name = variable_name(v)
            if name in self.variables:
                raise TaskError(f"task {task.name!r}: two model variables are named {name!r}: "
                                "give the layers unique names")
            self.variables[name] = v
        self.trainable = list(self.model.trainable_variables)
        if not self.trainable:
            raise TaskError(f"task {task.name!r}: the model has no trainable variables")
        self.tf_trainable = tf_variables(self.trainable)
        self.layout = FlatLayout.of([(variable_name(v), tuple(v.shape)) for v in self.trainable])
        if task.canonical is not None:
            self.set_weights(initial_canonical_weights(
                task, self.model, c.seed, {n: tuple(v.shape) for n, v in self.variables.items()}))
        self.opt = make_optimizer(keras, c, lr)
        self.opt.build(self.trainable)
        x_spec = tf.TensorSpec([None, *x.shape[1:]], tf.as_dtype(x.dtype))
        y_spec = tf.TensorSpec([None, *y.shape[1:]], tf.as_dtype(y.dtype))
        self._train_fn = self._graph(self._train_step_graph, [x_spec, y_spec])
        self._grad_fn = self._graph(self._local_gradients, [x_spec, y_spec])
        self._eval_fn = self._graph(self._eval_graph, [x_spec, y_spec])
        self._apply_fn = self._graph(self._apply_flat)
        self._local_fn = self._graph(self._local_step_graph, [x_spec, y_spec])
        self._make_compressor()                # its state variables exist before tracing

    def _graph(self, fn, input_signature=None):
        """``fn`` as a TensorFlow graph function, traced without autograph: the harness's own
        graph code has no Python control flow on tensors, and converting it was most of each
        process's first step. The task's loss and metrics are still converted
        (``_loss``), so a user's ``if`` on a tensor works in the step loop as in ``tf.function``
        (Keras 3's ``model.fit``, ``tf_loop = 'fit'``, converts none of them)."""
        return self.tf.function(fn, input_signature=input_signature, autograph=False)

    def _check_task(self, x: np.ndarray, y: np.ndarray) -> None:
        """The model, loss and metrics fit together on the sample batch (else a TaskError)."""
        task, out, what = self.task, None, "model(x)"
        try:
            out = self.model(x, training=False)
            what = "loss(model(x), y)"
            loss = task.loss(out, y)
            check_loss_tensor(task, loss, bool(self.tf.is_tensor(loss)), "tf.Tensor")
            check_scalar(task, what, tuple(loss.shape), len(x))
            for name, fn in task.metrics.items():
                what = f"metric {name!r}"
                check_metric(task, name, self.tf.convert_to_tensor(fn(out, y)).numpy(), len(x))
        except TaskError:
            raise
        except Exception as e:   # noqa: BLE001 - a misfit is one line; anything else is theirs
            shape = tuple(out.shape) if out is not None and hasattr(out, "shape") else None
            error = misfit(task, what, e, x, y, shape)
            if error is None:
                raise
            raise error from e

    def _loss(self, x, y, training: bool = True):
        """The batch mean loss and each metric summed over the batch. The task's functions
        run as functions of their own with autograph (tf.function's default), made anew in each
        graph: one traced once would hold that graph's tensors (e.g. ``model.losses``)."""
        tf = self.tf
        out = self.model(x, training=training)
        loss = tf.cast(tf.function(self.task.loss)(out, y), tf.float32)
        n = tf.cast(tf.shape(x)[0], tf.float32)
        sums = [tf.cast(tf.function(fn)(out, y), tf.float32) * n
                for fn in self.task.metrics.values()]
        return loss, tf.stack(sums) if sums else tf.zeros([0])

    def _local_gradients(self, x, y, scale: float = 1.0):
        """Mean-loss gradients accumulated over backward_passes_per_step micro-batches, each
        multiplied by ``scale`` (through the loss, so it costs no pass over the gradients)."""
        tf, k = self.tf, self.cfg.backward_passes_per_step
        n = tf.cast(tf.shape(x)[0], tf.float32)
        xs, ys = (tf.split(x, k), tf.split(y, k)) if k > 1 else ([x], [y])
        acc, total, sums = None, 0.0, None
        for xc, yc in zip(xs, ys):
            with tf.GradientTape() as tape:
                loss, ms = self._loss(xc, yc)
                if k > 1:
                    loss = loss * tf.cast(tf.shape(xc)[0], tf.float32) / n
                scaled = loss * scale if scale != 1.0 else loss
            grads = dense_gradients(tape.gradient(scaled, self.tf_trainable), self.tf_trainable)
            acc = grads if acc is None else [a + g for a, g in zip(acc, grads)]
            total = total + loss
            sums = ms if sums is None else sums + ms
        return total, sums, acc

    def _apply(self, grads):
        """Weight decay (as PyTorch's SGD/Adam do it: added to the gradient) and the update."""
        tf, wd = self.tf, self.cfg.weight_decay
        if wd:
            grads = [g + wd * v for g, v in zip(grads, self.tf_trainable)]
        # whether the gradients are finite: the loss alone does not show it. nan_policy =
        # skip applies none of a non-finite step; stop stops the run at it, before any
        # checkpoint (a tf.cond around the update cost ~4% of a cnn step)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        if self.cfg.nan_policy == "skip":
            def apply():
                self.opt.apply_gradients(zip(grads, self.trainable))
                return tf.constant(True)

            return tf.cond(finite, apply, lambda: tf.constant(False))
        self.opt.apply_gradients(zip(grads, self.trainable))
        return finite

    def _reduced_gradients(self, x, y):
        """(loss, metric sums, gradients, time the local gradients were ready or None); the
        Horovod subclass averages the gradients over ranks."""
        loss, sums, grads = self._local_gradients(x, y)
        return loss, sums, grads, self._stamp(grads)

    def _stamp(self, after):
        """The time (tf.timestamp, seconds) once ``after`` exist: the graph's own clock, no
        synchronisation added (the step breakdown's compute/exchange boundary)."""
        with self.tf.control_dependencies(list(after)):
            return self.tf.timestamp()

    def _train_step_graph(self, x, y):
        tf = self.tf
        loss, sums, grads, t_local = self._reduced_gradients(x, y)
        t_reduced = self._stamp(grads if t_local is None else [*grads, t_local])
        with tf.control_dependencies([t_reduced]):
            applied = self._apply(grads)
        nan = tf.constant(np.nan, tf.float64)     # the tape: no boundary to stamp
        return loss, sums, applied, tf.stack([nan if t_local is None else t_local, t_reduced])

    def _local_step_graph(self, x, y):
        loss, sums, grads = self._local_gradients(x, y)
        return loss, sums, self._apply(grads)

    def _apply_flat(self, flat):
        tf = self.tf
        grads, off = [], 0
        for v in self.tf_trainable:
            n = int(np.prod(v.shape))
            grads.append(tf.cast(tf.reshape(flat[off:off + n], v.shape), v.dtype))
            off += n
        return self._apply(grads)

    def _eval_graph(self, x, y):
        loss, sums = self._loss(x, y, training=False)
        return loss * self.tf.cast(self.tf.shape(x)[0], self.tf.float32), sums

    def _metrics(self, sums) -> dict[str, float]:
        return dict(zip(self.task.metrics, np.asarray(sums, np.float64).tolist()))

    # --- steps ---
    def train_step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        loss, sums, applied, stamps = self._train_fn(x, y)
        t_local, t_reduced = np.asarray(stamps).tolist()
        return StepResult(float(loss), self._metrics(sums), bool(applied),
                          exchange_s=None if t_local != t_local else t_reduced - t_local)

    def local_step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        loss, sums, applied = self._local_fn(x, y)
        return StepResult(float(loss), self._metrics(sums), bool(applied), exchange_s=0.0)

    def average_params(self, share: float) -> None:
        tf = self.tf
        flat = tf.concat([tf.reshape(v, [-1]) for v in self.tf_trainable], 0)
        if share != 1.0:
            flat = flat * share
        flat = self._sum_params(flat)
        sizes = [math.prod(s) for s in self.layout.shapes]
        for v, part in zip(self.trainable, tf.split(flat, sizes)):
            v.assign(tf.reshape(part, v.shape))

    def eval_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
        loss, sums = self._eval_fn(x, y)
        return float(loss), self._metrics(sums)

    def set_lr(self, lr: float) -> None:
        self.opt.learning_rate = lr

    # --- state ---
    def get_weights(self) -> dict[str, np.ndarray]:
        return {n: np.array(v.numpy()) for n, v in self.variables.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        check_weight_names({n: tuple(v.shape) for n, v in self.variables.items()}, weights,
                           "weights")
        for n, v in self.variables.items():
            v.assign(np.asarray(weights[n], v.dtype.name if hasattr(v.dtype, "name")
                                else v.dtype))

    def _seed_states(self) -> list:
        """Keras 3's seed generators' states (dropout layers' and others'): model variables
        that are not weights, updated by every training step's draws."""
        weights = {id(v) for v in self.model.weights}
        return [v for v in self.model.variables if id(v) not in weights
                and "seed_generator" in (getattr(v, "path", None) or v.name)]

    def rng_parts(self) -> dict[str, np.ndarray]:
        parts = super().rng_parts()
        for i, v in enumerate(self._seed_states()):
            parts[f"keras_seed_{i:04d}"] = np.array(v.numpy())
        return parts

    def set_rng_parts(self, parts: dict[str, np.ndarray]) -> None:
        super().set_rng_parts(parts)
        for i, v in enumerate(self._seed_states()):
            v.assign(parts[f"keras_seed_{i:04d}"])

    def get_optimizer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        variables = optimizer_variables(self.opt)
        arrays = {f"{i:04d}": np.array(v.numpy()) for i, v in enumerate(variables)}
        names = [getattr(v, "path", None) or v.name for v in variables]
        meta = {"kind": f"keras.optimizers.{self.cfg.optimizer}", "names": names}
        if self.cfg.optimizer == "sgd" and hasattr(self.keras, "ops"):
            meta["momentum_buffer"] = TORCH_MOMENTUM
        return arrays, meta

    def set_optimizer_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        from harness.errors import CheckpointError

        variables = optimizer_variables(self.opt)
        if len(arrays) != len(variables):
            raise CheckpointError(f"optimizer state has {len(arrays)} variables, this optimizer "
                                  f"{len(variables)}: was it saved with another optimizer?")
        for i, v in enumerate(variables):
            a = arrays[f"{i:04d}"]
            if tuple(a.shape) != tuple(v.shape):
                raise CheckpointError(f"optimizer variable {i} has shape {a.shape}, expected "
                                      f"{tuple(v.shape)}")
        velocity = self.cfg.optimizer == "sgd" and hasattr(self.keras, "ops") and \
            meta.get("momentum_buffer") != TORCH_MOMENTUM
        momentums = {id(m) for m in getattr(self.opt, "momentums", [])}
        saved_lr = [i for i, n in enumerate(meta.get("names", []))
                    if str(n).endswith("learning_rate")]
        if velocity and momentums and not saved_lr:
            raise CheckpointError("this checkpoint's SGD momentum is Keras' velocity (written "
                                  "before the harness gave TensorFlow PyTorch's momentum "
                                  "update) and it names no learning rate to convert it at: "
                                  "start in a fresh run_name/out_dir")
        lr = float(arrays[f"{saved_lr[0]:04d}"]) if velocity and momentums else None
        for i, v in enumerate(variables):
            a = arrays[f"{i:04d}"]
            if lr and id(v) in momentums:
                # an older checkpoint's Keras velocity (-lr x PyTorch's buffer while the
                # learning rate was constant) as the buffer TorchSGD keeps
                a = a / np.float32(-lr)
            v.assign(a)
        if lr and momentums:
            import logging
            logging.getLogger("harness").warning(
                "this checkpoint's SGD momentum is Keras' velocity (written before the harness "
                "gave TensorFlow PyTorch's momentum update): it is converted at the saved "
                f"learning rate {lr:g}, so this resume is not exact if that rate was changing")

    # --- flat vectors (parameter server), the model's trainable variables in order ---
    def compute_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[StepResult, np.ndarray]:
        loss, sums, grads = self._grad_fn(x, y)
        flat = np.empty(self.layout.total, np.float32)
        for off, g in zip(self.layout.offsets, grads):
            a = g.numpy()
            flat[off:off + a.size] = a.ravel()
        return StepResult(float(loss), self._metrics(sums), bool(np.isfinite(float(loss)))), flat

    def get_flat_params(self) -> np.ndarray:
        return np.concatenate([np.asarray(v.numpy(), np.float32).ravel()
                               for v in self.trainable])

    def set_flat_params(self, flat: np.ndarray) -> None:
        for v, a in zip(self.trainable, self.layout.unflatten(flat).values()):
            v.assign(a)

    # --- what the communication mixins need (harness/backends/comm.py) ---
    def _host_tensor(self, values: np.ndarray):
        return self.tf.constant(values)

    def _has_gpu(self) -> bool:
        return self.gpu

    def _to_host(self, t) -> np.ndarray:
        return np.array(t)

    def _from_host(self, a: np.ndarray):
        return self.tf.constant(a)

    def _framework_ops(self, hvd: Any) -> Any:
        from harness.backends.ops_tf import TFOps

        return TFOps(hvd)

    def info(self) -> BackendInfo:
        versions = {"tensorflow": self.tf.__version__, "keras": self.keras.__version__}
        return BackendInfo("tensorflow", self.gradient_path, versions,
                           {"threads_per_rank": self.threads, "keras": self.cfg.keras,
                            "device": "gpu" if self.gpu else "cpu"})


class LocalTFBackend(LocalComm, TFBackend):
    """One process, no gradient exchange (single-process runs and parameter-server workers)."""


class HorovodTFBackend(HorovodComm, TFBackend):
    """Horovod: one flat allreduce per step (grad_exchange = flat, the default) or
    hvd.DistributedGradientTape (optimizer); variables broadcast after the first step."""

    hvd_module = "horovod.tensorflow"

    def train_step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        # the exchange runs inside the step's graph: the whole step counts as the wait (a rank
        # stalled before its step still names itself first), named for what it holds
        with self.waiting("in a step whose gradient exchange waits for the other ranks"):
            return super().train_step(x, y)

    def _reduced_gradients(self, x, y):
        tf, hvd, c = self.tf, self.hvd, self.cfg
        compression = hvd.Compression.fp16 if c.compression == "fp16" else hvd.Compression.none
        if c.exchange == "flat":
            return self._flat_exchange(x, y, compression)
        op = hvd.Adasum if c.reduction == "adasum" else hvd.Average
        if c.backward_passes_per_step == 1:
            with tf.GradientTape() as tape:
                loss, sums = self._loss(x, y)
            tape = hvd.DistributedGradientTape(     # embeddings: dense, as PyTorch's
                tape, compression=compression, op=op, sparse_as_dense=True,
                gradient_predivide_factor=c.gradient_predivide_factor)
            return loss, sums, dense_gradients(tape.gradient(loss, self.tf_trainable),
                                               self.tf_trainable), None
        # Accumulated micro-batches: one allreduce of the summed gradients, with the same
        # grouped op and scaling the tape uses.
        loss, sums, grads = self._local_gradients(x, y)
        t_local = self._stamp(grads)
        pre, post = ((1.0 / c.gradient_predivide_factor, c.gradient_predivide_factor)
                     if op == hvd.Average else (1.0, 1.0))
        with tf.control_dependencies([t_local]):
            grads = hvd.grouped_allreduce(grads, op=op, compression=compression,
                                          prescale_factor=pre, postscale_factor=post)
        return loss, sums, grads, t_local

    def _flat_exchange(self, x, y, compression):
        """grad_exchange = flat: local gradients of the loss scaled by 1/(size x predivide), so
        that the sum over ranks is the average without a pass over the gradients, reduced as
        one buffer (``_flat_allreduce``)."""
        share = self.share if self.share is not None else 1.0 / self.hvd.size()
        scale = share / self.cfg.gradient_predivide_factor
        loss, sums, grads = self._local_gradients(x, y, scale)
        t_local = self._stamp(grads)
        if self.hvd.size() == 1:          # nothing to reduce (as DistributedGradientTape)
            post = self.cfg.gradient_predivide_factor
            return loss, sums, grads if post == 1.0 else [g * post for g in grads], t_local
        with self.tf.control_dependencies([t_local]):
            return loss, sums, self._flat_allreduce(grads, compression), t_local

    def _flat_allreduce(self, grads, compression):
        """The gradients in one contiguous buffer, one Horovod sum allreduce, split back: one
        tensor per step leaves Horovod nothing to fuse or negotiate tensor by tensor; except,
        on CPU, the large ones.

        On CPU, a gradient of ``OWN_ALLREDUCE_BYTES`` or more has an allreduce of its own
        instead: TensorFlow hands each gradient over in a buffer of its own, so the buffer's
        concatenation and split copy every byte twice, and for a large gradient those copies
        cost more than one more allreduce. Horovod reduces such a gradient in its own buffer,
        in place (our patch 0009), and the flat exchange without compression sets Horovod's
        fusion threshold to 0 so that it does not copy them into its fusion buffer
        (``horovod_environment``). A compressor needs the whole vector and gets it."""
        tf, hvd = self.tf, self.hvd
        own = [] if self.compressor is not None else self._own_allreduces
        reduced = {i: hvd.allreduce(grads[i], op=hvd.Sum, compression=compression,
                                    postscale_factor=self.cfg.gradient_predivide_factor,
                                    name=f"harness_grads.{i}") for i in own}
        rest = [i for i in range(len(grads)) if i not in reduced]
        # One buffer per dtype: a model may hold a float64 or float16 layer among float32 ones.
        # A compressor works on the whole float32 vector, as its layout has it.
        dtypes = sorted({grads[i].dtype.name for i in rest})
        if self.compressor is not None and rest:
            dtypes = ["float32"]
        for dtype in dtypes:
            group = [i for i in rest if self.compressor is not None or
                     grads[i].dtype.name == dtype]
            flat = tf.concat([tf.cast(tf.reshape(grads[i], [-1]), dtype) for i in group], 0)
            if self.compressor is not None:
                flat = self.compressor.exchange(flat)
                if self.cfg.gradient_predivide_factor != 1.0:
                    flat = flat * self.cfg.gradient_predivide_factor
            else:
                flat = hvd.allreduce(flat, op=hvd.Sum, compression=compression,
                                     postscale_factor=self.cfg.gradient_predivide_factor,
                                     name="harness_grads" if len(dtypes) == 1 else
                                     f"harness_grads.{dtype}")
            shapes = [self.tf_trainable[i].shape for i in group]
            parts = tf.split(flat, [int(np.prod(s)) for s in shapes])
            reduced.update((i, tf.cast(tf.reshape(p, s), grads[i].dtype))
                           for i, p, s in zip(group, parts, shapes))
        return [reduced[i] for i in range(len(grads))]

    @property
    def _own_allreduces(self) -> list[int]:
        """The gradients (indices) that the flat exchange reduces apart (``_flat_allreduce``)."""
        if self.gpu:      # a device copy costs next to nothing against an allreduce's latency
            return []
        return [i for i, v in enumerate(self.tf_trainable)
                if int(np.prod(v.shape)) * v.dtype.size >= OWN_ALLREDUCE_BYTES]

    def elastic_run(self, func):
        """Horovod's TF ``elastic.run`` turns a failed Horovod op into HorovodInternalError
        only when the op's name is in TensorFlow's message, and returns None (the error
        swallowed) otherwise; this wrapper re-raises everything it does not translate."""
        from horovod.common.elastic import run_fn
        from horovod.common.exceptions import HorovodInternalError
        from horovod.tensorflow.elastic import _reset

        def wrapper(state, *args, **kwargs):
            with self._peer_failures(HorovodInternalError):
                return func(state, *args, **kwargs)

        return run_fn(wrapper, _reset)

    @contextlib.contextmanager
    def _peer_failures(self, as_error):
        """A Horovod op that failed because a peer is gone raises TensorFlow's UnknownError
        naming the op: that becomes ``as_error`` (HorovodInternalError, which the elastic run
        answers with a reset); any other error stays what it is."""
        try:
            yield
        except self.tf.errors.UnknownError as e:
            if "Horovod" in (e.message or ""):
                raise as_error(e) from e
            raise

    def bcast_object(self, obj):
        from horovod.common.exceptions import HorovodInternalError

        with self._peer_failures(HorovodInternalError):    # the sync runs outside the wrapper
            return super().bcast_object(obj)

    #: this rank's weight in the reduced gradient sum (None: 1/size); elastic resizes set it
    share: float | None = None

    def resize(self, share: float) -> None:
        self.share = share
        # the step's graph holds the old size and share: trace it anew
        self._train_fn = self._graph(self._train_step_graph, self._train_fn.input_signature)

    def broadcast_state(self, resumed: bool = False) -> None:
        variables = tf_variables(self.model.variables) + \
            tf_variables(optimizer_variables(self.opt))
        # in a graph of our own: Horovod's eager path wraps the same ops in a tf.function
        # with autograph, which ran every variable's broadcast through autograph's wrapper
        def broadcast():
            self.hvd.broadcast_variables(variables, root_rank=0)

        self._graph(broadcast)()


class MPITFBackend(MPIComm, TFBackend):
    """No Horovod: one in-place mpi4py Allreduce of the flat gradient per step."""

    def setup(self, task: Task, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        super().setup(task, x, y, lr)
        tf, scale = self.tf, 1.0 / self.comm.size

        def flat_gradients(x, y):
            # the loss scaled by 1/size, as on Horovod's flat exchange: the sum over ranks is
            # the average, and compression's residuals have the same scale on both paths (to
            # the bit, at any world size), so a checkpoint resumes on either
            # one float32 host buffer, as the flat layout has it: a float64 or float16
            # layer's gradient is reduced in float32 and cast back (_apply_flat)
            loss, sums, grads = self._local_gradients(x, y, scale)
            return loss, sums, tf.concat([tf.cast(tf.reshape(g, [-1]), tf.float32)
                                          for g in grads], 0)

        def spec(a: np.ndarray):
            return tf.TensorSpec([None, *a.shape[1:]], tf.as_dtype(a.dtype))

        self._flat_grad_fn = self._graph(flat_gradients, [spec(x), spec(y)])

    def train_step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        tf = self.tf
        loss, sums, flat_t = self._flat_grad_fn(x, y)
        t1 = time.perf_counter()
        flat = np.array(flat_t)             # a host buffer of our own, reduced in place
        if self.comm.size > 1:
            with self.waiting():
                if self.compressor is not None:
                    flat = self.compressor.exchange(flat)
                else:
                    self.comm.allreduce_flat_(flat)
        exchange_s = time.perf_counter() - t1
        applied = bool(self._apply_fn(tf.constant(flat)))
        return StepResult(float(loss), self._metrics(sums), applied, exchange_s=exchange_s)

    def _broadcast_state(self, resumed: bool) -> None:
        if self.comm.size == 1:
            return
        for v in list(self.model.variables) + optimizer_variables(self.opt):
            host = np.array(v.numpy())
            self.comm.bcast_(host)
            v.assign(host)

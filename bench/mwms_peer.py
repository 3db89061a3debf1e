"""A bare TensorFlow MultiWorkerMirroredStrategy loop, a peer of ``harness train``
(bench/peers.py).

What a TensorFlow user writes without the harness, after TensorFlow's "custom training loop with
MultiWorkerMirroredStrategy" tutorial: one process per worker, ``TF_CONFIG`` names the cluster
and this worker, the Keras 3 model and its SGD optimizer are built under ``strategy.scope()``,
and each step is ``strategy.run(step_fn)`` inside a ``tf.function``; the loss is
``tf.nn.compute_average_loss`` over the global batch and Keras's optimizer sums the gradients
over the workers (MWMS's collective ops on gRPC, ring implementation on CPUs). The custom loop
rather than ``model.fit``: it is the shape TensorFlow documents for MWMS when the input is one's
own arrays, and it feeds every step's batch the same way the other tools do (``model.fit``
would put a ``tf.data`` pipeline and Keras's callbacks into the loop).

It trains the harness's own Keras model (``models.load_impl(MODEL, "tensorflow")``) from the
same initial weights (``spec.init_weights(seed)``, in Keras layout) on the same synthetic array
as ``harness train --dataset synthetic``, with the harness's batch order without shuffling
(worker r of step s takes rows ``s*G + r*B .. s*G + r*B + B``), its per-worker threads (the
node's cores / local workers, intra-op; one inter-op thread, as the harness), its optimizer (SGD,
lr x workers, momentum) and loss (sparse softmax cross-entropy).

Worker 0 reads ``time.perf_counter()`` once per step after reading the step's loss on the host
(the harness reads every step's loss too) and reports the wall clock from step WARMUP's mark to
step STEPS' mark: STEPS - WARMUP whole steps, everything in them included.

    TF_CONFIG='{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": I}}' \\
        python bench/mwms_peer.py MODEL BATCH STEPS SAMPLES WARMUP

Prints one JSON line (worker 0): kind ``peer_result``, tool ``mwms``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    model, batch, steps, samples, warmup = sys.argv[1:6]
    batch, steps, samples, warmup = int(batch), int(steps), int(samples), int(warmup)
    from harness.backends.common import configure_threads
    from harness.config import RunConfig
    from harness.driver import load_task_data
    from harness.env import World
    from models import config_options, get_spec, load_impl

    tf_config = json.loads(os.environ["TF_CONFIG"])
    rank, size = tf_config["task"]["index"], len(tf_config["cluster"]["worker"])
    cfg = RunConfig(framework="tensorflow", model=model, dataset="synthetic",
                    synthetic_samples=samples)
    # every worker on this one host: local workers = workers
    threads = configure_threads(cfg, World(rank, size, rank, size, "TF_CONFIG"))
    _, data = load_task_data(cfg)
    spec = get_spec(model, data.input_shape, data.num_classes, **config_options(cfg))
    weights = spec.init_weights(cfg.seed)

    import keras
    import tensorflow as tf

    from models.base import to_keras_layout
    from models.tf_layers import canonical_variables

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    global_batch = batch * size
    with strategy.scope():
        net = load_impl(model, "tensorflow").build(spec, keras)
        for p in spec.params:
            canonical_variables(net)[p.name].assign(to_keras_layout(p.kind, weights[p.name]))
        opt = keras.optimizers.SGD(learning_rate=cfg.lr * size, momentum=cfg.momentum)

    def step_fn(x, y):
        with tf.GradientTape() as tape:
            logits = net(x, training=True)
            per_sample = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
            if len(per_sample.shape) > 1:         # gpt: a sample's loss is its tokens' mean
                per_sample = tf.reduce_mean(per_sample, axis=list(range(1, len(per_sample.shape))))
            loss = tf.nn.compute_average_loss(per_sample, global_batch_size=global_batch)
        grads = tape.gradient(loss, net.trainable_variables)
        opt.apply_gradients(zip(grads, net.trainable_variables))
        return loss

    @tf.function
    def train_step(x, y):
        per_replica = strategy.run(step_fn, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    per_epoch = samples // global_batch
    marks = []
    for i in range(steps):
        s = (i % per_epoch) * global_batch + rank * batch
        loss = train_step(data.x_train[s:s + batch], data.y_train[s:s + batch])
        float(loss)
        marks.append(time.perf_counter())
    if rank == 0:
        seconds = marks[steps - 1] - marks[warmup - 1]
        print(json.dumps({"kind": "peer_result", "tool": "mwms", "model": model, "ranks": size,
                          "batch": batch, "steps": steps, "warmup": warmup, "seconds": seconds,
                          "samples_per_s": (steps - warmup) * global_batch / seconds,
                          "threads_per_rank": threads, "loop": "custom (strategy.run)",
                          "tensorflow": tf.__version__, "keras": keras.__version__}),
              flush=True)


if __name__ == "__main__":
    main()

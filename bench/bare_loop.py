"""A bare Horovod training loop: the reference the harness's overhead is measured against.

It has the shape of Horovod's ``pytorch_synthetic_benchmark.py`` and
``tensorflow2_synthetic_benchmark.py`` (wrap the optimizer or the tape, broadcast, loop, time),
but trains the harness's own model on the same synthetic array, in the same contiguous batch
order and with the same per-rank thread count, so the only difference left is the harness.

Rank 0 reads ``time.perf_counter()`` once per step, right after the step returns (the point at
which ``harness train`` takes a step record's ``wall_s``), and reports the wall-clock time from
step WARMUP's mark to step STEPS' mark: STEPS - WARMUP whole steps, everything in them included.

    mpirun -np 2 python -m bench.bare_loop FRAMEWORK MODEL BATCH STEPS SAMPLES WARMUP
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def main() -> None:
    framework, model, batch, steps, samples, warmup = sys.argv[1:7]
    batch, steps, samples, warmup = int(batch), int(steps), int(samples), int(warmup)
    from harness.config import RunConfig
    from harness.backends.common import configure_threads
    from harness.env import detect_world
    from harness.driver import load_task_data
    from models import config_options, get_spec

    cfg = RunConfig(framework=framework, model=model, dataset="synthetic",
                    synthetic_samples=samples)
    world = detect_world()
    threads = configure_threads(cfg, world)
    _, data = load_task_data(cfg)
    spec = get_spec(model, data.input_shape, data.num_classes, **config_options(cfg))
    weights = spec.init_weights(cfg.seed)
    times, marks = [], []
    if framework == "torch":
        import torch
        import torch.nn.functional as F
        import horovod.torch as hvd

        from models import load_impl

        torch.set_num_threads(threads)
        hvd.init()
        net = load_impl(model, "torch").build(spec)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr * hvd.size(), momentum=cfg.momentum)
        opt = hvd.DistributedOptimizer(opt, named_parameters=net.named_parameters())
        hvd.broadcast_parameters(net.state_dict(), root_rank=0)
        rank, size = hvd.rank(), hvd.size()
        per_epoch = samples // (batch * size)
        for i in range(steps):
            s = (i % per_epoch) * batch * size + rank * batch
            t0 = time.perf_counter()
            x = torch.from_numpy(data.x_train[s:s + batch])
            y = torch.from_numpy(data.y_train[s:s + batch])
            opt.zero_grad()
            loss = F.cross_entropy(net(x).flatten(0, -2), y.flatten())   # gpt: per token
            loss.backward()
            opt.step()
            marks.append(time.perf_counter())
            times.append(marks[-1] - t0)
    else:
        import tensorflow as tf
        import keras
        import horovod.tensorflow as hvd

        from harness.backends.horovod_tf import tf_variables
        from models import load_impl
        from models.base import to_keras_layout
        from models.tf_layers import canonical_variables

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        hvd.init()
        net = load_impl(model, "tensorflow").build(spec, keras)
        for p in spec.params:
            canonical_variables(net)[p.name].assign(to_keras_layout(p.kind, weights[p.name]))
        opt = keras.optimizers.SGD(learning_rate=cfg.lr * hvd.size(), momentum=cfg.momentum)
        variables = tf_variables(net.trainable_variables)

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                logits = net(x, training=True)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            tape = hvd.DistributedGradientTape(tape)
            grads = tape.gradient(loss, variables)
            opt.apply_gradients(zip(grads, net.trainable_variables))
            return loss

        rank, size = hvd.rank(), hvd.size()
        per_epoch = samples // (batch * size)
        for i in range(steps):
            s = (i % per_epoch) * batch * size + rank * batch
            t0 = time.perf_counter()
            step(data.x_train[s:s + batch], data.y_train[s:s + batch])
            if i == 0:
                hvd.broadcast_variables(tf_variables(net.variables) +
                                        tf_variables(opt.variables), root_rank=0)
            marks.append(time.perf_counter())
            times.append(marks[-1] - t0)
    if rank == 0:
        timed = times[warmup:]
        print(json.dumps({"kind": "bare_loop", "framework": framework, "model": model,
                          "ranks": size, "batch": batch, "steps": steps, "warmup": warmup,
                          "steps_timed": len(timed),
                          # steps WARMUP+1 .. STEPS, from step WARMUP's mark to step STEPS'
                          "wall_s": marks[steps - 1] - marks[warmup - 1],
                          "outside_steps_s": marks[steps - 1] - marks[warmup - 1] - sum(timed),
                          "step_time_p50_s": float(np.median(timed)),
                          "threads_per_rank": threads,
                          "horovod_cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME"),
                          "env": {k: v for k, v in sorted(os.environ.items())
                                  if k.startswith(("HOROVOD_", "OMPI_MCA_mpi_yield"))}}),
              flush=True)


if __name__ == "__main__":
    main()

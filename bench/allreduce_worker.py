"""One rank of the allreduce benchmark; started by ``bench/allreduce.py`` under mpirun.

    python -m bench.allreduce_worker GROUP TRANSPORT SIZES ITERS

GROUP picks what runs in these processes (never torch and TensorFlow together, and every
gradient path in its own processes: Horovod's background thread competes for the core with
anything else measured beside it):

* ``mpi``: ``mpi4py`` ``Allreduce(IN_PLACE, SUM)`` of float32 numpy arrays, the reference;
* ``torch``: stock ``hvd.allreduce_`` sum and average; on TCP also ``torch.distributed`` gloo;
* ``harness-optimizer``, ``harness-flat``, ``harness-mpi``: the harness's PyTorch gradient
  exchange for an MLP whose gradients total SIZE bytes, with the Horovod settings the harness
  applies: ``DistributedOptimizer.synchronize()`` (the default ``grad_exchange``), one in-place
  Horovod allreduce of the flat gradient buffer (``grad_exchange = "flat"``), or one in-place
  mpi4py Allreduce of it (``allreduce = "mpi"``; both scale the loss by 1/size, so no pass
  follows the sum);
* ``tensorflow``: ``hvd.allreduce`` sum and average of TF tensors;
* ``harness-tf-flat``: the harness's TensorFlow flat exchange (the default) for an MLP whose
  gradients total SIZE bytes. Each call makes the gradients afresh in the graph, as the
  backward pass does (Horovod reduces in place only a buffer that nothing else holds); the
  time of making them is subtracted from every sample (``baseline_us_median_subtracted``: the
  median of a function that only makes them less that of a function that does nothing, so
  the exchange's own call stays in its time).

Bus bandwidth follows nccl-tests: algbw x 2(n-1)/n.

The worker initialises MPI (mpi4py) before anything else, so Open MPI settings such as
``OMPI_MCA_mpi_yield_when_idle`` must be in the launched process's environment (the launcher's
``-x``); each record carries the values every rank had at its start, before ``MPI_Init``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def timed(fn, iters: int, barrier) -> list[float]:
    out = []
    for _ in range(iters):
        barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def torch_impls(comm, transport: str) -> dict:
    """Stock Horovod on torch tensors (and torch.distributed gloo on TCP)."""
    import torch
    import horovod.torch as hvd

    torch.set_num_threads(1)
    hvd.init()

    def horovod(op):
        def make(nbytes):
            t = torch.ones(nbytes // 4)
            return lambda: hvd.allreduce_(t, op=op, name="bench")
        return make

    impls = {"horovod_sum": horovod(hvd.Sum), "horovod_avg": horovod(hvd.Average)}
    if transport == "tcp":
        import torch.distributed as dist

        port = np.array([0], np.int64)
        if comm.Get_rank() == 0:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port[0] = s.getsockname()[1]
        comm.Bcast(port, root=0)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(int(port[0])))
        dist.init_process_group("gloo", rank=comm.Get_rank(), world_size=comm.Get_size())

        def gloo(nbytes):
            t = torch.ones(nbytes // 4)
            return lambda: dist.all_reduce(t)
        impls["torch_gloo"] = gloo
    return impls


def harness_impls(comm, exchange: str) -> dict:
    """The harness's PyTorch gradient exchange, set up as ``harness train`` sets it up (its
    Horovod settings included), for an MLP whose gradients total SIZE bytes."""
    import torch

    from harness.backends.base import create
    from harness.config import RunConfig
    from harness.env import World
    from harness.data import Data
    from models import get_spec
    from models.tasks import torch_task

    path = "mpi" if exchange == "mpi" else "horovod"
    cfg = RunConfig(model="mlp", allreduce=path, threads_per_rank=1,
                    grad_exchange="flat" if exchange == "mpi" else exchange)
    rank, size = comm.Get_rank(), comm.Get_size()
    backend = create(cfg, World(rank, size, rank, size, "Open MPI"), path)
    backend.init_distributed()

    def make(nbytes):
        # mlp's first layer is 128 x features: size it so the gradients total ~nbytes
        features = max(1, (nbytes // 4 - 128 * 64 - 64 * 10) // 128)
        spec = get_spec("mlp", (features,), 10)
        b = create(cfg, World(rank, size, rank, size, "Open MPI"), path)
        b.__dict__.update({k: v for k, v in backend.__dict__.items()
                           if k in ("hvd", "hvd_env", "comm")})
        x = np.zeros((2, features), np.float32)
        y = np.zeros(2, np.int64)
        b.setup(torch_task(spec, Data(train=(x, y), test=(x, y))), x, y, 0.1)
        if exchange == "optimizer":
            for p in b.params:
                p.grad = torch.ones_like(p)
            return b.optimizer.synchronize            # what step() runs for the exchange
        flat = b._use_flat_grads()
        flat.fill_(1.0)
        if exchange == "flat":
            return b._exchange_flat

        def mpi_exchange():
            b.comm.allreduce_flat_(flat.numpy())
        return mpi_exchange
    return {f"harness_{exchange}": make}


def harness_tf_impls(comm) -> dict:
    """The harness's TensorFlow flat exchange (grad_exchange = flat, the default) of an MLP's
    gradients totalling SIZE bytes (``HorovodTFBackend._flat_allreduce`` in a ``tf.function``):
    the first layer's kernel, from 1 MiB on, reduced in place by an allreduce of its own, the
    rest concatenated, reduced by one Horovod sum allreduce and split back; with the harness's
    Horovod settings."""
    import tensorflow as tf

    from harness.backends.base import create
    from harness.config import RunConfig
    from harness.data import Data
    from harness.env import World
    from models import get_spec
    from models.tasks import keras_task

    cfg = RunConfig(framework="tensorflow", model="mlp", allreduce="horovod",
                    threads_per_rank=1)
    rank, size = comm.Get_rank(), comm.Get_size()
    world = World(rank, size, rank, size, "Open MPI")
    backend = create(cfg, world, "horovod")
    backend.init_distributed()
    none = backend.hvd.Compression.none

    def make(nbytes):
        features = max(1, (nbytes // 4 - 128 * 64 - 64 * 10) // 128)
        spec = get_spec("mlp", (features,), 10)
        b = create(cfg, world, "horovod")
        b.__dict__.update({k: v for k, v in backend.__dict__.items()
                           if k in ("hvd", "hvd_env")})
        x = np.zeros((2, features), np.float32)
        y = np.zeros(2, np.int64)
        b.setup(keras_task(spec, Data(train=(x, y), test=(x, y))), x, y, 0.1)
        # fresh gradients each call, as the backward pass hands them over: buffers that
        # nothing else holds, which Horovod may reduce in place (constants captured by the
        # graph would be held by it). Filled from a variable, so that the graph cannot fold
        # them into constants. The fill's own work is measured apart and subtracted: a
        # function that only fills, less one that only reads the variable (the call itself,
        # which the exchange pays, stays in)
        shapes = [tuple(v.shape) for v in b.tf_trainable]
        one = tf.Variable(1.0)
        exchange = tf.function(lambda: b._flat_allreduce([tf.fill(s, one) for s in shapes],
                                                         none))

        def run():
            return exchange()
        run.baseline = tf.function(lambda: [tf.fill(s, one) for s in shapes])
        run.baseline_call = tf.function(lambda: one + 0.0)
        return run
    return {"harness_tf_flat": make}


def tf_impls() -> dict:
    import tensorflow as tf
    import horovod.tensorflow as hvd

    tf.config.threading.set_intra_op_parallelism_threads(1)
    hvd.init()

    def horovod(op):
        def make(nbytes):
            t = tf.ones([nbytes // 4])
            return lambda: hvd.allreduce(t, op=op, name="bench").numpy()
        return make
    return {"horovod_sum": horovod(hvd.Sum), "horovod_avg": horovod(hvd.Average)}


#: what Open MPI and Horovod read from the environment, as this process had it at its start
WATCHED = ("OMPI_MCA_mpi_yield_when_idle", "HOROVOD_WAKE_ON_ENQUEUE", "HOROVOD_CYCLE_TIME",
           "HOROVOD_FUSION_THRESHOLD")


def main() -> None:
    at_start = {k: os.environ.get(k) for k in WATCHED}      # before MPI_Init (mpi4py) below
    group, transport, sizes_arg, iters_arg = sys.argv[1:5]
    sizes = [int(s) for s in sizes_arg.split(",")]
    iters = int(iters_arg)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from harness.backends.mpi_comm import mpi

    MPI = mpi()
    comm = MPI.COMM_WORLD.Dup()
    rank, n = comm.Get_rank(), comm.Get_size()
    env_ranks = comm.gather(at_start, root=0)        # every rank's, for the records
    if group == "mpi":
        def mpi4py(nbytes):
            a = np.ones(nbytes // 4, np.float32)
            return lambda: comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        impls = {"mpi4py": mpi4py}
    elif group == "torch":
        impls = torch_impls(comm, transport)
    elif group == "harness-tf-flat":
        impls = harness_tf_impls(comm)
    elif group.startswith("harness-"):
        impls = harness_impls(comm, group.split("-", 1)[1])
    else:
        impls = tf_impls()
    for nbytes in sizes:
        it = max(5, min(iters, int(iters * (1 << 22) / max(nbytes, 1 << 16))))
        for name, make in impls.items():
            fn = make(nbytes)
            timed(fn, max(3, it // 4), comm.Barrier)            # warm-up
            times = timed(fn, it, comm.Barrier)
            base = getattr(fn, "baseline", None)     # work in fn that is not the exchange
            base_t = 0.0
            if base is not None:         # the baseline's work: its time less a bare call's
                for f in (base, fn.baseline_call):
                    timed(f, max(3, it // 4), comm.Barrier)
                base_t = float(np.median(timed(base, it, comm.Barrier)) -
                               np.median(timed(fn.baseline_call, it, comm.Barrier)))
                times = [t - base_t for t in times]
            t = float(np.median(times))
            if rank == 0:
                print(json.dumps({
                    "kind": "allreduce", "impl": name, "group": group, "transport": transport,
                    "bytes": nbytes, "ranks": n, "iters": it, "time_us_median": t * 1e6,
                    "time_us_p10": float(np.percentile(times, 10)) * 1e6,
                    "algbw_GBps": nbytes / t / 1e9,
                    "busbw_GBps": nbytes / t * 2 * (n - 1) / n / 1e9,
                    **({"baseline_us_median_subtracted": base_t * 1e6} if base else {}),
                    "horovod_cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME"),
                    "env_at_start": env_ranks,
                    "env_after_setup": {k: os.environ.get(k) for k in WATCHED}}), flush=True)
    if group == "torch" and transport == "tcp":
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

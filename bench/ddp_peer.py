"""A bare PyTorch DistributedDataParallel loop (gloo), a peer of ``harness train`` (bench/peers.py).

What a PyTorch user writes without the harness: ``torchrun`` starts the ranks,
``init_process_group("gloo")``, ``DistributedDataParallel(model)`` with its default buckets, SGD,
a loop. It trains the harness's own torch model (``models.load_impl(MODEL, "torch")``) from the
same initial weights (``spec.init_weights(seed)``) on the same synthetic array that
``harness train --dataset synthetic`` loads, with the harness's per-rank batch order without
shuffling (rank r of step s takes rows ``s*G + r*B .. s*G + r*B + B``, G = B x ranks, as
harness/data.py's Sharder), the harness's per-rank threads (the node's cores / local ranks,
``configure_threads``), its optimizer (SGD, lr x ranks, momentum) and cross-entropy loss.

Rank 0 reads ``time.perf_counter()`` once per step after the step's ``loss.item()`` (the harness
reads the loss of every step too) and reports the wall clock from step WARMUP's mark to step
STEPS' mark: STEPS - WARMUP whole steps with everything in them (batch slicing, forward,
backward with DDP's bucketed allreduces, the update, the loss read).

    torchrun --standalone --nproc_per_node=NP bench/ddp_peer.py MODEL BATCH STEPS SAMPLES WARMUP

Prints one JSON line (rank 0): kind ``peer_result``, tool ``ddp``.
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

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    cfg = RunConfig(framework="torch", model=model, dataset="synthetic",
                    synthetic_samples=samples)
    threads = configure_threads(cfg, World(rank, size, local_rank, local_size, "torchrun"))
    _, data = load_task_data(cfg)
    spec = get_spec(model, data.input_shape, data.num_classes, **config_options(cfg))
    weights = spec.init_weights(cfg.seed)

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    dist.init_process_group("gloo")
    net = load_impl(model, "torch").build(spec)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    ddp = DistributedDataParallel(net)            # broadcasts rank 0's weights
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr * size, momentum=cfg.momentum)
    per_epoch = samples // (batch * size)
    marks = []
    for i in range(steps):
        s = (i % per_epoch) * batch * size + rank * batch
        x = torch.from_numpy(data.x_train[s:s + batch])
        y = torch.from_numpy(data.y_train[s:s + batch])
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x).flatten(0, -2), y.flatten())   # gpt: per token
        loss.backward()
        opt.step()
        loss.item()
        marks.append(time.perf_counter())
    if rank == 0:
        seconds = marks[steps - 1] - marks[warmup - 1]
        print(json.dumps({"kind": "peer_result", "tool": "ddp", "model": model, "ranks": size,
                          "batch": batch, "steps": steps, "warmup": warmup, "seconds": seconds,
                          "samples_per_s": (steps - warmup) * batch * size / seconds,
                          "threads_per_rank": threads, "backend": dist.get_backend(),
                          "torch": torch.__version__}), flush=True)
    # every rank done with its collectives before gloo is torn down: a rank that tears down
    # while the other is still in its last allreduce aborts ("terminate called without an
    # active exception", seen once in a clean-clone run)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

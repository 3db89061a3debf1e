"""One rank of the fusion benchmark: N tensors allreduced asynchronously, then synchronized."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def main() -> None:
    n, elems, rounds = (int(v) for v in sys.argv[1:4])
    import torch
    import horovod.torch as hvd

    torch.set_num_threads(1)
    hvd.init()
    flat_mode = os.environ.get("BENCH_FLAT") == "1"
    flat = torch.ones(n * elems)
    # flat: the same tensors as views of one buffer, reduced by one in-place allreduce (what the
    # harness's grad_exchange = "flat" does with gradients)
    tensors = [flat[i * elems:(i + 1) * elems] if flat_mode else torch.ones(elems)
               for i in range(n)]
    times = []
    for r in range(rounds + 3):
        t0 = time.perf_counter()
        if flat_mode:
            hvd.allreduce_(flat, op=hvd.Sum, name="flat")
        else:
            handles = [hvd.allreduce_async_(t, op=hvd.Sum, name=f"t{i}") for i, t in
                       enumerate(tensors)]
            for h in handles:
                hvd.synchronize(h)
        if r >= 3:
            times.append(time.perf_counter() - t0)
    if hvd.rank() == 0:
        print(json.dumps({"kind": "fusion_round", "tensors": n, "tensor_bytes": elems * 4,
                          "rounds": rounds, "round_ms_median": float(np.median(times)) * 1e3,
                          "fusion_threshold": os.environ.get("HOROVOD_FUSION_THRESHOLD",
                                                             "default (128 MiB)"),
                          "flat_buffer": flat_mode}),
              flush=True)


if __name__ == "__main__":
    main()

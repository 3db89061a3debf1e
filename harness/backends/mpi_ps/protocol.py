"""Messages between parameter-server ranks and workers: fixed-size float64 headers followed by
float32 payloads, all through mpi4py's buffer API (nothing is pickled).

Worker -> server, tag ``HDR``: ``[kind, clock, version_used, samples, loss, correct,
compute_s, latency_s, epoch, aux]``, then for ``PUSH`` the gradient shard (tag ``GRAD``) and
for ``LEAVE`` the reason as UTF-8 bytes (tag ``REASON``).
Server -> worker, tag ``PARAMS_HDR``: ``[version, start_clock, flags, 0]``, then the parameter
shard (tag ``PARAMS``). ``FINAL`` sends the finished parameters to the evaluating worker.
"""

from __future__ import annotations

import numpy as np

# tags
HDR, GRAD, REASON, PARAMS_HDR, PARAMS, FINAL_HDR, FINAL = 11, 12, 13, 21, 22, 31, 32

# header kinds
PULL, PUSH, DONE, LEAVE, EVAL = 1, 2, 3, 4, 5
KIND_NAMES = {PULL: "pull", PUSH: "push", DONE: "done", LEAVE: "leave", EVAL: "eval"}

HEADER_LEN = 10
REPLY_LEN = 4

# reply flags
FLAG_STOP = 1.0     # the server is shutting down: stop training


def header(kind: int, clock: int = 0, version_used: int = 0, samples: int = 0, loss: float = 0.0,
           correct: float = 0.0, compute_s: float = 0.0, latency_s: float = 0.0, epoch: int = 0,
           aux: float = 0.0) -> np.ndarray:
    return np.array([kind, clock, version_used, samples, loss, correct, compute_s, latency_s,
                     epoch, aux], dtype=np.float64)


def server_ranks(num_servers: int) -> range:
    """Servers are placed first so `srun`/`mpirun` block placement puts them together."""
    return range(num_servers)


def worker_ranks(num_servers: int, size: int) -> range:
    return range(num_servers, size)

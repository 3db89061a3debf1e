"""Messages between parameter-server ranks and workers: fixed-size float64 headers followed by
float32 payloads, all through mpi4py's buffer API (nothing is pickled).

Worker -> server, tag ``HDR``: a header of :data:`HEADER_FIELDS` (index it with the constants
below, never with a bare number), then for ``PUSH`` the gradient shard (tag ``GRAD``) and for
``LEAVE`` the reason as UTF-8 bytes (tag ``REASON``).
Server -> worker, tag ``PARAMS_HDR``: a reply of :data:`REPLY_FIELDS`, then the parameter
shard (tag ``PARAMS``). ``FINAL_HDR`` ends the run for a worker that finished or failed
(:data:`FINAL_EVALUATE`, :data:`FINAL_DONE`, :data:`FINAL_RELEASE`, :data:`FINAL_PREEMPTED`);
``FINAL`` sends the finished parameters to the evaluating worker.

Stopping (preemption). A worker with a stop request of its own sets :data:`STOP` in its next
push's ``flags``; a server that has a stop request (its own signal, a flagged push, a
``STOPPED`` or ``STOP_REQUEST`` message) answers every reply with :data:`FLAG_STOP`. A worker
that sees the flag in any server's reply has pushed that clock to every server: it pushes no
more and sends ``STOPPED`` to every server. Once no worker is active, every server has applied
exactly the same pushes of every worker (a consistent cut) and checkpoints its shard with each
worker's clock. A worker that finished or failed and then gets a stop request sends
``STOP_REQUEST``; every worker that waits for ``FINAL_HDR`` answers it with ``BYE`` to every
server, so no message is left unreceived when the job ends.

Joining (``ps_join``, see ``join``). A push flagged :data:`JOIN` carries a join request's number
in ``aux``. Server 0 acts on it: it orders every other server to connect to the joiner
(:data:`JOIN_ORDER`, so all servers take joiners in server 0's order), connects itself, sends
the decision (:data:`ADMIT_FIELDS`, tag ``ADMIT``), and the joiner sends it on to every
server. A joined worker then speaks the same messages over its intercommunicator with each
server (rank 0 there).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# tags
HDR, GRAD, REASON, PARAMS_HDR, PARAMS, FINAL_HDR, FINAL = 11, 12, 13, 21, 22, 31, 32
ADMIT = 41            # join handshake: server 0's decision, then the joiner's claim to each

# header kinds
PULL, PUSH, DONE, LEAVE, EVAL, STOPPED, STOP_REQUEST, BYE = 1, 2, 3, 4, 5, 6, 7, 8
# server 0 -> server k: connect to a joiner (``aux``: its request, then its port for server k
# as UTF-8 bytes of ``samples`` length, tag ``REASON``)
JOIN_ORDER = 9

# worker -> server header fields
HEADER_FIELDS = ("kind", "clock", "version_used", "samples", "loss", "correct", "compute_s",
                 "latency_s", "epoch", "aux", "flags")
(KIND, CLOCK, VERSION_USED, SAMPLES, LOSS, CORRECT, COMPUTE_S, LATENCY_S, EPOCH, AUX,
 FLAGS) = range(len(HEADER_FIELDS))
HEADER_LEN = len(HEADER_FIELDS)

# server -> worker reply fields: the server's version, the worker's clock on that server
REPLY_FIELDS = ("version", "clock", "flags", "aux")
R_VERSION, R_CLOCK, R_FLAGS, R_AUX = range(len(REPLY_FIELDS))
REPLY_LEN = len(REPLY_FIELDS)

# join handshake: server 0 -> joiner, and joiner -> every server (slot -1: refused)
ADMIT_FIELDS = ("slot", "id", "world_size", "params")
A_SLOT, A_ID, A_WORLD, A_PARAMS = range(len(ADMIT_FIELDS))
ADMIT_LEN = len(ADMIT_FIELDS)

# flags (header and reply)
STOP = 1              # push: this worker has a stop request
SKIPPED = 2           # push: the gradient was not finite and is not applied
JOIN = 4              # push: a worker asks to join (``aux``: its request number, see ``join``)
FLAG_STOP = 1.0       # reply: the job is being preempted, stop after this clock

# FINAL_HDR's first field
FINAL_EVALUATE, FINAL_DONE, FINAL_RELEASE, FINAL_PREEMPTED = 1.0, 0.0, -1.0, -2.0


def header(kind: int, clock: int = 0, version_used: int = 0, samples: int = 0, loss: float = 0.0,
           correct: float = 0.0, compute_s: float = 0.0, latency_s: float = 0.0, epoch: int = 0,
           aux: float = 0.0, flags: int = 0) -> np.ndarray:
    return np.array([kind, clock, version_used, samples, loss, correct, compute_s, latency_s,
                     epoch, aux, flags], dtype=np.float64)


def has(value: float, flag: int) -> bool:
    return bool(int(value) & flag)


def reply(version: int, clock: int, stop: bool) -> np.ndarray:
    return np.array([version, clock, FLAG_STOP if stop else 0.0, 0.0], np.float64)


def final(what: float, version: int) -> np.ndarray:
    return np.array([what, version, 0.0, 0.0], np.float64)


class EvalReport(NamedTuple):
    """An EVAL message: a worker's test loss and first metric after ``epoch``."""

    clock: int
    loss: float
    metric: float             # PSContext.metric: accuracy, else the task's first metric
    samples: int
    epoch: int
    evaluator: int            # the worker's rank


# where EVAL keeps its fields in the fixed header (the one place that knows)
_EVAL_SLOTS = {"clock": CLOCK, "loss": LOSS, "metric": CORRECT, "samples": SAMPLES, "epoch": EPOCH,
               "evaluator": AUX}


def eval_header(report: EvalReport) -> np.ndarray:
    hdr = header(EVAL)
    for name, slot in _EVAL_SLOTS.items():
        hdr[slot] = getattr(report, name)
    return hdr


def decode_eval(hdr: np.ndarray) -> EvalReport:
    return EvalReport(int(hdr[CLOCK]), float(hdr[LOSS]), float(hdr[CORRECT]), int(hdr[SAMPLES]),
                      int(hdr[EPOCH]), int(hdr[AUX]))

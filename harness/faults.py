"""Fault injection for reliability tests and drills.

``HARNESS_FAULT="kind@rank:step"`` (several separated by commas) makes that rank misbehave when
it reaches that global step: ``raise`` (a Python exception), ``exit`` (exit code 13 without
cleanup), ``kill`` (SIGKILL to itself), ``hang`` (sleep forever), ``nan``/``inf`` (its batch
becomes NaN/Inf, so loss and gradients do), ``desync`` (its weights are nudged, as a silently
broken exchange would leave them), ``sigterm``/``sigusr1`` (that signal to itself, as a
scheduler would send before preempting the job), or ``slow`` (from that step on, the rank sleeps
``SLOW_S`` before each step until the file named by ``HARNESS_FAULT_RELEASE`` exists, a path the
rank can see; unset, for the rest of the run; several ``slow`` entries for a rank: the earliest
step counts). A slow worker is a straggler that keeps a job running, still stepping, for as long
as a test or drill needs it; on a parameter server (whose "step" is its version) every update
waits, which slows the whole job.
``rank`` may be ``*`` for every rank. Unset, it costs an attribute test and one dictionary
lookup per step.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from harness.errors import ConfigError

KINDS = ("raise", "exit", "kill", "hang", "nan", "inf", "desync", "sigterm", "sigusr1", "slow")
SLOW_S = 0.25          # a ``slow`` rank's wait before each step


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int | None   # None: every rank
    step: int


def parse(spec: str | None) -> list[Fault]:
    faults = []
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        try:
            kind, where = part.split("@")
            rank, step = where.split(":")
            fault = Fault(kind, None if rank == "*" else int(rank), int(step))
        except ValueError:
            raise ConfigError(f"HARNESS_FAULT entry {part!r} is not kind@rank:step "
                              "(e.g. raise@1:5)") from None
        if fault.kind not in KINDS:
            raise ConfigError(f"HARNESS_FAULT kind {fault.kind!r} is not one of {', '.join(KINDS)}")
        faults.append(fault)
    return faults


class FaultInjector:
    def __init__(self, rank: int, spec: str | None = None, desync=None) -> None:
        spec = os.environ.get("HARNESS_FAULT") if spec is None else spec
        self.rank = rank
        self.desync = desync          # callable that nudges this rank's weights
        faults = [f for f in parse(spec) if f.rank in (None, rank)]
        self.by_step = {f.step: f for f in faults if f.kind != "slow"}
        #: ``slow``: the step it starts at (None: not slowed), and the file that ends it
        self.slow_from = min((f.step for f in faults if f.kind == "slow"), default=None)
        self.release = os.environ.get("HARNESS_FAULT_RELEASE")

    def before_step(self, step: int, x: np.ndarray) -> np.ndarray:
        """Called with the global step about to run (1-based) and this rank's batch."""
        if self.slow_from is not None and step >= self.slow_from:
            if self.release and os.path.exists(self.release):
                self.slow_from = None                   # released: full speed from here on
            else:
                time.sleep(SLOW_S)
        fault = self.by_step.get(step)
        if fault is None:
            return x
        if fault.kind == "raise":
            raise RuntimeError(f"injected fault: rank {self.rank} raises at step {step}")
        if fault.kind == "exit":
            os._exit(13)
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.kind == "hang":
            while True:
                time.sleep(3600)
        if fault.kind in ("sigterm", "sigusr1"):
            os.kill(os.getpid(), signal.SIGTERM if fault.kind == "sigterm" else signal.SIGUSR1)
            return x
        if fault.kind == "desync":
            if self.desync is None:
                raise ConfigError("HARNESS_FAULT kind 'desync' is not supported in this mode")
            self.desync()
            return x
        if x.dtype.kind != "f":
            raise ConfigError(f"HARNESS_FAULT kind {fault.kind!r} makes the batch non-finite, but "
                              f"this task's inputs are {x.dtype} (integers cannot hold NaN/Inf): "
                              "use another fault kind")
        return np.full_like(x, np.nan if fault.kind == "nan" else np.inf)

"""Preemption and stall handling.

Signals (SIGTERM, SIGUSR1; SLURM sends one before the time limit with ``--signal``) only set a
flag. The loop makes every rank agree on it at a step boundary (an allreduce of the flags every
``agree_every`` steps), rank 0 writes an atomic checkpoint, and the process exits with
:data:`EXIT_PREEMPTED` so a batch script can requeue the job. A watchdog thread reports a rank
that makes no progress within ``stall_timeout_s`` by name and ends it, so a stalled job stops
instead of burning its allocation.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any

EXIT_PREEMPTED = 75          # EX_TEMPFAIL: "stopped at a checkpoint, requeue me"
EXIT_STALLED = 4

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by a stop signal; read by the training loop at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopFlag":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:   # noqa: ARG002 - signal handler signature
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


class Watchdog:
    """Ends this rank if ``tick()`` is not called for ``timeout`` seconds.

    The report names the rank, the last step and what it was doing, and dumps every thread's
    stack to stderr; the launcher then stops the other ranks.
    """

    #: the phase of a rank that waits in the gradient exchange for the other ranks
    WAITING = "waiting for the other ranks' gradients"

    def __init__(self, rank: int, timeout: float, log, stall_inspector: bool = False) -> None:
        self.rank, self.timeout, self.log = rank, timeout, log
        #: Horovod's stall inspector reports the ranks missing from a collective
        self.stall_inspector = stall_inspector
        #: a rank waiting on the others reports this much later, so that a rank stalled
        #: elsewhere (the cause) reports itself first and the launcher stops the job on it
        self.grace = max(2.0, timeout / 4)
        self.phase, self.step = "starting", 0
        self._waits, self._outer = 0, self.phase       # collectives this rank is inside
        self.describe = None            # optional callable: more context for the report
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harness-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def tick(self, step: int | None = None, phase: str | None = None) -> None:
        self._last = time.monotonic()
        if step is not None:
            self.step = step
        if phase is not None:
            self.phase = phase

    def wait(self, on: bool, what: str | None = None) -> None:
        """This rank enters (``on``) or leaves a collective that waits for the other ranks
        (nested ones count once): its report comes ``grace`` later, and names the phase it
        waits in (``what``, where given)."""
        if on:
            if self._waits == 0:
                self._outer = self.phase
                self.tick(phase=what or (self.WAITING if self.phase == "training" else
                                         f"waiting for the other ranks ({self.phase})"))
            self._waits += 1
            return
        if self._waits == 0:
            return                          # not inside one (an exit without its entry)
        self._last = time.monotonic()    # the time first, as tick(): see _run
        self._waits -= 1
        if self._waits == 0:
            self.phase = self._outer

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            # the phase first: tick() writes the time, then the phase, so a new phase is
            # never read with the time before it (a wait that just ended is not a stall)
            waiting = self._waits > 0
            idle = time.monotonic() - self._last
            if idle > self.timeout + (self.grace if waiting else 0.0):
                if waiting:
                    why = ("a rank did not join" + (" with its gradients" if self.phase ==
                                                    self.WAITING else "") +
                           "; a rank stalled elsewhere reports itself before this one")
                elif self.stall_inspector:
                    why = ("if it waits in a collective, Horovod's stall report above names "
                           "the ranks that did not join")
                else:
                    why = ""
                self.log.error(
                    f"rank {self.rank} stalled: no progress for {idle:.0f}s (stall_timeout_s = "
                    f"{self.timeout:g}) while {self.phase} at step {self.step}"
                    + (f" ({why})" if why else "") + ". "
                    "Stopping this rank; the launcher stops the others." +
                    (f" ({self.describe()})" if self.describe else ""))
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_STALLED)

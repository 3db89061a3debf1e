"""A parameter-server rank: owns one shard of the flat parameter vector and its optimizer.

Consistency models:

* ``async`` (Downpour): every push is applied at once and answered with fresh parameters.
* ``ssp``: pushes are applied at once, but a worker more than ``ps_staleness`` clocks ahead of
  the slowest active worker gets its parameters only when the slowest catches up.
* ``bsp``: the pushes of clock c from all active workers are averaged (summed in worker-rank
  order, so the result is deterministic) and applied once; then everyone gets parameters.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness import checkpoint as ckpt_io
from harness.backends.mpi_ps import protocol as P
from harness.backends.mpi_ps.optim import SGDMomentum
from harness.metrics import MetricsWriter, percentile


@dataclass
class WorkerState:
    rank: int
    clock: int = 0                 # pushes applied
    active: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    left_reason: str | None = None


class Server:
    def __init__(self, comm, MPI, ctx, shard: np.ndarray, index: int, start: int, stop: int,
                 workers: list[int], lr_at, metrics: MetricsWriter | None, ckpt_dir: Path,
                 ckpt_every: int, watchdog, log, resume: dict | None = None) -> None:
        self.comm, self.ctx, self.log = comm, ctx, log
        self.cfg = ctx.cfg
        self.index, self.start, self.stop = index, start, stop
        self.params = shard
        self.opt = SGDMomentum(shard, self.cfg.momentum, self.cfg.weight_decay)
        self.version = 0
        self.workers = {r: WorkerState(r) for r in workers}
        self.lr_at = lr_at
        self.metrics = metrics
        self.ckpt_dir, self.ckpt_every = ckpt_dir, ckpt_every
        self.watchdog = watchdog
        self.deferred: list[int] = []
        self.pending: dict[int, np.ndarray] = {}        # bsp: this clock's gradients by rank
        self.grad_bufs = {r: np.empty_like(shard) for r in workers}
        self.staleness: Counter = Counter()
        self.max_lead = 0
        self.latencies: list[float] = []
        self.step_times: list[float] = []        # worker compute + round trip, per push
        self.samples = 0
        self.t0 = time.perf_counter()
        self._t_ready = self._t_first = self._t_last = None
        self._samples_first = self._version_first = 0
        self.start_clock = 0
        if resume:
            self.params[...] = resume["params"]
            self.opt.buf[...] = resume["momentum"]
            self.opt.steps = int(resume["opt_steps"])
            self.version = int(resume["version"])
            self.start_clock = int(resume["clock"])
            self.samples = int(resume.get("samples", 0))
            for w in self.workers.values():
                w.clock = self.start_clock
        self._last_ckpt_version = self.version
        self.MPI = MPI

    # --- main loop ---
    def serve(self) -> dict:
        hdr = np.empty(P.HEADER_LEN, np.float64)
        status = self.MPI.Status()
        while any(w.active for w in self.workers.values()):
            self.watchdog.describe = self._describe_wait
            self.comm.Recv(hdr, source=self.MPI.ANY_SOURCE, tag=P.HDR, status=status)
            src = status.Get_source()
            self.watchdog.tick(self.version, "serving")
            w = self.workers[src]
            w.last_seen = time.monotonic()
            kind = int(hdr[0])
            if kind == P.PULL:
                if self._t_ready is None:        # wall clock starts when workers are ready
                    self._t_ready = time.perf_counter()
                    self.t0 = self._t_ready
                self._reply(src)
            elif kind == P.PUSH:
                self.comm.Recv(self.grad_bufs[src], source=src, tag=P.GRAD)
                self._on_push(w, hdr)
            elif kind == P.EVAL:
                self._on_eval(hdr)
            elif kind == P.DONE:
                w.active = False
                self._release()
            elif kind == P.LEAVE:
                self._on_leave(w, hdr)
            if self.ctx.stop.requested:
                self._checkpoint()
                raise StopRequested(self.version)
        self._checkpoint()
        return self.report()

    def _describe_wait(self) -> str:
        now = time.monotonic()
        silent = sorted(((now - w.last_seen, r) for r, w in self.workers.items() if w.active),
                        reverse=True)
        return "server waiting for workers; last heard from " + ", ".join(
            f"rank {r} {age:.0f}s ago" for age, r in silent)

    def _on_push(self, w: WorkerState, hdr: np.ndarray) -> None:
        version_used, samples = int(hdr[2]), int(hdr[3])
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first, self._samples_first = now, self.samples + samples
            self._version_first = self.version + (0 if self.cfg.ps_consistency == "bsp" else 1)
        self._t_last = now
        self.samples += samples
        if hdr[7] > 0:                # the worker's previous push-to-parameters round trip
            self.latencies.append(float(hdr[7]))
            self.step_times.append(float(hdr[6] + hdr[7]))
        if self.cfg.ps_consistency == "bsp":
            self.pending[w.rank] = self.grad_bufs[w.rank] if hdr[9] == 0 else \
                np.zeros_like(self.params)
            w.clock += 1
            self._log_push(w, hdr, staleness=self.version - version_used, lr=None)
            self._maybe_apply_bsp()
            return
        if hdr[9] > 0:                         # the worker skipped a non-finite gradient
            w.clock += 1
            self._log_push(w, hdr, self.version - version_used, None)
            self._reply_or_defer(w.rank)
            return
        staleness = self.version - version_used
        lr = self.lr_at(w.clock)
        if self.cfg.ps_staleness_lr and staleness > 1:
            lr = lr / staleness
        self.opt.step(self.grad_bufs[w.rank], lr)
        self.version += 1
        w.clock += 1
        self.staleness[staleness] += 1
        self._log_push(w, hdr, staleness, lr)
        self._maybe_checkpoint()
        self._reply_or_defer(w.rank)

    def _reply_or_defer(self, rank: int) -> None:
        if self.cfg.ps_consistency == "ssp":
            self.deferred.append(rank)
            self._release()
        else:
            self._reply(rank)

    def _maybe_apply_bsp(self) -> None:
        active = [r for r, w in self.workers.items() if w.active]
        if not active or any(r not in self.pending for r in active):
            return
        order = sorted(self.pending)
        total = self.pending[order[0]].copy()
        for r in order[1:]:
            total += self.pending[r]
        total *= np.float32(1.0 / len(order))
        clock = self.workers[order[0]].clock - 1
        self.opt.step(total, self.lr_at(clock))
        self.version += 1
        self.staleness[0] += len(order)
        self.pending.clear()
        self._maybe_checkpoint()
        for r in order:
            self._reply(r)

    def _release(self) -> None:
        """ssp: answer deferred workers that are within the bound of the slowest active one;
        bsp: a worker that finished or left no longer holds back the others."""
        if self.cfg.ps_consistency == "bsp":
            for r in [r for r in self.pending if not self.workers[r].active]:
                del self.pending[r]
            self._maybe_apply_bsp()
            return
        if not self.deferred:
            return
        clocks = [w.clock for w in self.workers.values() if w.active]
        slowest = min(clocks) if clocks else 0
        still = []
        for r in self.deferred:
            if self.workers[r].clock - slowest <= self.cfg.ps_staleness:
                self._reply(r)
            else:
                still.append(r)
        self.deferred = still

    def _reply(self, rank: int) -> None:
        """Parameters for the worker's next step; records how far it runs ahead."""
        clocks = [w.clock for w in self.workers.values() if w.active]
        if clocks:
            self.max_lead = max(self.max_lead, self.workers[rank].clock - min(clocks))
        stop = P.FLAG_STOP if self.ctx.stop.requested else 0.0
        reply = np.array([self.version, self.workers[rank].clock, stop, 0.0], np.float64)
        self.comm.Send(reply, dest=rank, tag=P.PARAMS_HDR)
        self.comm.Send(self.params, dest=rank, tag=P.PARAMS)

    def _on_eval(self, hdr: np.ndarray) -> None:
        if self.metrics is not None:
            self.metrics.write("epoch", epoch=int(hdr[8]), step=self.version,
                               eval_loss=float(hdr[4]), eval_acc=float(hdr[5]),
                               eval_samples=int(hdr[6]), samples=self.samples,
                               wall_s=time.perf_counter() - self.t0, evaluated_by=int(hdr[9]))
            self.ctx.on_eval(float(hdr[5]), time.perf_counter() - self.t0, self.version)

    def _on_leave(self, w: WorkerState, hdr: np.ndarray) -> None:
        n = int(hdr[9])
        buf = np.empty(n, np.uint8)
        self.comm.Recv(buf, source=w.rank, tag=P.REASON)
        w.active, w.left_reason = False, buf.tobytes().decode(errors="replace")
        left = sum(x.active for x in self.workers.values())
        if self.cfg.ps_on_worker_failure == "abort":
            self.log.error(f"worker rank {w.rank} failed at clock {w.clock}: {w.left_reason}; "
                           "aborting the job (ps_on_worker_failure = 'abort')")
            self._checkpoint()
            self.comm.Abort(3)
        if self.index == 0:
            self.log.error(f"worker rank {w.rank} failed at clock {w.clock}: {w.left_reason}; "
                           f"continuing with {left} worker(s)")
        self._release()

    def _log_push(self, w: WorkerState, hdr: np.ndarray, staleness: int, lr: float | None) -> None:
        if self.metrics is None:
            return
        n = max(int(hdr[3]), 1)
        self.metrics.write("step", step=self.version, worker=w.rank, clock=w.clock,
                           epoch=int(hdr[8]), loss=float(hdr[4]), acc=float(hdr[5]) / n,
                           lr=lr, staleness=staleness, compute_s=float(hdr[6]),
                           latency_s=float(hdr[7]), samples=self.samples,
                           wall_s=time.perf_counter() - self.t0)

    # --- checkpoints ---
    def _maybe_checkpoint(self) -> None:
        if self.ckpt_every and self.version - self._last_ckpt_version >= self.ckpt_every:
            self._checkpoint()

    def _checkpoint(self) -> None:
        if self.version == self._last_ckpt_version and self.ckpt_dir_has_any():
            return
        clock = min((w.clock for w in self.workers.values()), default=0)
        meta = {**self.ctx.ckpt_meta, "shard": [self.index, self.start, self.stop],
                "position": {"step": self.version, "clock": clock, "samples": self.samples,
                             "opt_steps": self.opt.steps}}
        self.watchdog.tick(phase="checkpointing")
        ckpt_io.save(self.ckpt_dir, ckpt_io.Checkpoint(
            meta, {"params": self.params.copy()}, {"momentum": self.opt.buf.copy()}),
            prefix=f"ps-server{self.index}")
        self._last_ckpt_version = self.version

    def ckpt_dir_has_any(self) -> bool:
        return bool(ckpt_io.latest_paths(self.ckpt_dir, f"ps-server{self.index}"))

    def finish(self) -> dict | None:
        """After the last worker is done: the lowest-ranked worker that finished evaluates the
        final parameters (every server computes the same choice). Server 0 tells each finished
        worker whether it evaluates and returns the evaluation it reports."""
        done = sorted(r for r, w in self.workers.items() if w.left_reason is None)
        evaluator = done[0] if done else None
        if self.index == 0:
            for r in done:
                flag = 1.0 if r == evaluator else 0.0
                self.comm.Send(np.array([flag, self.version, 0, 0], np.float64), dest=r,
                               tag=P.FINAL_HDR)
        if evaluator is None:
            return None
        self.comm.Send(self.params, dest=evaluator, tag=P.FINAL)
        if self.index != 0:
            return None
        hdr = np.empty(P.HEADER_LEN, np.float64)
        self.watchdog.tick(phase="waiting for the final evaluation")
        self.comm.Recv(hdr, source=evaluator, tag=P.HDR)
        self._on_eval(hdr)
        return {"eval_loss": float(hdr[4]), "eval_acc": float(hdr[5]), "epoch": int(hdr[8])}

    def release_left_workers(self) -> None:
        """Server 0, after the results are written: workers that failed may exit now."""
        for r, w in self.workers.items():
            if w.left_reason is not None:
                self.comm.Send(np.array([-1.0, self.version, 0, 0], np.float64), dest=r,
                               tag=P.FINAL_HDR)

    # --- results ---
    def report(self) -> dict:
        wall = time.perf_counter() - self.t0
        # throughput over the updates themselves: from the first push to the last one
        window = (self._t_last - self._t_first) if self._t_first is not None else 0.0
        rate = (self.samples - self._samples_first) / window if window > 0 else None
        values = np.repeat(np.array(list(self.staleness.keys()), dtype=np.float64),
                           list(self.staleness.values())) if self.staleness else np.array([])
        return {
            "updates": self.version, "samples": self.samples, "ps_wall_s": wall,
            "updates_per_s": (self.version - self._version_first) / window if window > 0 else None,
            "samples_per_s_total": rate,
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
            "staleness_mean": float(values.mean()) if values.size else None,
            "staleness_p99": percentile(values, 99),
            "staleness_max": int(values.max()) if values.size else None,
            "max_clock_lead": self.max_lead,
            "push_pull_latency_p50_s": percentile(self.latencies, 50),
            "push_pull_latency_p99_s": percentile(self.latencies, 99),
            "step_time_p50_s": percentile(self.step_times, 50),
            "step_time_p90_s": percentile(self.step_times, 90),
            "step_time_p99_s": percentile(self.step_times, 99),
            "failed_workers": {str(r): w.left_reason for r, w in self.workers.items()
                               if w.left_reason},
        }


class StopRequested(Exception):
    def __init__(self, version: int) -> None:
        super().__init__(f"stop requested at version {version}")
        self.version = version

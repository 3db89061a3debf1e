"""A parameter-server worker: computes gradients with the sync backends' own code (the
``local`` backend of its framework), pushes them shard by shard and pulls fresh parameters."""

from __future__ import annotations

import math
import time
import traceback

import numpy as np

from harness.backends.base import Backend
from harness.compress import PushCodec
from harness.ps import protocol as P
from harness.ps.plan import PSPlan
from harness.data import Sharder
from harness.errors import TrainingAborted
from harness.faults import FaultInjector
from harness.driver import eval_record, eval_sums


class Worker:
    def __init__(self, comm, MPI, ctx, plan: PSPlan, backend: Backend, sharder: Sharder,
                 index: int, log, watchdog, links: list[tuple] | None = None,
                 rank: int | None = None, relay=None) -> None:
        self.comm, self.MPI, self.ctx, self.backend = comm, MPI, ctx, backend
        self.cfg, self.log, self.watchdog = ctx.cfg, log, watchdog
        self.shards = plan.shards             # (server rank, start, stop)
        self.sharder, self.total_steps, self.index = sharder, plan.total_steps, index
        #: (communicator, rank) of each shard's server: ``comm`` and the server's rank for a
        #: launched worker; a joined worker's own intercommunicator with each server
        self.links = links or [(comm, server) for server, _, _ in self.shards]
        self.rank = comm.Get_rank() if rank is None else rank
        #: ps_join: the join requests this worker passes on to the servers (join.Relay)
        self.relay = relay
        self.flat = np.empty(plan.params, np.float32)
        self.version = 0
        self.clock = 0                        # steps of this worker applied on every server
        self.stop_flag = False
        #: compressed pushes (compression = topk | int8): one codec (and residual) per shard
        self.codecs = push_codecs(self.cfg, self.shards)

    # --- messaging ---
    def _isend_all(self, hdr: np.ndarray, grad: np.ndarray | None) -> list:
        reqs = []
        for i, ((comm, server), (_, a, b)) in enumerate(zip(self.links, self.shards)):
            reqs.append(comm.Isend(hdr, dest=server, tag=P.HDR))
            if grad is not None:
                reqs.append(comm.Isend(self._payload(i, grad[a:b], hdr), dest=server,
                                       tag=P.GRAD))
        return reqs

    def _payload(self, i: int, shard: np.ndarray, hdr: np.ndarray) -> np.ndarray:
        """What goes to shard ``i``'s server: the gradient shard, or its compressed push (a
        skipped step's is zeros: a non-finite gradient must not enter the residual)."""
        if self.codecs is None:
            return shard
        codec = self.codecs[i]
        if P.has(hdr[P.FLAGS], P.SKIPPED):
            return np.zeros(codec.nbytes, np.uint8)
        return codec.encode(shard)

    def _send_all(self, hdr: np.ndarray) -> None:
        """Send ``hdr`` to every server."""
        self.MPI.Request.Waitall(self._isend_all(hdr, None))

    def _exchange(self, hdr: np.ndarray, grad: np.ndarray | None = None) -> np.ndarray:
        """Send ``hdr`` (and the gradient shards) to every server and receive every server's
        reply (one row each) and parameter shard. The receives are posted before the sends: a
        server that answers while this worker still sends to another server must never wait
        on it (two servers and two workers would otherwise deadlock)."""
        reqs, replies = [], []
        for (comm, server), (_, a, b) in zip(self.links, self.shards):
            replies.append(np.empty(P.REPLY_LEN, np.float64))
            reqs.append(comm.Irecv(replies[-1], source=server, tag=P.PARAMS_HDR))
            reqs.append(comm.Irecv(self.flat[a:b], source=server, tag=P.PARAMS))
        self.MPI.Request.Waitall(reqs + self._isend_all(hdr, grad))
        return np.stack(replies)

    def _leave(self, reason: str) -> None:
        blob = np.frombuffer(reason.encode()[:4000], np.uint8).copy()
        hdr = P.header(P.LEAVE, aux=len(blob))
        for comm, server in self.links:
            comm.Send(hdr, dest=server, tag=P.HDR)
            comm.Send(blob, dest=server, tag=P.REASON)

    def _wait_final(self) -> float:
        """Wait for server 0's word on the end of the run (this worker finished or failed), then
        sign off with BYE to every server. A stop request that reaches this worker meanwhile is
        passed on to every server (STOP_REQUEST), which preempts the workers still training."""
        what = np.empty(P.REPLY_LEN, np.float64)
        comm, server = self.links[0]
        req = comm.Irecv(what, source=server, tag=P.FINAL_HDR)
        forwarded = False
        while not req.Test():
            if self.ctx.stop.requested and not forwarded:
                forwarded = True
                self._send_all(P.header(P.STOP_REQUEST, clock=self.clock))
            self.watchdog.tick(phase="waiting for the end of the run")
            time.sleep(0.01)
        self._send_all(P.header(P.BYE, clock=self.clock))
        return float(what[0])

    # --- training ---
    def evaluate(self) -> tuple[float, float, int]:
        """Test loss, the metric the servers record (0 without one) and the samples."""
        names, metric = list(self.backend.task.metrics), self.ctx.metric
        rec = eval_record(names, eval_sums(self.backend, self.ctx.data,
                                           np.arange(len(self.ctx.data.test))))
        value = rec[f"eval_{metric}"] if metric else 0.0
        return rec["eval_loss"], value, rec["eval_samples"]

    def run(self) -> str:
        """Train to the end of the schedule or to a stop request. Returns ``"done"``,
        ``"left"`` (this worker failed; the servers went on without it), ``"stopped"`` (a stop
        request: every server has this worker's pushes up to its clock) or ``"preempted"``
        (finished or failed, and the job is being preempted)."""
        try:
            self._train()
        except Exception as e:   # noqa: BLE001 - report any failure to the servers, then leave
            reason = f"{type(e).__name__}: {e}"
            self.log.error(f"worker rank {self.rank} failed: {reason}\n{traceback.format_exc()}")
            self._leave(reason)
            # Stay in the job until it ends: with Open MPI, a rank that exits early makes mpirun
            # stop everyone. Server 0 says when the others are done (or aborts the job).
            return "preempted" if self._wait_final() == P.FINAL_PREEMPTED else "left"
        if self.clock < self.total_steps:
            self._send_all(P.header(P.STOPPED, clock=self.clock))
            return "stopped"
        self._send_all(P.header(P.DONE, clock=self.clock))
        return "preempted" if self._final() == P.FINAL_PREEMPTED else "done"

    def _train(self) -> None:
        cfg = self.cfg
        replies = self._exchange(P.header(P.PULL))
        self.version = int(replies[0, P.R_VERSION])
        # Each server restored this worker's clock. They agree unless the run is resumed from
        # periodic checkpoints that are not one cut (a crash between two servers' writes):
        # then continue from the earliest and the servers that are ahead skip what they have.
        clocks = replies[:, P.R_CLOCK].astype(int)
        self.clock = int(clocks.min())
        if (clocks != self.clock).any():
            self.log.warning(f"worker rank {self.rank}: the servers' checkpoints hold clocks "
                             f"{clocks.tolist()} for this worker; continuing from {self.clock} "
                             "(servers ahead of it skip the pushes they already hold)")
        self.stop_flag = bool((replies[:, P.R_FLAGS] > 0).any())
        self.backend.set_flat_params(self.flat)
        spe = self.sharder.steps_per_epoch
        faults = FaultInjector(self.rank)
        straggle = cfg.straggler_rank == self.rank
        latency = 0.0
        while self.clock < self.total_steps and not self.stop_flag:
            epoch, step_in_epoch = divmod(self.clock, spe)
            x, y = self.ctx.data.train.batch(self.sharder.indices(epoch, step_in_epoch))
            x = faults.before_step(self.clock + 1, x)
            t0 = time.perf_counter()
            res, grad = self.backend.compute_gradients(x, y)
            flags = 0
            # a finite loss can still have an overflowing gradient (max and min: no copy)
            if not (math.isfinite(res.loss) and math.isfinite(float(grad.max()))
                    and math.isfinite(float(grad.min()))):
                if cfg.nan_policy == "stop":
                    raise TrainingAborted(f"non-finite loss ({res.loss}) or gradient at clock "
                                          f"{self.clock + 1} on worker rank {self.rank}")
                flags |= P.SKIPPED
                self.log.warning(f"worker rank {self.rank}: non-finite gradient at clock "
                                 f"{self.clock + 1}, skipped (nan_policy = skip)")
            if straggle:
                time.sleep((cfg.straggler_factor - 1.0) * (time.perf_counter() - t0))
            compute = time.perf_counter() - t0
            if self.ctx.stop.requested:       # a signal here: the servers stop everyone
                flags |= P.STOP
            join = self.relay.poll() if self.relay is not None else 0
            if join:                          # a worker asks to join: every server hears it
                flags |= P.JOIN
            hdr = P.header(P.PUSH, clock=self.clock, version_used=self.version, samples=len(y),
                           loss=res.loss,
                           correct=res.metrics[self.ctx.metric] if self.ctx.metric else 0.0,
                           compute_s=compute,
                           latency_s=latency, epoch=epoch + 1, aux=join, flags=flags)
            t1 = time.perf_counter()
            replies = self._exchange(hdr, grad)
            latency = time.perf_counter() - t1
            self.version = int(replies[0, P.R_VERSION])
            self.stop_flag = bool((replies[:, P.R_FLAGS] > 0).any())
            self.backend.set_flat_params(self.flat)
            self.clock += 1
            self.watchdog.tick(self.clock, "training")
            if self.clock % spe == 0 and self.index == 0 and cfg.eval_every and \
                    (self.clock // spe) % cfg.eval_every == 0 and self.clock < self.total_steps:
                self._send_eval(self.clock // spe)
        if self.stop_flag and self.clock < self.total_steps:
            self.log.info(f"worker rank {self.rank}: stopping at clock {self.clock} of "
                          f"{self.total_steps} (stop request)")

    def _send_eval(self, epoch: int) -> None:
        self.watchdog.tick(phase="evaluating")
        loss, acc, n = self.evaluate()
        hdr = P.eval_header(P.EvalReport(self.clock, loss, acc, n, epoch, self.rank))
        comm, server = self.links[0]
        comm.Send(hdr, dest=server, tag=P.HDR)

    def _final(self) -> float:
        """Server 0 says whether this worker evaluates the final parameters (or that the job is
        being preempted); returns what it said."""
        what = self._wait_final()
        if what != P.FINAL_EVALUATE:
            return what
        reqs = [comm.Irecv(self.flat[a:b], source=s, tag=P.FINAL)
                for (comm, s), (_, a, b) in zip(self.links, self.shards)]
        self.MPI.Request.Waitall(reqs)
        self.backend.set_flat_params(self.flat)
        epochs = math.ceil(self.clock / self.sharder.steps_per_epoch)
        self._send_eval(epochs)
        return what


def push_codecs(cfg, shards) -> list[PushCodec] | None:
    """One codec per (server rank, start, stop) shard for a compressed push, or None."""
    if cfg.compression == "none":
        return None
    return [PushCodec(cfg.compression, b - a, cfg.compression_ratio, cfg.error_feedback)
            for _, a, b in shards]

"""A parameter-server worker: computes gradients with the sync backends' own code (the
``local`` backend of its framework), pushes them shard by shard and pulls fresh parameters."""

from __future__ import annotations

import math
import time
import traceback

import numpy as np

from harness.backends.mpi_ps import protocol as P
from harness.data import Sharder, gather
from harness.errors import TrainingAborted
from harness.faults import FaultInjector
from harness.loop import EVAL_BATCH


class Worker:
    def __init__(self, comm, MPI, ctx, backend, layout, shards: list[tuple[int, int, int]],
                 sharder: Sharder, total_steps: int, index: int, log, watchdog) -> None:
        self.comm, self.MPI, self.ctx, self.backend = comm, MPI, ctx, backend
        self.cfg, self.log, self.watchdog = ctx.cfg, log, watchdog
        self.shards = shards                  # (server rank, start, stop)
        self.sharder, self.total_steps, self.index = sharder, total_steps, index
        self.rank = comm.Get_rank()
        self.flat = np.empty(layout.total, np.float32)
        self.version = 0
        self.stop_flag = False

    # --- messaging ---
    def _send_all(self, hdr: np.ndarray, grad: np.ndarray | None = None,
                  expect_params: bool = False) -> np.ndarray | None:
        """Send ``hdr`` (and the gradient shards) to every server; with ``expect_params`` also
        receive every server's reply. The receives are posted before the sends: a server that
        answers while this worker still sends to another server must never wait on it (two
        servers and two workers would otherwise deadlock)."""
        reqs, replies = [], []
        if expect_params:
            for server, a, b in self.shards:
                replies.append(np.empty(P.REPLY_LEN, np.float64))
                reqs.append(self.comm.Irecv(replies[-1], source=server, tag=P.PARAMS_HDR))
                reqs.append(self.comm.Irecv(self.flat[a:b], source=server, tag=P.PARAMS))
        for server, a, b in self.shards:
            reqs.append(self.comm.Isend(hdr, dest=server, tag=P.HDR))
            if grad is not None:
                reqs.append(self.comm.Isend(grad[a:b], dest=server, tag=P.GRAD))
        self.MPI.Request.Waitall(reqs)
        return np.stack(replies) if expect_params else None

    def _leave(self, reason: str) -> None:
        blob = np.frombuffer(reason.encode()[:4000], np.uint8).copy()
        hdr = P.header(P.LEAVE, aux=len(blob))
        for server, _, _ in self.shards:
            self.comm.Send(hdr, dest=server, tag=P.HDR)
            self.comm.Send(blob, dest=server, tag=P.REASON)

    # --- training ---
    def evaluate(self) -> tuple[float, float, int]:
        x, y = self.ctx.data.x_test, self.ctx.data.y_test
        loss = correct = 0.0
        for i in range(0, len(x), EVAL_BATCH):
            xb, yb = gather(x, y, slice(i, i + EVAL_BATCH))
            lsum, corr = self.backend.eval_batch(xb, yb)
            loss, correct = loss + lsum, correct + corr
        return loss / len(x), correct / len(x), len(x)

    def run(self) -> bool:
        """Train to the end of the schedule; False if this worker failed and left."""
        try:
            self._train()
        except Exception as e:   # noqa: BLE001 - report any failure to the servers, then leave
            reason = f"{type(e).__name__}: {e}"
            self.log.error(f"worker rank {self.rank} failed: {reason}\n{traceback.format_exc()}")
            self._leave(reason)
            # Stay in the job until it ends: with Open MPI, a rank that exits early makes mpirun
            # stop everyone. Server 0 says when the others are done (or aborts the job).
            self.watchdog.stop()
            done = np.empty(P.REPLY_LEN, np.float64)
            self.comm.Recv(done, source=self.shards[0][0], tag=P.FINAL_HDR)
            return False
        self._send_all(P.header(P.DONE, clock=self.clock))
        self._final()
        return True

    def _train(self) -> None:
        cfg = self.cfg
        replies = self._send_all(P.header(P.PULL), expect_params=True)
        self.version, self.clock = int(replies[0, 0]), int(replies[0, 1])
        self.backend.set_flat_params(self.flat)
        spe = self.sharder.steps_per_epoch
        faults = FaultInjector(self.rank)
        straggle = cfg.straggler_rank == self.rank
        latency = 0.0
        while self.clock < self.total_steps and not self.stop_flag:
            epoch, step_in_epoch = divmod(self.clock, spe)
            x, y = gather(self.ctx.data.x_train, self.ctx.data.y_train,
                          self.sharder.indices(epoch, step_in_epoch))
            x = faults.before_step(self.clock + 1, x)
            t0 = time.perf_counter()
            res, grad = self.backend.compute_gradients(x, y)
            skipped = 0.0
            if not math.isfinite(res.loss):
                if cfg.nan_policy == "stop":
                    raise TrainingAborted(f"non-finite loss ({res.loss}) at clock "
                                          f"{self.clock + 1} on worker rank {self.rank}")
                skipped = 1.0
                self.log.warning(f"worker rank {self.rank}: non-finite gradient at clock "
                                 f"{self.clock + 1}, skipped (nan_policy = skip)")
            if straggle:
                time.sleep((cfg.straggler_factor - 1.0) * (time.perf_counter() - t0))
            compute = time.perf_counter() - t0
            hdr = P.header(P.PUSH, clock=self.clock, version_used=self.version, samples=len(y),
                           loss=res.loss, correct=res.correct, compute_s=compute,
                           latency_s=latency, epoch=epoch + 1, aux=skipped)
            t1 = time.perf_counter()
            replies = self._send_all(hdr, grad, expect_params=True)
            latency = time.perf_counter() - t1
            self.version = int(replies[0, 0])
            self.stop_flag = bool((replies[:, 2] > 0).any())
            self.backend.set_flat_params(self.flat)
            self.clock += 1
            self.watchdog.tick(self.clock, "training")
            if self.clock % spe == 0 and self.index == 0 and cfg.eval_every and \
                    (self.clock // spe) % cfg.eval_every == 0 and self.clock < self.total_steps:
                self._send_eval(self.clock // spe)

    def _send_eval(self, epoch: int) -> None:
        self.watchdog.tick(phase="evaluating")
        loss, acc, n = self.evaluate()
        hdr = P.header(P.EVAL, clock=self.clock, loss=loss, correct=acc, compute_s=n,
                       epoch=epoch, aux=self.rank)
        self.comm.Send(hdr, dest=self.shards[0][0], tag=P.HDR)

    def _final(self) -> None:
        """Server 0 says whether this worker evaluates the final parameters."""
        self.watchdog.tick(phase="waiting for the final parameters")
        flag = np.empty(P.REPLY_LEN, np.float64)
        self.comm.Recv(flag, source=self.shards[0][0], tag=P.FINAL_HDR)
        if flag[0] <= 0:
            return
        reqs = [self.comm.Irecv(self.flat[a:b], source=s, tag=P.FINAL) for s, a, b in self.shards]
        self.MPI.Request.Waitall(reqs)
        self.backend.set_flat_params(self.flat)
        epochs = math.ceil(self.clock / self.sharder.steps_per_epoch)
        self._send_eval(epochs)

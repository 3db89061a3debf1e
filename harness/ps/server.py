"""A parameter-server rank: owns one shard of the flat parameter vector and its optimizer.

Consistency models:

* ``async`` (Downpour): every push is applied at once and answered with fresh parameters.
* ``ssp``: pushes are applied at once, but a worker more than ``ps_staleness`` clocks ahead of
  the slowest active worker gets its parameters only when the slowest catches up.
* ``bsp``: the pushes of clock c from all active workers are averaged (summed in worker-rank
  order, so the result is deterministic) and applied once; then everyone gets parameters.

Preemption (see ``protocol``): once this server has a stop request, every reply carries the
stop flag (ssp releases its deferred workers with it; bsp finishes the clock in progress), and
the server keeps serving until no worker is active. It then holds exactly the pushes every other
server holds and checkpoints them with each worker's clock, so a resumed run continues every
worker from its own clock and does exactly the planned work.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from harness import checkpoint as ckpt_io
from harness.compress import PushCodec
from harness.ps import protocol as P
from harness.ps.optim import SGDMomentum
from harness.ps.plan import PSPlan
from harness.driver import perplexity
from harness.errors import HarnessError, TrainingAborted
from harness.faults import FaultInjector
from harness.metrics import MetricsWriter, percentile

ACTIVE, DONE, STOPPED, LEFT = "active", "done", "stopped", "left"


@dataclass
class WorkerState:
    rank: int
    clock: int = 0                 # this worker's pushes this server has taken (its position)
    state: str = ACTIVE            # active, done (reached the plan), stopped (preempted), left
    last_seen: float = field(default_factory=time.monotonic)
    left_reason: str | None = None
    #: the worker slot (a launched worker's rank) whose data and clock this worker trains: its
    #: own rank, or, for a worker that joined, the slot of the failed worker it replaces
    slot: int = -1
    #: a joined worker that stopped answering (killed, node gone): nothing more is sent to it
    lost: bool = False

    def __post_init__(self) -> None:
        if self.slot < 0:
            self.slot = self.rank

    @property
    def active(self) -> bool:
        return self.state == ACTIVE


class Server:
    def __init__(self, comm, MPI, ctx, plan: PSPlan, index: int, shard: np.ndarray,
                 metrics: MetricsWriter | None, watchdog, log,
                 resume: dict | None = None) -> None:
        self.comm, self.ctx, self.log = comm, ctx, log
        self.cfg = ctx.cfg
        _, self.start, self.stop = plan.shards[index]
        self.index = index
        self.params = shard
        self.opt = SGDMomentum(shard, self.cfg.momentum, self.cfg.weight_decay)
        self.version = 0
        self.workers = {r: WorkerState(r) for r in plan.worker_ranks}
        self.lr_at = plan.schedule
        self.metrics = metrics
        self.ckpt_dir, self.ckpt_every = plan.ckpt_dir, plan.ckpt_every
        self.watchdog = watchdog
        self.faults = FaultInjector(comm.Get_rank())      # `kind@<server rank>:<version>`
        self.stopping = False          # latched once per message, so one clock's replies agree
        self.deferred: list[int] = []
        self.pending: dict[int, np.ndarray] = {}        # bsp: this clock's gradients by rank
        self.grad_bufs = {r: np.empty_like(shard) for r in self.workers}
        #: compressed pushes: the codec of this shard and each worker's receive buffer
        self.codec = None if self.cfg.compression == "none" else PushCodec(
            self.cfg.compression, len(shard), self.cfg.compression_ratio)
        self.push_bufs = {} if self.codec is None else \
            {r: np.empty(self.codec.nbytes, np.uint8) for r in self.workers}
        self.staleness: Counter = Counter()
        self.max_lead = 0
        self.latencies: list[float] = []
        self.step_times: list[float] = []        # worker compute + round trip, per push
        self.samples = 0
        self.repeated = 0                        # pushes this server had already applied
        self.failed_before: dict[str, str] = {}  # workers that failed in earlier segments
        self.joined_before: dict[str, dict] = {}  # workers that joined in earlier segments
        # throughput windows of earlier segments (a resumed run reports over all of them)
        self.prev = {"window_s": 0.0, "samples": 0, "updates": 0, "wall_s": 0.0}
        self.t0 = time.perf_counter()
        self._t_ready: float | None = None
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._samples_first = self._version_first = 0
        self.start_clock = 0
        if resume:
            self.params[...] = resume["params"]
            self.opt.buf[...] = resume["momentum"]
            self.opt.steps = int(resume["opt_steps"])
            self.version = int(resume["version"])
            self.samples = int(resume.get("samples", 0))
            clocks = resume["clocks"]
            for r, w in self.workers.items():
                w.clock = int(clocks.get(str(r), resume["clock"]))
            self.start_clock = min(w.clock for w in self.workers.values())
            stats = resume.get("stats") or {}
            self.prev.update({k: stats[k] for k in self.prev if k in stats})
            self.staleness.update({int(k): int(v) for k, v in
                                   stats.get("staleness_histogram", {}).items()})
            self.max_lead = int(stats.get("max_clock_lead", 0))
            self.failed_before = dict(stats.get("failed_workers", {}))
            self.joined_before = dict(stats.get("joined_workers", {}))
            self.latencies = [float(v) for v in resume.get("latencies", ())]
            self.step_times = [float(v) for v in resume.get("step_times", ())]
        self._last_ckpt = self._position_key()
        self.MPI = MPI
        #: workers that joined the running job: id -> (their intercommunicator, 0); the
        #: launched workers talk over ``comm`` with their ranks
        self.links: dict[int, tuple] = {}
        self.inbox = Inbox(comm, MPI, self.links, self._check_joined)
        self.heartbeats: dict[int, tuple[str | None, float]] = {}
        self.joined: dict[str, dict] = {}
        self.lost_links: list = []
        self.join_requests: set[int] = set()     # the requests this server has answered
        self.world_size, self.servers = plan.world_size, len(plan.shards)
        self.total_steps = plan.total_steps
        self.request_of: dict[int, int] = {}     # a joined worker's request (its heartbeat)
        self.run_dir = plan.run_dir
        self.params_total = plan.params

    # --- messaging: a worker's id names its link ---
    def _send(self, rank: int, buf, tag: int) -> None:
        if self.workers[rank].lost:             # a joined worker that stopped answering
            return
        comm, dest = self.links.get(rank, (self.comm, rank))
        comm.Send(buf, dest=dest, tag=tag)

    def _recv(self, rank: int, buf, tag: int) -> None:
        comm, source = self.links.get(rank, (self.comm, rank))
        comm.Recv(buf, source=source, tag=tag)

    # --- main loop ---
    def serve(self) -> dict:
        hdr = np.empty(P.HEADER_LEN, np.float64)
        while any(w.active for w in self.workers.values()):
            self.watchdog.describe = self._describe_wait
            src = self.inbox.recv(hdr)
            if src < 0:                         # a joined worker was lost: look again
                continue
            if src < self.servers:              # server 0 orders a join (ps_join)
                self._on_join_order(hdr)
                continue
            self.watchdog.tick(self.version, "serving")
            w = self.workers[src]
            w.last_seen = time.monotonic()
            kind = int(hdr[P.KIND])
            if self.ctx.stop.requested:
                self._begin_stop(f"server rank {self.comm.Get_rank()} got a stop signal",
                                 own=True)
            if kind == P.PULL:
                if self._t_ready is None:        # wall clock starts when workers are ready
                    self._t_ready = time.perf_counter()
                    self.t0 = self._t_ready
                self._reply_or_defer(src)       # ssp: a resumed worker may be ahead too
            elif kind == P.PUSH:
                if self.codec is None:
                    self._recv(src, self.grad_bufs[src], P.GRAD)
                else:
                    self._recv(src, self.push_bufs[src], P.GRAD)
                    self.grad_bufs[src][...] = self.codec.decode(self.push_bufs[src])
                if P.has(hdr[P.FLAGS], P.STOP):
                    self._begin_stop(f"worker rank {src} got a stop signal")
                self._on_push(w, hdr)
                if P.has(hdr[P.FLAGS], P.JOIN) and self.index == 0:
                    self._on_join_flag(int(hdr[P.AUX]))
            elif kind == P.EVAL:
                self._on_eval(hdr)
            elif kind == P.DONE:
                w.state = DONE
                self._release()
            elif kind == P.STOPPED:
                w.state = STOPPED
                self._begin_stop(f"worker rank {src} stopped")
                self._release()
            elif kind == P.STOP_REQUEST:
                self._begin_stop(f"worker rank {src} (no longer training) got a stop signal")
                self._release()
            elif kind == P.LEAVE:
                self._on_leave(w, hdr)
            if self.stopping and self.deferred:
                self._release()             # ssp: nobody waits for the slowest any more
        self._checkpoint(final=not self.preempted)
        return self.report()

    @property
    def preempted(self) -> bool:
        """Some worker stopped before the end of the plan: the run continues on resume. Every
        server sees the same STOPPED messages, so every server agrees."""
        return any(w.state == STOPPED for w in self.workers.values())

    def _begin_stop(self, why: str, own: bool = False) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.index == 0 or own:
            bsp = self.cfg.ps_consistency == "bsp"
            self.log.warning(f"stop requested ({why}): every worker stops after its "
                             f"{'clock in progress' if bsp else 'current step'}; each server "
                             "checkpoints once none is training")

    def _describe_wait(self) -> str:
        now = time.monotonic()
        silent = sorted(((now - w.last_seen, r) for r, w in self.workers.items() if w.active),
                        reverse=True)
        return "server waiting for workers; last heard from " + ", ".join(
            f"rank {r} {age:.0f}s ago" for age, r in silent)

    def _on_push(self, w: WorkerState, hdr: np.ndarray) -> None:
        clock = int(hdr[P.CLOCK])
        if clock < w.clock:
            # Resumed from checkpoints that are not one cut (a crash between two servers'
            # periodic writes): this server already holds this push. Answer, do not apply.
            self.repeated += 1
            self._reply(w.rank)
            return
        if clock > w.clock:
            raise HarnessError(f"server {self.index}: worker rank {w.rank} pushed clock {clock} "
                               f"but this server holds its pushes up to clock {w.clock}")
        version_used, samples = int(hdr[P.VERSION_USED]), int(hdr[P.SAMPLES])
        skipped = P.has(hdr[P.FLAGS], P.SKIPPED)
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first, self._samples_first = now, self.samples + samples
            self._version_first = self.version + (0 if self.cfg.ps_consistency == "bsp" else 1)
        self._t_last = now
        self.samples += samples
        if hdr[P.LATENCY_S] > 0:     # the worker's previous push-to-parameters round trip
            self.latencies.append(float(hdr[P.LATENCY_S]))
            self.step_times.append(float(hdr[P.COMPUTE_S] + hdr[P.LATENCY_S]))
        if self.cfg.ps_consistency == "bsp":
            self.pending[w.rank] = self.grad_bufs[w.rank] if not skipped else \
                np.zeros_like(self.params)
            w.clock += 1
            self._log_push(w, hdr, staleness=self.version - version_used, lr=None)
            self._maybe_apply_bsp()
            return
        if skipped:                            # the worker skipped a non-finite gradient
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
        self._after_update()
        self._reply_or_defer(w.rank)

    def _after_update(self) -> None:
        self._maybe_checkpoint()
        self.faults.before_step(self.version, self.params)   # a drill's signal at version V

    def _reply_or_defer(self, rank: int) -> None:
        if self.cfg.ps_consistency == "ssp" and not self.stopping:
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
        self._after_update()
        for r in order:
            self._reply(r)

    def _release(self) -> None:
        """ssp: answer deferred workers that are within the bound of the slowest active one
        (all of them, with the stop flag, once stopping); bsp: a worker that finished, stopped
        or left no longer holds back the others."""
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
            if self.stopping or self.workers[r].clock - slowest <= self.cfg.ps_staleness:
                self._reply(r)
            else:
                still.append(r)
        self.deferred = still

    def _reply(self, rank: int) -> None:
        """Parameters for the worker's next step; records how far it runs ahead."""
        clocks = [w.clock for w in self.workers.values() if w.active]
        if clocks and not self.stopping:    # a worker told to stop computes nothing more
            self.max_lead = max(self.max_lead, self.workers[rank].clock - min(clocks))
        self._send(rank, P.reply(self.version, self.workers[rank].clock, self.stopping),
                   P.PARAMS_HDR)
        self._send(rank, self.params, P.PARAMS)

    def _on_eval(self, hdr: np.ndarray) -> P.EvalReport:
        ev = P.decode_eval(hdr)
        if self.metrics is not None:
            lm = {"eval_perplexity": perplexity(ev.loss)} if self.ctx.tokens_per_sample else {}
            self.metrics.write("epoch", epoch=ev.epoch, step=self.version, eval_loss=ev.loss,
                               **self._metric("eval_", ev.metric), **lm, eval_samples=ev.samples,
                               samples=self.samples, wall_s=self._wall(),
                               evaluated_by=ev.evaluator)
            self.ctx.on_eval(ev.metric, self._wall(), self.version)
        return ev

    def _on_leave(self, w: WorkerState, hdr: np.ndarray) -> None:
        n = int(hdr[P.AUX])
        buf = np.empty(n, np.uint8)
        self._recv(w.rank, buf, P.REASON)
        w.state, w.left_reason = LEFT, buf.tobytes().decode(errors="replace")
        left = sum(x.active for x in self.workers.values())
        if self.cfg.ps_on_worker_failure == "abort":
            self.log.error(f"worker rank {w.rank} failed at clock {w.clock}: {w.left_reason}; "
                           "aborting the job (ps_on_worker_failure = 'abort')")
            self._checkpoint()
            self.comm.Abort(TrainingAborted.exit_code)
        if self.index == 0:
            self.log.error(f"worker rank {w.rank} failed at clock {w.clock}: {w.left_reason}; "
                           f"continuing with {left} worker(s)")
        self._release()

    def _metric(self, prefix: str, value: float) -> dict[str, float]:
        """The metric workers report (``PSContext.metric``) under its own name."""
        return {f"{prefix}{self.ctx.metric}": value} if self.ctx.metric else {}

    def _log_push(self, w: WorkerState, hdr: np.ndarray, staleness: int, lr: float | None) -> None:
        if self.metrics is None:
            return
        n = max(int(hdr[P.SAMPLES]), 1)
        self.metrics.write("step", step=self.version, worker=w.rank, clock=w.clock,
                           epoch=int(hdr[P.EPOCH]), loss=float(hdr[P.LOSS]),
                           **self._metric("", float(hdr[P.CORRECT]) / n), lr=lr,
                           staleness=staleness,
                           compute_s=float(hdr[P.COMPUTE_S]), latency_s=float(hdr[P.LATENCY_S]),
                           samples=self.samples, wall_s=self._wall())

    # --- checkpoints ---
    def _position_key(self) -> tuple:
        return (self.version, tuple(sorted((r, w.clock) for r, w in self.workers.items())))

    def _maybe_checkpoint(self) -> None:
        if self.ckpt_every and self.version - self._last_ckpt[0] >= self.ckpt_every:
            self._checkpoint()

    def clocks(self) -> dict[str, int]:
        """Each worker slot's clock: a joined worker's is its slot's (it continues it)."""
        out: dict[str, int] = {}
        for w in sorted(self.workers.values(), key=lambda w: w.rank):
            out[str(w.slot)] = max(out.get(str(w.slot), 0), w.clock)
        return out

    def _checkpoint(self, final: bool = False) -> None:
        """Write this shard with the position of every worker: the version (updates applied),
        each worker's clock, the samples and the optimizer's steps; the throughput and
        staleness bookkeeping travel with it so a resumed run reports over all segments."""
        if self._position_key() == self._last_ckpt and self.ckpt_dir_has_any() and not final:
            return
        clock = min(self.clocks().values(), default=0)
        window, samples, updates = self._window()
        stats = {"wall_s": self._wall(), "window_s": self.prev["window_s"] + window,
                 "samples": self.prev["samples"] + samples,
                 "updates": self.prev["updates"] + updates,
                 "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
                 "max_clock_lead": self.max_lead, "failed_workers": self.failed_workers(),
                 "joined_workers": self.joined_report()}
        meta = {**self.ctx.ckpt_meta, "shard": [self.index, self.start, self.stop],
                "position": {"step": self.version, "clock": clock, "clocks": self.clocks(),
                             "samples": self.samples, "opt_steps": self.opt.steps,
                             "finished": final, "stats": stats}}
        self.watchdog.tick(phase="checkpointing")
        ckpt_io.save(self.ckpt_dir, ckpt_io.Checkpoint(
            meta, {"params": self.params.copy()}, {"momentum": self.opt.buf.copy()},
            extra={"latencies": np.asarray(self.latencies, np.float64),
                   "step_times": np.asarray(self.step_times, np.float64)}),
            prefix=f"ps-server{self.index}")
        self._last_ckpt = self._position_key()

    def ckpt_dir_has_any(self) -> bool:
        return bool(ckpt_io.latest_paths(self.ckpt_dir, f"ps-server{self.index}"))

    # --- workers that join the running job (ps_join) ---
    def _on_join_flag(self, n: int) -> None:
        """Server 0: a push passed on join request ``n``. It orders every other server to
        connect to the joiner, then connects itself: every server takes joiners in this one
        order (each joiner accepts its servers in server order), so two joiners cannot
        deadlock."""
        from harness.ps import join as J

        if n in self.join_requests:
            return
        self.join_requests.add(n)
        req = J.read_request(self.run_dir, n)
        if req is None:             # withdrawn: the joiner gave up
            return
        for k in range(1, self.servers):
            port = np.frombuffer(req.ports[k].encode(), np.uint8).copy()
            self.comm.Send(P.header(P.JOIN_ORDER, samples=port.size, aux=n), dest=k, tag=P.HDR)
            self.comm.Send(port, dest=k, tag=P.REASON)
        self._connect(n, req.ports[0], req.host, req.pid)

    def _on_join_order(self, hdr: np.ndarray) -> None:
        port = np.empty(int(hdr[P.SAMPLES]), np.uint8)
        self.comm.Recv(port, source=0, tag=P.REASON)
        self._connect(int(hdr[P.AUX]), port.tobytes().decode(), "", 0)

    def _connect(self, n: int, port: str, host: str, pid: int) -> None:
        """Connect to the joiner of request ``n``. Server 0 gives it the slot of a worker that
        failed (its data shard and clock) and an id, or refuses it (slot -1) when no slot is
        free; the joiner tells every server what server 0 said."""
        self.watchdog.describe = None
        self.watchdog.tick(phase=f"connecting to a worker that asks to join (request {n}"
                                 + (f", pid {pid} on {host}" if host else "")
                                 + "; if it died, this stall is why)")
        ic = self.MPI.COMM_SELF.Connect(port)
        if self.index == 0:
            slot = self._free_slot()
            wid = self.world_size + len(self.joined_before) + len(self.joined) \
                if slot >= 0 else -1
            ic.Send(np.array([slot, wid, self.world_size, self.params_total], np.float64),
                    dest=0, tag=P.ADMIT)
        claim = np.empty(P.ADMIT_LEN, np.float64)
        ic.Recv(claim, source=0, tag=P.ADMIT)
        self.watchdog.tick(phase="serving")
        slot, wid = int(claim[P.A_SLOT]), int(claim[P.A_ID])
        if slot < 0:
            ic.Disconnect()         # every server refuses in server 0's order: no cycle
            if self.index == 0:
                self.log.warning(f"a worker asked to join (request {n} from {host}) but no "
                                 "worker slot is free (none failed): refused")
            return
        clock = self.clocks()[str(slot)]
        self.workers[wid] = WorkerState(wid, clock=clock, slot=slot)
        self.links[wid] = (ic, 0)
        self.request_of[wid] = n
        self.grad_bufs[wid] = np.empty_like(self.params)
        if self.codec is not None:
            self.push_bufs[wid] = np.empty(self.codec.nbytes, np.uint8)
        self.joined[str(wid)] = {"slot": slot, "from_clock": clock, "at_version": self.version,
                                 "host": host}
        if self.metrics is not None:
            self.log.info(f"worker {wid} joined from {host}: it continues worker slot "
                          f"{slot} (which failed) from clock {clock}")
            self.metrics.write("join", step=self.version, worker=wid, slot=slot, clock=clock,
                               host=host, wall_s=self._wall())

    def _check_joined(self) -> bool:
        """About once a second while joined workers are connected: one whose heartbeat file has
        not changed for ``ps_join_lost_after_s`` is lost (MPI does not tell this job when a process
        of another job dies). Its slot is free again; True when one was lost."""
        from harness.ps import join as J

        now, lost = time.monotonic(), False
        for wid in list(self.links):
            beat = J.read_heartbeat(self.run_dir, self.request_of[wid])
            seen, since = self.heartbeats.get(wid, (None, now))
            if wid not in self.heartbeats or beat != seen:
                self.heartbeats[wid] = (beat, now)
            elif now - since > self.cfg.ps_join_lost_after_s and not self.workers[wid].lost:
                self._lose(wid)
                lost = True
        return lost

    def _lose(self, wid: int) -> None:
        w = self.workers[wid]
        w.lost = True
        if w.state != DONE:                     # a finished one keeps its results
            w.state = LEFT
            w.left_reason = (f"joined worker {wid} stopped answering (no heartbeat for "
                             f"{self.cfg.ps_join_lost_after_s:g}s: killed, or its node is "
                             "gone)")
        self.deferred = [r for r in self.deferred if r != wid]      # nothing is sent to it
        self.pending.pop(wid, None)
        self.inbox.drop(wid)
        # its intercommunicator is left open: disconnecting would wait for the dead process
        self.lost_links.append(self.links.pop(wid)[0])
        if self.index == 0 and w.left_reason:
            left = sum(x.active for x in self.workers.values())
            self.log.error(f"{w.left_reason} at clock {w.clock}; continuing with {left} "
                           f"worker(s); slot {w.slot} is free for another joiner")
        self._release()

    def _free_slot(self) -> int:
        """The lowest worker slot whose latest worker failed before the end of the plan, or
        -1."""
        latest: dict[int, WorkerState] = {}
        for w in sorted(self.workers.values(), key=lambda w: w.rank):
            latest[w.slot] = w
        return next((s for s, w in sorted(latest.items())
                     if w.state == LEFT and w.clock < self.total_steps), -1)

    def joined_report(self) -> dict[str, dict]:
        """The workers that joined, this segment's after earlier segments' (a resumed run's
        ids start again after the job's ranks: an earlier one keeps its key, suffixed)."""
        out = dict(self.joined_before)
        for k, v in self.joined.items():
            key = k if k not in out else f"{k}@{v['at_version']}"
            out[key] = {**v, "clock": self.workers[int(k)].clock,
                        "state": self.workers[int(k)].state}
        return out

    def close_links(self) -> None:
        """At the very end: cancel the posted receives and disconnect every joined worker (each
        disconnects from the servers in order, so this cannot deadlock)."""
        self.inbox.close()
        for wid in sorted(self.links):
            self.links[wid][0].Disconnect()
        self.links.clear()

    # --- the end of a run ---
    def _waiting(self) -> list[int]:
        """Workers that wait for FINAL_HDR: those that finished and those that failed."""
        return sorted(r for r, w in self.workers.items() if w.state in (DONE, LEFT) and not w.lost)

    def _drain_byes(self, ranks) -> None:
        """Every worker that waited for FINAL_HDR answers with BYE (after any STOP_REQUEST it
        sent, which is moot now): receiving them leaves no message behind."""
        hdr = np.empty(P.HEADER_LEN, np.float64)
        for r in ranks:
            self.watchdog.tick(phase=f"waiting for worker rank {r} to sign off")
            while not self.workers[r].lost:
                if self.inbox.recv(hdr, r) >= 0 and int(hdr[P.KIND]) == P.BYE:
                    break

    def end_preempted(self) -> None:
        """After this server's checkpoint: server 0 tells the workers that wait for the end of
        the run (finished or failed) that the job is being preempted."""
        waiting = self._waiting()
        if self.index == 0:
            for r in waiting:
                self._send(r, P.final(P.FINAL_PREEMPTED, self.version), P.FINAL_HDR)
        self._drain_byes(waiting)

    def finish(self) -> dict | None:
        """After the last worker is done: the lowest-ranked worker that finished evaluates the
        final parameters (every server computes the same choice). Server 0 tells each finished
        worker whether it evaluates and returns the evaluation it reports."""
        done = sorted(r for r, w in self.workers.items() if w.state == DONE and not w.lost)
        evaluator = done[0] if done else None
        if self.index == 0:
            for r in done:
                what = P.FINAL_EVALUATE if r == evaluator else P.FINAL_DONE
                self._send(r, P.final(what, self.version), P.FINAL_HDR)
        self._drain_byes(done)
        if evaluator is None:
            return None
        self._send(evaluator, self.params, P.FINAL)
        if self.index != 0:
            return None
        hdr = np.empty(P.HEADER_LEN, np.float64)
        self.watchdog.tick(phase="waiting for the final evaluation")
        while self.inbox.recv(hdr, evaluator) < 0:
            if self.workers[evaluator].lost:
                return None
        ev = self._on_eval(hdr)
        return {"eval_loss": ev.loss, **self._metric("eval_", ev.metric), "epoch": ev.epoch}

    def release_left_workers(self) -> None:
        """After the results are written (server 0): workers that failed may exit now."""
        left = sorted(r for r, w in self.workers.items() if w.state == LEFT and not w.lost)
        if self.index == 0:
            for r in left:
                self._send(r, P.final(P.FINAL_RELEASE, self.version), P.FINAL_HDR)
        self._drain_byes(left)

    # --- results ---
    def failed_workers(self) -> dict[str, str]:
        now = {str(r): w.left_reason for r, w in self.workers.items() if w.left_reason}
        return {**self.failed_before, **now}

    def _window(self) -> tuple[float, int, int]:
        """This segment's throughput window: from its first push to its last one."""
        if self._t_first is None or self._t_last is None:
            return 0.0, 0, 0
        return (self._t_last - self._t_first, self.samples - self._samples_first,
                self.version - self._version_first)

    def _wall(self) -> float:
        """Seconds of serving over all segments of the run."""
        return self.prev["wall_s"] + time.perf_counter() - self.t0

    def report(self) -> dict:
        wall = self._wall()
        seg_window, seg_samples, seg_updates = self._window()
        window = self.prev["window_s"] + seg_window
        values = np.repeat(np.array(list(self.staleness.keys()), dtype=np.float64),
                           list(self.staleness.values())) if self.staleness else np.array([])
        return {
            "updates": self.version, "samples": self.samples, "ps_wall_s": wall,
            "updates_per_s": (self.prev["updates"] + seg_updates) / window if window > 0
            else None,
            "samples_per_s_total": (self.prev["samples"] + seg_samples) / window if window > 0
            else None,
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
            "worker_clocks": self.clocks(),
            "failed_workers": self.failed_workers(),
            **({"joined_workers": self.joined_report()} if self.cfg.ps_join else {}),
        }


class Inbox:
    """Headers (tag ``HDR``) from every worker. Without joined workers: one blocking receive
    from any rank of ``comm``. With them: a receive posted on ``comm`` and on each joined
    worker's intercommunicator, and whichever completes first (tested in a loop that calls
    ``check`` about once a second: True there means a joined worker was lost, and ``recv``
    returns -1); a header from another worker than the one waited for is kept, in arrival
    order, for a later call."""

    def __init__(self, comm, MPI, links: dict[int, tuple],
                 check: Callable[[], bool] = lambda: False) -> None:
        self.comm, self.MPI, self.links, self.check = comm, MPI, links, check
        self.status = MPI.Status()
        self.posted: dict[int | None, tuple] = {}   # None: comm (any rank); else a worker id
        self.kept: deque[tuple[int, np.ndarray]] = deque()
        self.next_check = 0.0

    def recv(self, hdr: np.ndarray, source: int | None = None) -> int:
        """Fill ``hdr`` with the next header (from ``source``, or anyone); returns the sender."""
        for i, (src, data) in enumerate(self.kept):
            if source is None or src == source:
                del self.kept[i]
                hdr[...] = data
                return src
        if not self.links and not self.posted:
            self.comm.Recv(hdr, source=self.MPI.ANY_SOURCE if source is None else source,
                           tag=P.HDR, status=self.status)
            return self.status.Get_source()
        while True:
            for key in [None, *self.links]:
                if key not in self.posted:
                    buf = np.empty(P.HEADER_LEN, np.float64)
                    comm, src = (self.comm, self.MPI.ANY_SOURCE) if key is None \
                        else self.links[key]
                    self.posted[key] = (comm.Irecv(buf, source=src, tag=P.HDR), buf)
            keys = list(self.posted)
            reqs = [self.posted[k][0] for k in keys]
            while True:
                if time.monotonic() >= self.next_check:     # busy or idle, once a second
                    self.next_check = time.monotonic() + 1.0
                    if self.check():
                        return -1
                done, flag = self.MPI.Request.Testany(reqs, self.status)
                if flag:
                    break
                time.sleep(0.0001)
            key = keys[done]
            buf = self.posted.pop(key)[1]
            src = self.status.Get_source() if key is None else key
            if source is None or src == source:
                hdr[...] = buf
                return src
            self.kept.append((src, buf))

    def drop(self, key: int) -> None:
        """Forget a lost worker: cancel its posted receive and what was kept from it."""
        if key in self.posted:
            req = self.posted.pop(key)[0]
            req.Cancel()
            req.Wait()
        self.kept = deque((src, data) for src, data in self.kept if src != key)

    def close(self) -> None:
        """Cancel the receives still posted (the job has ended: nothing more is sent)."""
        for req, _ in self.posted.values():
            req.Cancel()
            req.Wait()
        self.posted.clear()

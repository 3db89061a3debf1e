"""The framework-free training loop: data shard -> step -> metrics -> checkpoint -> eval.

It talks to the framework only through the Backend contract, so PyTorch and TensorFlow runs
execute exactly the same schedule, data order, evaluation and checkpoint logic.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from harness import checkpoint as ckpt_io
from harness.backends.base import Backend, FitBackend
from harness.compress import dense_sent_bytes
from harness.config import RunConfig
from harness.data import Dataset, Sharder, eval_shard
from harness.driver import LRSchedule, eval_record, eval_sums, track_target
from harness.env import World
from harness.errors import TrainingAborted
from harness.faults import FaultInjector
from harness.localsgd import LocalSGD
from harness.metrics import MetricsWriter, StepBreakdown, StepTimer
from harness.preemption import StopFlag, Watchdog
from harness.progress import Progress
from harness.runinfo import process_age_s


class Preempted(Exception):
    """All ranks agreed to stop at a step boundary; a checkpoint was written."""

    def __init__(self, step: int, signum: int | None) -> None:
        super().__init__(f"stopped at step {step} (signal {signum})")
        self.step = step


@dataclass
class Position:
    """Where a run is, and the bookkeeping that a resumed run needs to carry on exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0                 # global optimizer steps done
    samples: int = 0              # training samples consumed over all ranks
    wall_s: float = 0.0           # training wall time before this start (resumes add up)
    best_eval_acc: float | None = None
    time_to_target_s: float | None = None
    steps_to_target: int | None = None
    # rank 0's running sums of the epoch in progress (the epoch record after a resume)
    epoch_loss_sum: float = 0.0
    epoch_loss_n: int = 0
    epoch_metrics: dict[str, float] = field(default_factory=dict)   # metric sums
    epoch_seen: int = 0
    skipped: int = 0              # updates skipped (nan_policy = skip) so far

    def as_vector(self) -> np.ndarray:
        """What every rank must agree on (rank 0 alone keeps the metrics bookkeeping)."""
        return np.array([self.epoch, self.step_in_epoch, self.step, self.samples, self.wall_s,
                         self.skipped], dtype=np.float64)

    @classmethod
    def from_vector(cls, v: np.ndarray) -> "Position":
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), float(v[4]), skipped=int(v[5]))

    def as_meta(self, wall_s: float) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), wall_s=wall_s)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Position":
        """From a checkpoint's ``position`` (older checkpoints lack the newer fields)."""
        names = {f.name for f in dataclasses.fields(cls)}
        pos = cls(**{k: v for k, v in meta.items() if k in names})
        if "epoch_correct" in meta:      # written before tasks had metrics of their own
            pos.epoch_metrics = {"acc": float(meta["epoch_correct"])}
        return pos


@dataclass(frozen=True)
class Plan:
    """The optimisation a run performs, fixed by the config and the world size. A checkpoint
    records it; a resume may change the number of ranks only when the plan stays the same."""

    global_batch: int
    steps_per_epoch: int
    total_steps: int
    lr_peak: float
    warmup_steps: int

    @classmethod
    def of(cls, cfg: RunConfig, world_size: int, n_train: int) -> "Plan":
        sharder = Sharder(n_train, step_batch(cfg, world_size), 0, world_size, cfg.seed,
                          cfg.shuffle, elastic_batch(cfg, world_size))
        spe = sharder.steps_per_epoch
        schedule = LRSchedule.of(cfg, world_size, spe)
        total = cfg.epochs * spe if cfg.max_steps is None else min(cfg.epochs * spe,
                                                                   cfg.max_steps)
        return cls(sharder.global_batch, spe, total, schedule.peak, schedule.warmup_steps)

    def as_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunContext:
    cfg: RunConfig
    world: World
    backend: Backend
    data: Dataset
    run_dir: Path
    log: Any
    metrics: MetricsWriter
    stop: StopFlag
    ckpt_meta: dict[str, Any] = field(default_factory=dict)
    last_saved_step: int | None = None
    #: the resumed checkpoint's run bookkeeping (Checkpoint.extra), or empty
    resume_extra: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate(ctx: RunContext) -> dict[str, Any]:
    """Test loss and metrics over the whole test set: each rank a shard, sums allreduced."""
    n = len(ctx.data.test)
    index = np.arange(n)[eval_shard(n, ctx.world.rank, ctx.world.size)]
    total = ctx.backend.allreduce_host(eval_sums(ctx.backend, ctx.data, index))
    return eval_record(list(ctx.backend.task.metrics), total, ctx.backend.task.tokens_per_sample)


def save_checkpoint(ctx: RunContext, pos: Position, wall_s: float,
                    timer: StepTimer | None = None) -> Path | None:
    if ctx.last_saved_step == pos.step:
        return None
    exchange = ctx.backend.exchange_state()       # every rank's residuals: a collective
    ctx.last_saved_step = pos.step
    if ctx.world.rank != 0:
        return None
    arrays, opt_meta = ctx.backend.get_optimizer_state()
    meta = dict(ctx.ckpt_meta, optimizer=opt_meta, position=pos.as_meta(wall_s))
    extra = timer.state() if timer is not None else {}
    path = ckpt_io.save(ctx.run_dir / "checkpoints",
                        ckpt_io.Checkpoint(meta, ctx.backend.get_weights(), arrays, extra=extra,
                                           exchange=exchange))
    ctx.log.info(f"checkpoint {path.name} (step {pos.step})")
    return path


def warn_fresh(ctx: RunContext, fresh: list[str]) -> None:
    """Rank 0 says which per-rank state a resume could not restore (Backend.restore_exchange)."""
    if fresh and ctx.world.rank == 0:
        ctx.log.warning(f"the checkpoint has no per-rank state ({', '.join(fresh)}) for "
                        f"{ctx.world.size} ranks (saved by another number of ranks, with other "
                        "compression or local SGD settings, on another device, or by an older "
                        "harness): it starts afresh (the optimizer's from rank 0's), so this "
                        "resume is not exact")


def step_batch(cfg: RunConfig, world_size: int) -> int:
    """Samples one rank consumes per harness step. The step loop folds
    backward_passes_per_step micro-batches into one step; model.fit steps per micro-batch and
    Horovod's Keras optimizer accumulates them."""
    k = 1 if cfg.tf_loop == "fit" else cfg.backward_passes_per_step
    g = elastic_batch(cfg, world_size)
    if g is not None:               # the largest slice of the elastic run's global batch
        return -(-g // world_size) * k
    return cfg.per_rank_batch(world_size) * k


def elastic_batch(cfg: RunConfig, start_ranks: int) -> int | None:
    """An elastic run's global batch, fixed for the whole run (None: not elastic)."""
    return (cfg.global_batch_size or cfg.batch_size * start_ranks) if cfg.elastic else None


class TrainingRun:
    """The schedule, bookkeeping and stop logic of one run, shared by both training drivers:
    the step loop (``backend.train_step``) and Keras ``model.fit`` (``tf_loop = "fit"``)."""

    def __init__(self, ctx: RunContext, pos: Position, resumed: bool, per_rank: int,
                 global_batch: int | None = None, lr_ranks: int | None = None) -> None:
        """``global_batch`` and ``lr_ranks`` (elastic runs): the global batch split over the
        ranks there are, and the ranks the learning rate is scaled for, both fixed by the
        run's start whatever the world size now."""
        cfg, world = ctx.cfg, ctx.world
        self.ctx, self.pos, self.resumed = ctx, pos, resumed
        self.sharder = Sharder(len(ctx.data.train), per_rank, world.rank, world.size,
                               cfg.seed, cfg.shuffle, global_batch)
        self.metric_names = list(ctx.backend.task.metrics)
        self.spe = self.sharder.steps_per_epoch
        self.total_steps = cfg.epochs * self.spe if cfg.max_steps is None else \
            min(cfg.epochs * self.spe, cfg.max_steps)
        self.schedule = LRSchedule.of(cfg, lr_ranks or world.size, self.spe)
        self.timer = StepTimer(warmup=min(5, max(1, self.total_steps // 10)))
        self.timer.restore(ctx.resume_extra)       # step times of earlier segments
        self.breakdown = StepBreakdown(self.timer.warmup)     # this start's steps
        #: this start's start-up: the process's age now (interpreter, imports, data, model
        #: build) and its first step (graph tracing, allocator warm-up), apart from training
        self.startup_s = process_age_s()
        self.first_step_s: float | None = None
        self.progress = Progress(world.rank == 0, self.total_steps, ctx.log, cfg.log_every)
        self.watchdog = Watchdog(world.rank, cfg.stall_timeout_s, ctx.log,
                                 stall_inspector=ctx.backend.gradient_path == "horovod")
        ctx.backend.wait_hook = self.watchdog.wait
        self.start_wall = time.perf_counter() - pos.wall_s
        self.last_eval: dict[str, Any] = {}
        self.lr = self.schedule(pos.step)
        self.update_every = ctx.backend.update_every()
        self.stop_agreed = False         # every rank knows that some rank was asked to stop
        self.save_pending = False        # a checkpoint waits for the next update boundary
        #: the ranks' weights agree (false between local SGD's averages)
        self.synced = True
        self.sent: list[int] = []        # bytes rank 0 sent per step (this start's steps)
        ctx.ckpt_meta["plan"] = Plan(self.sharder.global_batch, self.spe, self.total_steps,
                                     self.schedule.peak, self.schedule.warmup_steps).as_meta()

    def wall(self) -> float:
        return time.perf_counter() - self.start_wall

    def announce(self, style: str) -> None:
        c, w, s = self.ctx.cfg, self.ctx.world, self.sharder
        self.ctx.log.info(
            f"training {c.framework}/{self.ctx.backend.task.name} on {self.ctx.data.name} "
            f"({style}): {w.size} "
            f"rank(s), batch {s.batch}/rank ({s.global_batch} global), {self.spe} steps/epoch, "
            f"{self.total_steps} steps, lr {self.schedule.peak:g} (warm-up "
            f"{self.schedule.warmup_steps} steps)")

    def record_step(self, loss: float, metric_sums: dict[str, float], n: int, step_time: float,
                    applied: bool = True,
                    parts: tuple[float, float | None, float | None, float] | None = None,
                    sent_bytes: int | None = None) -> None:
        """After every optimizer step: metrics, progress, NaN and stop checks, checkpoints.
        ``parts``: the step's (data, compute, exchange, harness) seconds, where measured;
        ``sent_bytes``: what this rank sent for the gradient exchange."""
        cfg, pos, ctx = self.ctx.cfg, self.pos, self.ctx
        pos.step += 1
        pos.step_in_epoch += 1
        pos.samples += self.sharder.global_batch
        self.watchdog.tick(pos.step, "training")
        if not math.isfinite(loss) and (applied or cfg.nan_policy == "stop"):
            raise TrainingAborted(
                f"non-finite loss ({loss}) at step {pos.step} (epoch {pos.epoch + 1}) on rank "
                f"{ctx.world.rank}: lower lr, check the data, or set nan_policy = 'skip'. No "
                "checkpoint was written after it.")
        if not applied and cfg.nan_policy == "stop":
            # the update was not applied; the loss can be finite where the gradients are not
            # (TensorFlow's ReLU and max-pool turn a NaN input into numbers)
            raise TrainingAborted(
                f"non-finite gradients at step {pos.step} (epoch {pos.epoch + 1}) on rank "
                f"{ctx.world.rank}, whose loss was {loss:g} (after an exchange any rank's batch "
                "may have caused them): lower lr, check the data, or set nan_policy = 'skip'. "
                "No checkpoint was written after it.")
        if not applied:
            pos.skipped += 1
            ctx.log.warning(f"step {pos.step}: non-finite gradients, update skipped "
                            f"(nan_policy = skip; {pos.skipped} skipped so far)")
        self.timer.add(step_time)
        if self.first_step_s is None:
            self.first_step_s = step_time
        if parts is not None:
            self.breakdown.add(*parts)
        data_s, compute_s, exchange_s, harness_s = parts or (None, None, None, None)
        means = {m: metric_sums[m] / n for m in self.metric_names}
        pos.epoch_loss_sum += loss
        pos.epoch_loss_n += 1
        for m in self.metric_names:
            pos.epoch_metrics[m] = pos.epoch_metrics.get(m, 0.0) + metric_sums[m]
        pos.epoch_seen += n
        rate = self.sharder.global_batch / step_time
        ctx.metrics.write("step", step=pos.step, epoch=pos.epoch + 1, loss=loss, **means,
                          lr=self.lr, step_time_s=step_time, samples_per_s_rank=n / step_time,
                          samples_per_s_total=rate, wall_s=self.wall(), applied=applied,
                          t_data_s=data_s, t_compute_s=compute_s, t_exchange_s=exchange_s,
                          t_harness_s=harness_s, sent_bytes=sent_bytes,
                          world_size=ctx.world.size, **self.token_rate(rate))
        if sent_bytes is not None:
            self.sent.append(sent_bytes)
        self.progress.update(pos.step, loss, means, rate)
        ckpt_due = bool(cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0)
        self.save_pending = self.save_pending or ckpt_due
        if pos.step % cfg.agree_every == 0 or ckpt_due:
            self.agree()
        if self.at_boundary():
            self.stop_if_agreed()
            if self.save_pending:
                self.watchdog.tick(phase="checkpointing")
                self.save()

    def token_rate(self, samples_per_s: float) -> dict[str, float]:
        """A language model's step record: tokens/s over all ranks."""
        tokens = self.ctx.backend.task.tokens_per_sample
        return {"tokens_per_s_total": samples_per_s * tokens} if tokens else {}

    def at_boundary(self) -> bool:
        """Between optimizer updates (always, unless model.fit accumulates micro-batches),
        where the ranks' weights agree (local SGD: at its averages)."""
        return self.synced and (self.pos.step % self.update_every == 0
                                or self.pos.step >= self.total_steps)

    def save(self) -> None:
        save_checkpoint(self.ctx, self.pos, self.wall(), self.timer)
        self.save_pending = False

    def end_epoch(self) -> None:
        cfg, pos, ctx = self.ctx.cfg, self.pos, self.ctx
        pos.epoch += 1
        pos.step_in_epoch = 0
        rec: dict[str, Any] = {
            "epoch": pos.epoch, "step": pos.step,
            "train_loss": pos.epoch_loss_sum / pos.epoch_loss_n if pos.epoch_loss_n else None,
            **{f"train_{m}": (pos.epoch_metrics.get(m, 0.0) / pos.epoch_seen
                              if pos.epoch_seen else None) for m in self.metric_names}}
        if pos.step >= self.total_steps or (cfg.eval_every and pos.epoch % cfg.eval_every == 0):
            self._evaluate()
            rec.update({k: v for k, v in self.last_eval.items() if k != "step"})
        rec.update(wall_s=self.wall(), samples=pos.samples, time_to_target_s=pos.time_to_target_s)
        ctx.metrics.write("epoch", **rec)
        self.progress.epoch(pos.epoch, rec)
        pos.epoch_loss_sum, pos.epoch_loss_n, pos.epoch_metrics, pos.epoch_seen = 0.0, 0, {}, 0
        self.agree()
        self.save_pending = True
        if self.at_boundary():
            self.stop_if_agreed()
            self.watchdog.tick(phase="checkpointing")
            self.save()

    def _evaluate(self) -> None:
        self.watchdog.tick(phase="evaluating")
        self.last_eval = evaluate(self.ctx)
        self.last_eval["step"] = self.pos.step
        if "eval_acc" in self.last_eval:
            track_target(self.ctx.cfg, self.pos, self.last_eval["eval_acc"], self.wall(),
                         self.pos.step)

    def finish(self) -> dict[str, Any]:
        """Final evaluation and checkpoint (if the last epoch did not end on them); summary."""
        pos, ctx = self.pos, self.ctx
        if self.last_eval.get("step") != pos.step:    # max_steps ended mid-epoch, or resumed at end
            self._evaluate()
            ctx.metrics.write("eval", epoch=pos.epoch, **self.last_eval, wall_s=self.wall())
            self.save()
        wall = self.wall()
        summary = self.timer.summary(self.sharder.global_batch, ctx.world.size)
        summary.update(
            steps=pos.step, epochs=pos.epoch, samples=pos.samples, train_wall_s=wall,
            samples_per_s_wall=pos.samples / wall if wall > 0 else None,
            final_eval_loss=self.last_eval.get("eval_loss"),
            **{f"final_eval_{m}": self.last_eval.get(f"eval_{m}") for m in self.metric_names},
            loss_name=ctx.backend.task.loss_name, metrics=self.metric_names,
            best_eval_acc=pos.best_eval_acc,
            target_accuracy=ctx.cfg.target_accuracy, time_to_target_s=pos.time_to_target_s,
            steps_to_target=pos.steps_to_target, skipped_steps=pos.skipped,
            global_batch=self.sharder.global_batch, world_size=ctx.world.size,
            startup_s=self.startup_s, first_step_s=self.first_step_s,
            time_breakdown=self.breakdown_summary(), **weights_consistency(ctx),
            compression=ctx.cfg.compression,
            local_sgd_period=ctx.cfg.local_sgd_period or None,
            local_sgd_start_epoch=ctx.cfg.local_sgd_start_epoch if ctx.cfg.local_sgd_period
            else None,
            sent_bytes_per_step=float(np.mean(self.sent)) if self.sent else None,
            dense_bytes_per_step=dense_sent_bytes(ctx.backend.layout.total, ctx.world.size))
        return summary

    def breakdown_summary(self) -> dict[str, Any]:
        """Rank 0's median step parts and every part's range over the ranks' medians (one
        collective at the end of the run; every rank calls it)."""
        own = self.breakdown.medians()
        known = np.nan_to_num(own)          # NaN where not measured: alike on every rank
        hi = self.ctx.backend.allreduce_host(np.concatenate([known, -known]), "max")
        n = len(own)
        unknown = np.isnan(own)
        return StepBreakdown.summary(own, np.where(unknown, np.nan, hi[:n]),
                                     np.where(unknown, np.nan, -hi[n:]))

    def agree(self) -> None:
        """All ranks learn whether any rank was asked to stop (a collective: every rank calls
        it at the same steps)."""
        if self.stop_agreed:
            return
        self.watchdog.tick(phase="agreeing on stop flags")
        flags = self.ctx.backend.allreduce_host(
            np.array([1.0 if self.ctx.stop.requested else 0.0]), "max")
        self.stop_agreed = bool(flags[0] > 0)

    def stop_if_agreed(self) -> None:
        """At an update boundary after a stop was agreed: checkpoint and stop."""
        if not self.stop_agreed:
            return
        ctx, pos = self.ctx, self.pos
        ctx.log.warning(f"stop requested (signal on at least one rank): checkpointing at step "
                        f"{pos.step} and exiting for requeue")
        self.watchdog.tick(phase="checkpointing for preemption")
        self.save()
        # every rank waits for rank 0's checkpoint: a launcher that kills the job when the first
        # rank exits (srun --kill-on-bad-exit) must not interrupt the write
        ctx.backend.allreduce_host(np.zeros(1))
        raise Preempted(pos.step, ctx.stop.signum)

    def close(self) -> None:
        self.watchdog.stop()
        self.progress.close()


def weights_consistency(ctx: RunContext) -> dict[str, Any]:
    """Do all ranks end with the same trainable weights? (Catches silently unsynchronised
    training. Batch-norm running statistics are per rank in data-parallel training, as in
    Horovod, so they are left out.)"""
    checksum = float(np.sum(ctx.backend.get_flat_params(), dtype=np.float64))
    hi = ctx.backend.allreduce_host(np.array([checksum, -checksum]), "max")
    spread = float(hi[0] + hi[1])
    return {"weights_checksum": checksum, "weights_spread": spread,
            "ranks_consistent": spread == 0.0}


def train(ctx: RunContext, pos: Position, resumed: bool) -> dict[str, Any]:
    """Run from ``pos`` to the end of the schedule; returns the summary record's fields."""
    if isinstance(ctx.backend, FitBackend):
        return train_fit(ctx, ctx.backend, pos, resumed)
    return train_steps(ctx, pos, resumed)


class Segment(Protocol):
    """What the step loop asks of an elastic run (harness/elastic.py)."""

    global_batch: int        # fixed for the run, split over the ranks there are
    start_ranks: int         # the ranks the learning rate is scaled for
    first_rank: int          # this process's rank when it started (fault injection)
    run: "TrainingRun | None"

    def after_step(self, run: "TrainingRun", state: Any) -> None: ...

    def after_epoch(self, run: "TrainingRun", state: Any) -> None: ...


def train_steps(ctx: RunContext, pos: Position, resumed: bool, elastic: Segment | None = None,
                state: Any = None) -> dict[str, Any]:
    """The step loop from ``pos`` to the end of the schedule. ``elastic``: one segment of an
    elastic run (harness/elastic.py), whose ``state`` the loop commits; its sync has made the
    ranks equal, so nothing is broadcast here."""
    cfg, world, backend = ctx.cfg, ctx.world, ctx.backend
    if elastic is None:
        run = TrainingRun(ctx, pos, resumed, step_batch(cfg, world.size))
    else:
        run = TrainingRun(ctx, pos, resumed, 0, elastic.global_batch, elastic.start_ranks)
        elastic.run = run
    # an elastic run's faults name the rank a process had when the run started
    faults = FaultInjector(world.rank if elastic is None else elastic.first_rank,
                           desync=lambda: backend.set_flat_params(
                               backend.get_flat_params() * np.float32(1.001)))
    straggle = cfg.straggler_rank == world.rank
    local = LocalSGD.of(cfg, world.size)
    backend.set_lr(run.lr)
    run.announce("step loop" if local is None else
                 f"step loop, local SGD: weights averaged every {local.period} steps"
                 + (f" from epoch {local.start_epoch + 1}" if local.start_epoch else ""))
    run.watchdog.start()
    # PyTorch: broadcast before step 1. TensorFlow: after step 1 (its optimizer slots exist
    # only then); a resumed TF run also broadcasts before step 1 so that every rank starts
    # from rank 0's checkpoint instead of its own initial weights. A local SGD step leaves the
    # ranks apart, so a first step that is local comes after the broadcast.
    first_local = local is not None and local.local(pos.epoch)
    first_step_done = elastic is not None         # no broadcasts in an elastic segment
    if elastic is None and (not backend.broadcast_after_first_step or resumed or first_local):
        backend.broadcast_state(resumed=resumed)
    if resumed and elastic is None:
        fresh = backend.restore_exchange()     # each rank's own residual, generators, ...
        backend.set_lr(run.lr)   # the restored optimizer state holds the last step's (Keras)
        warn_fresh(ctx, fresh)
    tail = 0.0
    try:
        if pos.step_in_epoch >= run.spe:      # resumed from a stop on an epoch's last step
            run.end_epoch()
        while pos.step < run.total_steps:
            while pos.step_in_epoch < run.spe and pos.step < run.total_steps:
                t0 = time.perf_counter()
                xb, yb = ctx.data.train.batch(run.sharder.indices(pos.epoch, pos.step_in_epoch))
                t_data = time.perf_counter() - t0
                xb = faults.before_step(pos.step + 1, xb)
                new_lr = run.schedule(pos.step)
                if new_lr != run.lr:
                    backend.set_lr(new_lr)
                    run.lr = new_lr
                t_call = time.perf_counter()
                is_local = local is not None and local.local(pos.epoch)
                res = backend.local_step(xb, yb) if is_local else backend.train_step(xb, yb)
                if straggle:                   # experiments: this rank is slow
                    time.sleep((cfg.straggler_factor - 1.0) * (time.perf_counter() - t0))
                exchange, sent = res.exchange_s, backend.sent_bytes()
                if local is not None and is_local:
                    exchange, sent = average_if_due(run, local, backend, res.applied, len(yb))
                t_ret = time.perf_counter()
                step_time = t_ret - t0
                if not first_step_done:
                    first_step_done = True
                    if backend.broadcast_after_first_step and not first_local:
                        backend.broadcast_state(resumed=resumed)
                # the step's parts from this rank's clock alone: no barrier, no device sync
                t_rec = time.perf_counter()
                compute = None if exchange is None else (t_ret - t_call) - exchange
                harness = (t_rec - t0) - t_data - (t_ret - t_call) + tail
                run.record_step(res.loss, res.metrics, len(yb), step_time, res.applied,
                                (t_data, compute, exchange, harness), sent)
                if elastic is not None:
                    elastic.after_step(run, state)
                tail = time.perf_counter() - t_rec      # this step's bookkeeping: the next's
            if pos.step_in_epoch >= run.spe:        # a completed epoch
                run.end_epoch()
                if elastic is not None:
                    elastic.after_epoch(run, state)
        return run.finish()
    finally:
        run.close()


def average_if_due(run: TrainingRun, local: LocalSGD, backend: Backend, applied: bool,
                   n: int) -> tuple[float, int]:
    """After a local SGD step: average the ranks' weights if the period, the epoch or the run
    ends with it. Returns the step's (exchange seconds, bytes sent)."""
    pos = run.pos
    if applied:
        local.applied += n
    if not local.due(pos.step_in_epoch + 1, run.spe, pos.step + 1, run.total_steps):
        run.synced = False
        return 0.0, 0
    t = time.perf_counter()
    size = run.ctx.world.size
    backend.average_params(local.share(size, backend.allreduce_host))
    run.synced = True
    return time.perf_counter() - t, dense_sent_bytes(backend.layout.total, size)


def train_fit(ctx: RunContext, backend: FitBackend, pos: Position,
              resumed: bool) -> dict[str, Any]:
    """The same schedule driven by Keras ``model.fit`` (one fit call per epoch)."""
    cfg, world = ctx.cfg, ctx.world
    run = TrainingRun(ctx, pos, resumed, step_batch(cfg, world.size))
    faults = FaultInjector(world.rank)
    backend.set_lr(run.lr)
    run.announce("model.fit")
    run.watchdog.start()
    backend.broadcast_state(resumed=resumed)      # its optimizer was built in setup
    if resumed:
        warn_fresh(ctx, backend.restore_exchange())   # each rank's own random generators

    def before_step() -> None:
        faults.before_step(pos.step + 1, np.zeros(1))
        new_lr = run.schedule(pos.step)
        if new_lr != run.lr:
            backend.set_lr(new_lr)
            run.lr = new_lr

    def on_step(loss: float, means: dict[str, float], step_time: float) -> None:
        b = run.sharder.batch
        run.record_step(loss, {m: v * b for m, v in means.items()}, b, step_time,
                        sent_bytes=backend.sent_bytes())

    step_callback = backend.step_callback(on_step, before_step)
    try:
        if pos.step_in_epoch >= run.spe:      # resumed from a stop on an epoch's last step
            run.end_epoch()
        while pos.step < run.total_steps:
            end = min(run.spe, pos.step_in_epoch + run.total_steps - pos.step)
            idx = np.concatenate([np.arange(run.sharder.n)[run.sharder.indices(pos.epoch, s)]
                                  for s in range(pos.step_in_epoch, end)])
            x, y = ctx.data.train.batch(idx)
            callbacks = backend.callbacks()
            backend.fit_epoch(x, y, run.sharder.batch, pos.epoch, [*callbacks, step_callback])
            if pos.step_in_epoch >= run.spe:
                run.end_epoch()
        return run.finish()
    finally:
        run.close()

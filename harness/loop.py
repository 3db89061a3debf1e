"""The framework-free training loop: data shard -> step -> metrics -> checkpoint -> eval.

It talks to the framework only through the Backend contract, so PyTorch and TensorFlow runs
execute exactly the same schedule, data order, evaluation and checkpoint logic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import checkpoint as ckpt_io
from harness.backends.base import Backend
from harness.config import RunConfig
from harness.data import Dataset, Sharder, eval_shard, gather
from harness.env import World
from harness.errors import TrainingAborted
from harness.faults import FaultInjector
from harness.metrics import MetricsWriter, StepTimer
from harness.preemption import StopFlag, Watchdog
from harness.progress import Progress

EVAL_BATCH = 512


class Preempted(Exception):
    """All ranks agreed to stop at a step boundary; a checkpoint was written."""

    def __init__(self, step: int, signum: int | None) -> None:
        super().__init__(f"stopped at step {step} (signal {signum})")
        self.step = step


@dataclass
class Position:
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0                 # global optimizer steps done
    samples: int = 0              # training samples consumed over all ranks
    wall_s: float = 0.0           # training wall time before this start (resumes add up)
    best_eval_acc: float | None = None
    time_to_target_s: float | None = None
    steps_to_target: int | None = None

    def as_vector(self) -> np.ndarray:
        return np.array([self.epoch, self.step_in_epoch, self.step, self.samples, self.wall_s],
                        dtype=np.float64)

    @classmethod
    def from_vector(cls, v: np.ndarray) -> "Position":
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), float(v[4]))


@dataclass
class LRSchedule:
    """Linear scaling with the number of data-parallel ranks and linear warm-up (Goyal et al.)."""

    base: float
    peak: float
    warmup_steps: int

    @classmethod
    def of(cls, cfg: RunConfig, workers: int, steps_per_epoch: int) -> "LRSchedule":
        peak = cfg.lr * (workers if cfg.lr_scaling == "linear" else 1)
        return cls(cfg.lr, peak, int(round(cfg.warmup_epochs * steps_per_epoch)))

    def __call__(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.peak
        return self.base + (self.peak - self.base) * step / self.warmup_steps


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


def evaluate(ctx: RunContext) -> dict[str, float]:
    """Test loss and accuracy over the whole test set: each rank a shard, sums allreduced."""
    x, y = ctx.data.x_test, ctx.data.y_test
    shard = eval_shard(len(x), ctx.world.rank, ctx.world.size)
    xs, ys = x[shard], y[shard]
    loss_sum, correct = 0.0, 0
    for i in range(0, len(xs), EVAL_BATCH):
        xb, yb = gather(xs, ys, slice(i, i + EVAL_BATCH))
        lsum, corr = ctx.backend.eval_batch(xb, yb)
        loss_sum, correct = loss_sum + lsum, correct + corr
    total = ctx.backend.allreduce_host(np.array([loss_sum, correct, len(xs)], np.float64))
    return {"eval_loss": total[0] / total[2], "eval_acc": total[1] / total[2],
            "eval_samples": int(total[2])}


def save_checkpoint(ctx: RunContext, pos: Position, wall_s: float) -> Path | None:
    if ctx.world.rank != 0 or ctx.last_saved_step == pos.step:
        return None
    arrays, opt_meta = ctx.backend.get_optimizer_state()
    meta = dict(ctx.ckpt_meta, optimizer=opt_meta,
                position={"epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch,
                          "step": pos.step, "samples": pos.samples, "wall_s": wall_s,
                          "best_eval_acc": pos.best_eval_acc,
                          "time_to_target_s": pos.time_to_target_s,
                          "steps_to_target": pos.steps_to_target})
    path = ckpt_io.save(ctx.run_dir / "checkpoints",
                        ckpt_io.Checkpoint(meta, ctx.backend.get_weights(), arrays))
    ctx.last_saved_step = pos.step
    ctx.log.info(f"checkpoint {path.name} (step {pos.step})")
    return path


def train(ctx: RunContext, pos: Position, resumed: bool) -> dict[str, Any]:
    """Run from ``pos`` to the end of the schedule; returns the summary record's fields."""
    cfg, world, backend, log = ctx.cfg, ctx.world, ctx.backend, ctx.log
    per_rank = cfg.per_rank_batch(world.size) * cfg.backward_passes_per_step
    sharder = Sharder(len(ctx.data.x_train), per_rank, world.rank, world.size, cfg.seed,
                      cfg.shuffle)
    spe = sharder.steps_per_epoch
    total_steps = min(cfg.epochs * spe, cfg.max_steps or math.inf)
    schedule = LRSchedule.of(cfg, world.size, spe)
    faults = FaultInjector(world.rank)
    straggle = cfg.straggler_rank == world.rank
    watchdog = Watchdog(world.rank, cfg.stall_timeout_s, log).start()
    timer = StepTimer(warmup=min(5, max(1, total_steps // 10)))
    progress = Progress(world.rank == 0, total_steps, log, cfg.log_every)
    lr = schedule(pos.step)
    backend.set_lr(lr)
    log.info(f"training {cfg.framework}/{cfg.model} on {ctx.data.name}: {world.size} rank(s), "
             f"batch {per_rank}/rank ({sharder.global_batch} global), {spe} steps/epoch, "
             f"{total_steps} steps, lr {schedule.peak:g} (warm-up {schedule.warmup_steps} steps)")

    # PyTorch: broadcast before step 1. TensorFlow: after step 1 (its optimizer slots exist
    # only then); a resumed TF run also broadcasts before step 1 so that every rank starts
    # from rank 0's checkpoint instead of its own initial weights.
    if not backend.broadcast_after_first_step or resumed:
        backend.broadcast_state(resumed=resumed)
    first_step_done = False
    start_wall = time.perf_counter() - pos.wall_s
    epoch_losses: list[float] = []
    epoch_correct = epoch_seen = 0
    last_eval: dict[str, float] = {}
    skipped = 0
    try:
        while pos.step < total_steps:
            epoch = pos.epoch
            while pos.step_in_epoch < spe and pos.step < total_steps:
                t0 = time.perf_counter()
                xb, yb = gather(ctx.data.x_train, ctx.data.y_train,
                                sharder.indices(epoch, pos.step_in_epoch))
                xb = faults.before_step(pos.step + 1, xb)
                new_lr = schedule(pos.step)
                if new_lr != lr:
                    backend.set_lr(new_lr)
                    lr = new_lr
                res = backend.train_step(xb, yb)
                if straggle:                   # experiments: this rank is slow
                    time.sleep((cfg.straggler_factor - 1.0) * (time.perf_counter() - t0))
                step_time = time.perf_counter() - t0
                if not first_step_done:
                    first_step_done = True
                    if backend.broadcast_after_first_step:
                        backend.broadcast_state(resumed=resumed)
                pos.step += 1
                pos.step_in_epoch += 1
                pos.samples += sharder.global_batch
                watchdog.tick(pos.step, "training")
                if not res.applied:
                    skipped += 1
                    log.warning(f"step {pos.step}: non-finite gradients, update skipped "
                                f"(nan_policy = skip; {skipped} skipped so far)")
                elif not math.isfinite(res.loss):
                    raise TrainingAborted(
                        f"non-finite loss ({res.loss}) at step {pos.step} (epoch {epoch + 1}) "
                        f"on rank {world.rank}: lower lr, check the data, or set "
                        "nan_policy = 'skip'. No checkpoint was written after it.")
                timer.add(step_time)
                acc = res.correct / len(yb)
                epoch_losses.append(res.loss)
                epoch_correct += res.correct
                epoch_seen += len(yb)
                ctx.metrics.write("step", step=pos.step, epoch=epoch + 1, loss=res.loss,
                                  acc=acc, lr=lr, step_time_s=step_time,
                                  samples_per_s_rank=len(yb) / step_time,
                                  samples_per_s_total=sharder.global_batch / step_time,
                                  wall_s=time.perf_counter() - start_wall, applied=res.applied)
                progress.update(pos.step, res.loss, acc, sharder.global_batch / step_time)
                ckpt_due = cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0
                if pos.step % cfg.agree_every == 0 or ckpt_due:
                    _agree_or_stop(ctx, pos, start_wall, watchdog)
                if ckpt_due:
                    watchdog.tick(phase="checkpointing")
                    save_checkpoint(ctx, pos, time.perf_counter() - start_wall)
            if pos.step_in_epoch >= spe:        # a completed epoch
                pos.epoch += 1
                pos.step_in_epoch = 0
                is_last = pos.step >= total_steps
                rec: dict[str, Any] = {
                    "epoch": pos.epoch, "step": pos.step,
                    "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                    "train_acc": epoch_correct / epoch_seen if epoch_seen else None}
                if is_last or (cfg.eval_every and pos.epoch % cfg.eval_every == 0):
                    watchdog.tick(phase="evaluating")
                    last_eval = evaluate(ctx)
                    rec.update(last_eval)
                    last_eval["step"] = pos.step
                    _track_target(cfg, pos, last_eval["eval_acc"], start_wall)
                rec.update(wall_s=time.perf_counter() - start_wall, samples=pos.samples,
                           time_to_target_s=pos.time_to_target_s)
                ctx.metrics.write("epoch", **rec)
                progress.epoch(pos.epoch, rec)
                epoch_losses, epoch_correct, epoch_seen = [], 0, 0
                _agree_or_stop(ctx, pos, start_wall, watchdog)
                watchdog.tick(phase="checkpointing")
                save_checkpoint(ctx, pos, time.perf_counter() - start_wall)
        if last_eval.get("step") != pos.step:     # max_steps ended mid-epoch, or resumed at end
            watchdog.tick(phase="evaluating")
            last_eval = evaluate(ctx)
            last_eval["step"] = pos.step
            _track_target(cfg, pos, last_eval["eval_acc"], start_wall)
            ctx.metrics.write("eval", epoch=pos.epoch, **last_eval,
                              wall_s=time.perf_counter() - start_wall)
            save_checkpoint(ctx, pos, time.perf_counter() - start_wall)
    finally:
        watchdog.stop()
        progress.close()
    wall = time.perf_counter() - start_wall
    summary = timer.summary(sharder.global_batch, world.size)
    summary.update(
        steps=pos.step, epochs=pos.epoch, samples=pos.samples, train_wall_s=wall,
        samples_per_s_wall=pos.samples / wall if wall > 0 else None,
        final_eval_loss=last_eval.get("eval_loss"), final_eval_acc=last_eval.get("eval_acc"),
        best_eval_acc=pos.best_eval_acc, target_accuracy=cfg.target_accuracy,
        time_to_target_s=pos.time_to_target_s, steps_to_target=pos.steps_to_target,
        skipped_steps=skipped, global_batch=sharder.global_batch, world_size=world.size)
    return summary


def _track_target(cfg: RunConfig, pos: Position, acc: float, start_wall: float) -> None:
    pos.best_eval_acc = acc if pos.best_eval_acc is None else max(pos.best_eval_acc, acc)
    if (cfg.target_accuracy is not None and pos.time_to_target_s is None
            and acc >= cfg.target_accuracy):
        pos.time_to_target_s = time.perf_counter() - start_wall
        pos.steps_to_target = pos.step


def _agree_or_stop(ctx: RunContext, pos: Position, start_wall: float, watchdog: Watchdog) -> None:
    """All ranks learn whether any rank was asked to stop; if so checkpoint and stop."""
    watchdog.tick(phase="agreeing on stop flags")
    flags = ctx.backend.allreduce_host(np.array([1.0 if ctx.stop.requested else 0.0]), "max")
    if flags[0] > 0:
        ctx.log.warning(f"stop requested (signal on at least one rank): checkpointing at step "
                        f"{pos.step} and exiting for requeue")
        watchdog.tick(phase="checkpointing for preemption")
        save_checkpoint(ctx, pos, time.perf_counter() - start_wall)
        # every rank waits for rank 0's checkpoint: a launcher that kills the job when the first
        # rank exits (srun --kill-on-bad-exit) must not interrupt the write
        ctx.backend.allreduce_host(np.zeros(1))
        raise Preempted(pos.step, ctx.stop.signum)

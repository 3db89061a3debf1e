"""Elastic training: Horovod's elastic API around the harness's own step loop.

``elastic = true`` runs the step loop (``harness/loop.py``) inside the framework's
``hvd.elastic.run``. Every ``commit_every`` steps (and at every epoch end) the ranks commit the
training state to host memory: weights, optimizer state and the run's position (epoch, step,
samples, the metrics' running sums). Then:

* a rank is lost (a collective fails with ``HorovodInternalError``): the others restore the
  last commit, Horovod restarts its runtime at the smaller size, rank 0's commit is broadcast,
  and the loop goes on from it;
* the host discovery script lists a new host: at the next commit every rank stops
  (``HostsUpdatedInterrupt``), the runtime restarts with the new rank, which receives rank 0's
  state, and the loop goes on.

The global batch never changes: it is fixed when the run starts (``global_batch_size``, or
``batch_size`` x the ranks at the start) and split over whatever ranks there are, as evenly as
it goes, each rank's mean gradient weighted by its slice. So the learning-rate schedule, the
steps per epoch and the data order stay those of the run's plan, and every epoch covers each
training sample once however often the world changes. Each reset is a ``reset`` record in
metrics.jsonl; the summary lists them and the throughput of each segment of constant size.

This module imports no framework: the backend supplies ``elastic_run`` and ``bcast_object``,
and Horovod's framework-free ``horovod.common.elastic.State`` is imported when a run starts.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.errors import CheckpointError, TrainingAborted
from harness.logging import get_logger
from harness.data import split_batch
from harness.loop import (Position, RunContext, TrainingRun, elastic_batch, save_checkpoint,
                          train_steps)

if TYPE_CHECKING:
    from harness.backends.base import Backend


class RunFinished(Exception):
    """Rank 0 found the run finished (elastic start: the other ranks learn it in the sync)."""


@dataclass
class StartRefused:
    """What rank 0 sends in the first sync instead of its state when the run cannot start
    (``error``) or had already finished (``error`` None)."""

    error: str | None


def refuse_elastic_start(backend: "Backend", error: Exception | None) -> None:
    """Rank 0: tell the ranks waiting in the first sync, then raise ``error`` (if any)."""
    backend.bcast_object(StartRefused(None if error is None else str(error)))
    if error is not None:
        raise error


@dataclass
class Committed:
    """What a commit holds (host memory) and a sync sends from rank 0 to every rank."""

    weights: dict[str, Any]
    optimizer: tuple[dict[str, Any], dict[str, Any]]
    position: dict[str, Any]
    history: dict[str, list] = field(default_factory=lambda: {"resets": [], "segments": []})
    wall_s: float = 0.0
    saved_step: int | None = None        # the last checkpoint's step at the commit
    #: the run's plan: a rank that joins later started at another size and takes rank 0's
    global_batch: int = 0
    start_ranks: int = 0


class Elastic:
    """The hooks the step loop calls in an elastic run, and the run's reset history."""

    def __init__(self, ctx: RunContext, pos: Position) -> None:
        self.ctx, self.backend = ctx, ctx.backend
        cfg = ctx.cfg
        #: the plan's: this start's, or the checkpoint's that it resumes (rank 0's, which the
        #: first sync hands every rank)
        saved = ctx.ckpt_meta.get("elastic") or {}
        self.start_ranks = int(saved.get("start_ranks") or ctx.world.size)
        self.global_batch = elastic_batch(cfg, self.start_ranks) or 0
        #: this process's rank at its start (fault injection names it)
        self.first_rank = ctx.world.rank
        self.commit_every = cfg.commit_every
        self.min_ranks = cfg.min_ranks or 1
        self.t0 = time.perf_counter() - pos.wall_s
        self.live: Position = pos          # the position the loop is advancing
        self.run: TrainingRun | None = None
        self.size: int | None = None       # the world size of the last segment
        self.lost: dict[str, Any] | None = None    # set by a rollback: what was undone
        self.history: dict[str, list] = {"resets": [], "segments": []}
        self.committed = self._snapshot()

    # --- the state Horovod's elastic runner drives (via ElasticState) ---
    def _snapshot(self) -> Committed:
        b = self.backend
        arrays, meta = b.get_optimizer_state()
        return Committed(b.get_weights(), (arrays, meta), self.live.as_meta(self.wall()),
                         copy.deepcopy(self.history), self.wall(), self.ctx.last_saved_step,
                         self.global_batch, self.start_ranks)

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.committed = self._snapshot()

    def restore(self) -> None:
        """After a failed collective: back to the last commit (the sync that follows sends
        rank 0's to everyone)."""
        self.lost = {"failed_at_step": self.live.step,
                     "committed_step": int(self.committed.position["step"])}
        self._apply(self.committed)
        # a copy: the loop adds to the position's running sums in place
        self.live = Position.from_meta(copy.deepcopy(self.committed.position))

    def sync(self) -> None:
        """Rank 0's commit (its weights, optimizer, position, history) on every rank."""
        if self.backend.world.rank == 0:
            self.committed.history = copy.deepcopy(self.history)
            self.committed.wall_s = self.wall()
        c = self.backend.bcast_object(self.committed if self.backend.world.rank == 0
                                                 else None)
        if isinstance(c, StartRefused):
            if c.error is None:
                raise RunFinished()
            raise CheckpointError("rank 0 could not start the run (its error is reported "
                                  "above)")
        if self.backend.world.rank != 0:
            self._apply(c)
        self.committed = c
        self.global_batch, self.start_ranks = c.global_batch, c.start_ranks
        self.history = copy.deepcopy(c.history)
        self.t0 = time.perf_counter() - c.wall_s
        self.live = Position.from_meta(copy.deepcopy(c.position))

    def _apply(self, c: Committed) -> None:
        # a checkpoint written after the commit is written again when its step is redone
        self.ctx.last_saved_step = c.saved_step
        self.backend.set_weights(c.weights)
        arrays, meta = c.optimizer
        self.backend.set_optimizer_state(arrays, meta)

    # --- the loop's hooks ---
    def after_step(self, run: TrainingRun, state: Any) -> None:
        """At an update boundary every ``commit_every`` steps: commit (and learn of new
        hosts, which raises HostsUpdatedInterrupt on every rank at once)."""
        if run.pos.step % self.commit_every == 0 and run.at_boundary():
            state.commit()

    def after_epoch(self, run: TrainingRun, state: Any) -> None:
        if run.at_boundary():
            state.commit()

    # --- one segment: the loop at one world size ---
    def segment(self, state: Any) -> dict[str, Any]:
        ctx, backend = self.ctx, self.backend
        world = backend.refresh_world()
        ctx.world = world
        ctx.log = get_logger(world.rank)          # rank 0 may be another process now
        ctx.ckpt_meta["world_size"] = world.size
        pos = self.live
        if world.size > self.global_batch:
            raise TrainingAborted(f"{world.size} ranks cannot share the global batch of "
                                  f"{self.global_batch} samples: raise global_batch_size or "
                                  f"lower max_ranks to {self.global_batch}")
        backend.resize(split_batch(self.global_batch, world.rank, world.size)[0]
                       / self.global_batch)
        ctx.ckpt_meta["elastic"] = {"global_batch": self.global_batch,
                                    "start_ranks": self.start_ranks}
        ctx.metrics = _metrics_on_rank0(ctx)
        if self.size is not None and self.size != world.size or self.lost is not None:
            self._record_reset(world.size, pos)
        self.size = world.size
        ctx.resume_extra = self.run.timer.state() if self.run is not None else ctx.resume_extra
        pos.wall_s = self.wall()
        segment = {"world_size": world.size, "start_step": pos.step, "start_wall_s": pos.wall_s}
        self.history["segments"].append(segment)
        if self.lost is None and world.size < self.min_ranks:
            self._too_few(world.size, pos)
        try:
            return train_steps(ctx, pos, resumed=True, elastic=self, state=state)
        finally:
            segment.update(end_step=self.live.step, end_wall_s=self.wall())

    def _record_reset(self, size: int, pos: Position) -> None:
        old = self.size
        reason = "rank lost" if self.lost is not None else \
            ("hosts added" if old is not None and size > old else "hosts removed")
        rec = {"step": pos.step, "epoch": pos.epoch + 1, "old_size": old, "new_size": size,
               "reason": reason, "wall_s": self.wall(),
               "steps_redone": (self.lost["failed_at_step"] - self.lost["committed_step"])
               if self.lost else 0}
        self.lost = None
        self.history["resets"].append(rec)
        ctx = self.ctx
        ctx.metrics.write("reset", **rec)       # rank 0's writer; the others' drop it
        if ctx.world.rank == 0 and size < self.min_ranks:
            ctx.log.warning(f"elastic reset ({reason}): {old} -> {size} rank(s), below "
                            f"min_ranks = {self.min_ranks}: the job stops at step {pos.step}")
        elif ctx.world.rank == 0:
            ctx.log.warning(f"elastic reset ({reason}): {old} -> {size} rank(s), training "
                            f"goes on from step {pos.step}"
                            + (f" (the last commit; {rec['steps_redone']} step(s) are redone)"
                               if reason == "rank lost" else "")
                            + f"; global batch {self.global_batch} split "
                            + _split_text(self.global_batch, size))
        if size < self.min_ranks:
            self._too_few(size, pos)

    def _too_few(self, size: int, pos: Position) -> None:
        path = save_checkpoint(self.ctx, pos, self.wall())
        where = f"; checkpoint {path}" if path is not None else \
            f"; the last checkpoint is in {self.ctx.run_dir / 'checkpoints'}"
        raise TrainingAborted(f"{size} rank(s) left, fewer than min_ranks = {self.min_ranks}: "
                              f"the job stops at step {pos.step}{where}; "
                              "resume it with resume = 'auto' once enough ranks are back",
                              quiet=self.ctx.world.rank != 0)    # each rank left stops here

    def summary(self) -> dict[str, Any]:
        """The summary's ``elastic`` entry: every reset and each segment's throughput."""
        segs = []
        for s in self.history["segments"]:
            steps = s.get("end_step", self.live.step) - s["start_step"]
            wall = s.get("end_wall_s", self.wall()) - s["start_wall_s"]
            segs.append({**s, "steps": steps, "samples_per_s": steps * self.global_batch / wall
                         if steps > 0 and wall > 0 else None})
        return {"global_batch": self.global_batch, "start_ranks": self.start_ranks,
                "min_ranks": self.min_ranks, "commit_every": self.commit_every,
                "resets": self.history["resets"], "segments": segs}


def _split_text(global_batch: int, size: int) -> str:
    base, extra = divmod(global_batch, size)
    if not extra:
        return f"{base} per rank"
    return (f"unevenly ({extra} rank(s) take {base + 1}, {size - extra} take {base}; each "
            "rank's gradient is weighted by its share)")


def _metrics_on_rank0(ctx: RunContext):
    """Rank 0 writes the records; a rank that became rank 0 in a reset opens the files."""
    from harness.metrics import MetricsWriter
    from harness.tb import open_writer

    if ctx.world.rank != 0:
        if ctx.metrics.path is not None:
            ctx.metrics.close()
        return MetricsWriter(None)
    if ctx.metrics.path is not None:
        return ctx.metrics
    writer = MetricsWriter(ctx.run_dir / "metrics.jsonl",
                           tensorboard=open_writer(ctx.run_dir, ctx.cfg, ctx.log))
    writer.restart = max(0, writer.restart - 1)     # this start's run record is there already
    return writer


def make_state(elastic: Elastic) -> Any:
    """Horovod's elastic ``State`` over :class:`Elastic` (the commit Horovod's runner restores
    and syncs; ``commit`` also checks for host updates)."""
    from horovod.common.elastic import State

    class ElasticState(State):
        def __init__(self) -> None:
            super().__init__(bcast_object=elastic.backend.bcast_object,
                             get_rank=lambda: elastic.backend.world.rank)

        def save(self) -> None:
            elastic.save()

        def restore(self) -> None:
            elastic.restore()

        def sync(self) -> None:
            elastic.backend.refresh_world()
            elastic.sync()

    return ElasticState()


def train_elastic(ctx: RunContext, pos: Position) -> dict[str, Any]:
    """Train from ``pos`` to the end of the plan, through resets; the summary's fields."""
    backend: Backend = ctx.backend
    elastic = Elastic(ctx, pos)
    state = make_state(elastic)
    run = backend.elastic_run(elastic.segment)
    summary = run(state)
    summary["elastic"] = elastic.summary()
    return summary

"""One rank's training run: world, backend, data, resume, loop, results.

``run(cfg)`` is what ``harness train`` calls in every rank, whichever launcher started it.
"""

from __future__ import annotations

import logging
import math
import os

from harness import checkpoint as ckpt_io
from harness import compress, faults
from harness.compress import EF_METHODS
from harness.backends.base import RNG_ROWS, Backend, create
from harness.config import RunConfig
from harness.data import Dataset
from harness.elastic import RunFinished, refuse_elastic_start, train_elastic
from harness.driver import (agree_on_start, check_layout, check_same_settings,
                            checkpoint_identity, find_resume_checkpoint, final_metrics,
                            finish_record, finished,
                            load_task_data, log_finished, model_record, own_task_name, run_dir_of,
                            start_record)
from harness.env import World, check_runtime_world, detect_world
from harness.errors import CheckpointError, ConfigError, HarnessError, TrainingAborted
from harness.logging import get_logger
from harness.loop import Plan, Position, Preempted, RunContext, step_batch, train
from harness.metrics import MetricsWriter
from harness.preemption import EXIT_PREEMPTED, StopFlag
from harness.tb import open_writer
from harness.task import Task


def check_resume_fits(ckpt: ckpt_io.Checkpoint, cfg: RunConfig, world: World, plan: Plan,
                      log) -> None:
    """A checkpoint that does not fit this run is refused before anything is written."""
    kind = str(ckpt.meta.get("optimizer", {}).get("kind", ""))
    saved_opt = kind.rsplit(".", 1)[-1] if kind else None
    if saved_opt is not None and saved_opt != cfg.optimizer:
        raise CheckpointError(f"checkpoint {ckpt.path} holds {saved_opt} optimizer state, but "
                              f"this run has optimizer = {cfg.optimizer!r}: resume with "
                              f"optimizer = {saved_opt!r}, or start in a fresh run_name/out_dir")
    check_same_settings(ckpt, cfg, ("seed", "shuffle", "weight_decay",
                                    *(("momentum",) if cfg.optimizer == "sgd" else ())))
    saved = ckpt.meta.get("plan")
    old_size = ckpt.meta.get("world_size")
    if saved is None:                     # written before plans were recorded
        if old_size is not None and old_size != world.size:
            raise CheckpointError(f"checkpoint {ckpt.path} was written by {old_size} rank(s), "
                                  f"this run has {world.size}: resume with {old_size} rank(s)")
        return
    if saved["global_batch"] != plan.global_batch:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written with a global batch of {saved['global_batch']} "
            f"({old_size} rank(s)), this run has {plan.global_batch} ({world.size} rank(s)): the "
            "position in the data is counted in global batches, so resume with the same global "
            f"batch (e.g. global_batch_size = {saved['global_batch']}) or in a fresh run_name")
    if old_size != world.size:
        # the peak lr is lr x ranks for lr_scaling = 'linear': 0.05 x 3 is 0.15000000000000002,
        # which a user's --lr 0.15 must match
        base = (ckpt.meta.get("config") or {}).get("lr")
        if ckpt.step < saved["warmup_steps"] and base is not None and \
                not math.isclose(base, cfg.lr, rel_tol=1e-9):
            raise CheckpointError(
                f"checkpoint {ckpt.path} stopped in the learning-rate warm-up (step "
                f"{ckpt.step} of {saved['warmup_steps']}), which ramps from lr = {base:.10g} to "
                f"the peak {saved['lr_peak']:.10g} set by its {old_size} rank(s); this run's "
                f"ramp starts at lr = {cfg.lr:.10g}: resume with {old_size} rank(s) until the "
                "warm-up is over")
        if not math.isclose(saved["lr_peak"], plan.lr_peak, rel_tol=1e-9) or \
                saved["warmup_steps"] != plan.warmup_steps:
            raise CheckpointError(
                f"checkpoint {ckpt.path} was written by {old_size} rank(s) with peak lr "
                f"{saved['lr_peak']:.10g} and {saved['warmup_steps']} warm-up steps, this run "
                f"has {world.size} rank(s), peak lr {plan.lr_peak:.10g} and "
                f"{plan.warmup_steps} warm-up steps (lr_scaling = {cfg.lr_scaling!r}): resume with "
                f"{old_size} rank(s), or keep the schedule at {world.size}: lr = "
                f"{saved['lr_peak']:.10g}, lr_scaling = 'none', global_batch_size = "
                f"{saved['global_batch']} and warmup_epochs as before")
        per_rank = [what for what, on in [
            ("error-feedback residual", cfg.compression in EF_METHODS and cfg.error_feedback),
            ("optimizer state (local SGD)", cfg.local_sgd_period),
            ("random generators (dropout, a task's own draws: from the run's seed)", True)]
            if on]
        log.warning(f"checkpoint {ckpt.path} was written by {old_size} rank(s), this run "
                    f"has {world.size}: the global batch ({plan.global_batch}) and learning-rate "
                    f"schedule are unchanged, so training continues where it stopped, but each "
                    f"rank's own {' and '.join(per_rank)} start afresh")


#: the compression options that only some methods read
READ_BY = {"compression_ratio": "topk and randomk", "powersgd_rank": "powersgd"}


def unused_compression_settings(cfg: RunConfig) -> list[str]:
    """The compression options set away from their defaults that this run's method does not
    read (a sweep's shared config may set them: named, not refused)."""
    defaults = RunConfig()
    return [name for name, methods in (("compression_ratio", ("topk", "randomk")),
                                       ("powersgd_rank", ("powersgd",)))
            if getattr(cfg, name) != getattr(defaults, name) and cfg.compression not in methods]


def compression_settings(config: dict) -> tuple:
    """What a checkpoint's compression state depends on (its config's or this run's)."""
    return tuple(config.get(k) for k in compress.KEYS)


#: checkpoint meta: each rank's gradient was scaled by 1/size before the sum on every path, so
#: error-feedback residuals have one scale whichever path wrote them
GRADIENT_SCALE = "before_sum"


def presum_exchange(ckpt: ckpt_io.Checkpoint) -> dict:
    """The checkpoint's per-rank exchange state, less residuals of unknown scale. The mpi4py
    path divided the sum by the world size until it scaled the loss as Horovod's flat
    exchange does (checkpoints have said ``gradient_scale`` since shortly after): residuals
    it wrote before were world size times today's. An unmarked checkpoint of a run that may
    have taken that path (allreduce = 'mpi', or 'auto', which fell back to mpi4py without
    Horovod and takes it for PyTorch on CPU now) cannot tell which scale it holds, so its
    residuals start afresh, and the resume says it is not exact (Backend.restore_exchange);
    Horovod's were always scaled before the sum."""
    exchange = dict(ckpt.exchange)
    if ckpt.meta.get("gradient_scale") != GRADIENT_SCALE and \
            ckpt.meta.get("config", {}).get("allreduce") in ("mpi", "auto"):
        exchange.pop("residual", None)
    return exchange


def load_into_backend(backend: Backend, ckpt: ckpt_io.Checkpoint) -> None:
    """Restore weights and optimizer state; a checkpoint that does not fit is a CheckpointError."""
    try:
        backend.set_weights(ckpt.weights)
        if ckpt.optimizer:
            backend.set_optimizer_state(ckpt.optimizer, ckpt.meta["optimizer"])
        saved = ckpt.meta.get("config", {})
        same = compression_settings(saved) == compression_settings(backend.cfg.to_dict())
        c = backend.cfg
        keeps_state = bool(c.local_sgd_period) or c.compression in EF_METHODS and \
            (c.error_feedback or c.compression == "powersgd")
        dropped = sorted({"optimizer" if k.startswith("opt/") else k.split("/")[0]
                          for k in ckpt.exchange if k != RNG_ROWS})
        if not same and dropped and not keeps_state:
            # where this run keeps per-rank state of its own, the backend warns that it finds
            # none in the checkpoint (Backend.restore_exchange); here it keeps none
            logging.getLogger("harness").warning(
                f"checkpoint {ckpt.path} holds each rank's {', '.join(dropped)} state of "
                f"compression = {saved.get('compression')!r} (local_sgd_period = "
                f"{saved.get('local_sgd_period')}), which this run's settings do not use: it "
                "is dropped (for error feedback: the gradient not sent yet), so this resume is "
                "not exact")
        # the compression state of other settings starts afresh (warned); the random
        # generators' states are restored whatever the compression
        opt_meta = ckpt.meta.get("optimizer", {})
        velocity = c.framework == "tensorflow" and c.keras == "keras3" and \
            c.optimizer == "sgd" and "momentum_buffer" not in opt_meta
        # each rank's optimizer rows (local SGD) of a checkpoint from before TensorFlow's
        # TorchSGD hold Keras' velocity, which only rank 0's state above is converted from:
        # the ranks start from that one (warned by the backend)
        backend.set_exchange_state({k: v for k, v in presum_exchange(ckpt).items()
                                    if k == RNG_ROWS or same and not
                                    (velocity and k.startswith("opt/"))})
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit this run's model or "
                              f"optimizer ({type(e).__name__}: {e}): resume with the settings "
                              "it was written with, or start in a fresh run_name/out_dir") from None


def run(cfg: RunConfig, task: Task | None = None) -> int:
    """Train ``task`` (a user's; None: ``cfg.task`` or the built-in ``cfg.model``) on this
    rank; the exit code (0, or EXIT_PREEMPTED after a checkpointed stop)."""
    launcher_world = detect_world()
    try:                        # a bad drill: one line (rank 0's), nothing written
        faults.parse(os.environ.get("HARNESS_FAULT"))
    except ConfigError as e:
        raise ConfigError(str(e), quiet=launcher_world.rank != 0) from None
    log = get_logger(launcher_world.rank)
    own = task is not None or cfg.task is not None
    if cfg.elastic and os.environ.get("HOROVOD_ELASTIC") != "1":
        raise ConfigError("elastic = true needs horovodrun's elastic mode: launch with "
                          "`harness launch --launcher horovodrun --elastic -np N -- ...` (on "
                          "SLURM: slurm/elastic.sbatch), or set elastic = false")
    if launcher_world.rank == 0:
        for name in unused_compression_settings(cfg):
            log.warning(f"{name} = {getattr(cfg, name)!r} is not read by compression = "
                        f"{cfg.compression!r} ({READ_BY[name]} read it): it has no effect")
    task, data = load_task_data(cfg, task)      # the user's code runs on every rank
    if cfg.mode == "async":
        from harness.ps.driver import run as run_ps

        return run_ps(cfg, launcher_world, log, task, data, own)
    backend = create(cfg, launcher_world)
    rt = backend.init_distributed()
    if launcher_world.size > 1 or rt.size > 1:
        check_runtime_world(launcher_world, rt.rank, rt.size, backend.gradient_path)
    world = rt
    log = get_logger(world.rank)
    stop = StopFlag().install()
    try:
        return _run(cfg, backend, world, log, stop, task, data, own)
    finally:
        stop.uninstall()


def _run(cfg: RunConfig, backend: Backend, world: World, log, stop: StopFlag, task: Task,
         data: Dataset, own: bool) -> int:
    # Everything that can be wrong with the input is checked before anything is written.
    plan = Plan.of(cfg, world.size, len(data.train))         # fails the same way on every rank
    if cfg.straggler_rank is not None and cfg.straggler_rank >= world.size and world.rank == 0:
        # a warning, not a refusal: a comparison's 1-rank baseline of a straggler experiment
        # runs with the same flags
        log.warning(f"straggler_rank = {cfg.straggler_rank} is not a rank of this "
                    f"{world.size}-rank job: nothing is slowed")
    run_dir = run_dir_of(cfg, world.size, own_task_name(cfg, task, own))
    identity = checkpoint_identity(cfg, task, data)
    # the model, loss and metrics are checked on one real batch of this run's size
    backend.setup(task, *data.train.batch(slice(0, step_batch(cfg, world.size))), cfg.lr)
    model = model_record(task, backend.layout, backend.canonical_weights())
    ckpt, error, pos, done = None, None, Position(), False
    if world.rank == 0:
        try:
            ckpt = find_resume_checkpoint(cfg, run_dir / "checkpoints", log)
            if ckpt is not None:
                ckpt_io.check_compatible(ckpt, identity)
                check_layout(ckpt, model["layout"], cfg.framework)
                elastic_start = (ckpt.meta.get("elastic") or {}).get("start_ranks")
                if cfg.elastic and elastic_start:
                    # an elastic run's plan is its first start's, whatever the size now
                    plan = Plan.of(cfg, int(elastic_start), len(data.train))
                check_resume_fits(ckpt, cfg, world, plan, log)
                load_into_backend(backend, ckpt)
                pos = Position.from_meta(ckpt.meta["position"])
                done = finished(run_dir, pos.step, plan.total_steps)
            if not done:
                ckpt_io.check_writable(run_dir / "checkpoints")     # the first write of the run
        except HarnessError as e:
            error = e
    if cfg.elastic:
        # No collective outside the elastic run: a rank that joins a running job starts here
        # while the others wait in its first sync, which carries rank 0's findings instead.
        if world.rank == 0 and (error is not None or done):
            refuse_elastic_start(backend, error)
            log_finished(log, run_dir, f"{pos.step} steps")
            return 0
    else:
        # rank 0 looked for the checkpoint; every rank learns what it found
        looked = world.rank == 0
        agreed, done = agree_on_start(backend.allreduce_host, error, done or not looked,
                                      pos.as_vector() * looked)
        if done:
            log_finished(log, run_dir, f"{pos.step} steps")
            backend.shutdown()
            return 0
        if world.rank != 0:
            pos = Position.from_vector(agreed)
    resumed = pos.step > 0 or ckpt is not None
    if ckpt is not None:
        log.info(f"resuming from {ckpt.path} at step {pos.step} (epoch {pos.epoch + 1})")

    metrics = MetricsWriter(None)
    if world.rank == 0:
        metrics = MetricsWriter(run_dir / "metrics.jsonl",
                                tensorboard=open_writer(run_dir, cfg, log))
    info = backend.info()
    if world.rank == 0:
        start_record(run_dir, metrics, cfg, model, data,
                     world={"size": world.size, "launcher": world.source},
                     backend={"framework": info.framework, "gradient_path": info.gradient_path,
                              "versions": info.versions, "settings": info.settings},
                     resumed_from=str(ckpt.path) if ckpt is not None else None,
                     start_step=pos.step)
    ctx = RunContext(cfg, world, backend, data, run_dir, log, metrics, stop,
                     ckpt_meta={**identity, "config": cfg.to_dict(), "world_size": world.size,
                                "gradient_scale": GRADIENT_SCALE,
                                "layout": model["layout"]},
                     # every rank: checkpoints are collectives (compression state)
                     last_saved_step=pos.step if resumed else None,
                     resume_extra=ckpt.extra if ckpt is not None else {})
    if ckpt is not None and "elastic" in ckpt.meta:
        ctx.ckpt_meta["elastic"] = ckpt.meta["elastic"]
    try:
        summary = train_elastic(ctx, pos) if cfg.elastic else train(ctx, pos, resumed)
    except Preempted as p:
        ctx.metrics.write("preempted", step=p.step)
        ctx.metrics.close()
        return EXIT_PREEMPTED
    except RunFinished:
        log_finished(log, run_dir, "rank 0 found its final checkpoint")
        return 0
    world, metrics = ctx.world, ctx.metrics        # an elastic run's may have changed
    log = get_logger(world.rank)
    if world.rank == 0:
        finish_record(run_dir, metrics, summary, ctx.backend.task.tokens_per_sample)
    if not summary["ranks_consistent"]:
        raise TrainingAborted(
            f"ranks ended with different weights (checksum spread {summary['weights_spread']:g}):"
            " the gradient exchange did not keep them in sync, so these results are not those "
            f"of data-parallel training (summary in {run_dir / 'summary.json'})")
    if world.rank == 0:
        rate = summary["samples_per_s_total"]
        speed = f"{rate:,.0f} samples/s total" if rate else \
            "samples/s not measured (no steps timed after the warm-up steps)"
        log.info(f"done: {summary['steps']} steps, {final_metrics(summary)}, {speed}; "
                 f"results in {run_dir}")
    backend.shutdown()
    return 0

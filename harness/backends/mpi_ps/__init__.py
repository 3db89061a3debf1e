"""Asynchronous parameter-server mode on mpi4py (``mode = "async"``).

Ranks ``0..S-1`` are servers, each owning an even shard of the flat parameter vector
(canonical layout, so PyTorch and TensorFlow workers train the same vector) and running SGD
with momentum on it; the other ranks are workers computing gradients with the framework's
``local`` backend. Launch with ``mpirun -np S+W`` or ``srun --mpi=pmix``; see
``slurm/ps.sbatch``.

A stop signal to any rank preempts the whole job (``protocol`` has the messages): every server
checkpoints the same pushes with each worker's clock, every rank waits for those writes and
exits :data:`~harness.preemption.EXIT_PREEMPTED`. A resumed run continues each worker from its
own clock, so it ends with exactly the planned updates and samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from harness import checkpoint as ckpt_io
from harness.backends.common import FlatLayout, apply_mpi_environment
from harness.config import RunConfig
from harness.data import Dataset, Sharder
from harness.env import World, check_runtime_world
from harness.errors import CheckpointError, ConfigError, HarnessError
from harness.logging import get_logger
from harness.metrics import MetricsWriter
from harness.preemption import EXIT_PREEMPTED, StopFlag, Watchdog


@dataclass
class PSContext:
    cfg: RunConfig
    data: Dataset
    stop: StopFlag
    ckpt_meta: dict[str, Any]
    on_eval: Callable[[float, float, int], None] = lambda acc, wall, version: None
    target: dict[str, Any] = field(default_factory=dict)


def run(cfg: RunConfig, launcher_world: World, log) -> int:
    from harness.backends.mpi_comm import mpi
    from harness.driver import checkpoint_identity, load_data, run_dir_of, write_json_atomic

    apply_mpi_environment(cfg)                       # before MPI_Init
    MPI = mpi()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if launcher_world.size > 1 or size > 1:
        check_runtime_world(launcher_world, rank, size, "mpi4py")
    log = get_logger(rank)
    S = cfg.ps_servers
    W = size - S
    if W < 1:
        raise ConfigError(f"ps_servers = {S} leaves no worker in a job of {size} rank(s): launch "
                          f"at least {S + 1} ranks (e.g. mpirun -np {S + 2}) or lower ps_servers")
    if cfg.straggler_rank is not None and not S <= cfg.straggler_rank < size:
        raise ConfigError(f"straggler_rank = {cfg.straggler_rank} is not a worker rank: workers "
                          f"are ranks {S}..{size - 1}")
    data, spec = load_data(cfg)
    layout = FlatLayout.of(spec)
    run_dir = run_dir_of(cfg, size)
    ckpt_dir = run_dir / "checkpoints"
    per_rank = cfg.per_rank_batch(W) * cfg.backward_passes_per_step
    shards = [(k, *layout.shard(k, S)) for k in range(S)]
    stop = StopFlag().install()
    identity = checkpoint_identity(cfg, data)
    ctx = PSContext(cfg, data, stop, {**identity, "mode": "async", "ps_servers": S,
                                      "config": cfg.to_dict(), "world_size": size})
    watchdog = Watchdog(rank, cfg.stall_timeout_s, log).start()
    try:
        if rank < S:
            return _serve(ctx, comm, MPI, rank, shards, layout, spec, W, per_rank, run_dir,
                          ckpt_dir, watchdog, log, write_json_atomic)
        return _work(ctx, comm, MPI, rank, size, shards, layout, spec, W, per_rank, watchdog,
                     log, launcher_world)
    finally:
        watchdog.stop()
        stop.uninstall()


def _schedule(cfg: RunConfig, n_train: int, per_rank: int, workers: int):
    from harness.driver import LRSchedule

    sharder_steps = n_train // (per_rank * workers)
    if sharder_steps == 0:
        Sharder(n_train, per_rank, 0, workers, cfg.seed, cfg.shuffle)   # raises the clear error
    total = min(cfg.epochs * sharder_steps, cfg.max_steps or math.inf)
    # Linear scaling follows the samples per update: bsp averages all workers' batches into one
    # update (like sync allreduce); async/ssp apply each worker's batch as its own update.
    per_update = workers if cfg.ps_consistency == "bsp" else 1
    return LRSchedule.of(cfg, per_update, sharder_steps), int(total), sharder_steps


def _resume_state(cfg: RunConfig, ckpt_dir: Path, k: int, identity: dict, world_size: int,
                  log) -> dict | None:
    prefix = f"ps-server{k}"
    if cfg.resume == "never":
        if ckpt_io.latest_paths(ckpt_dir, prefix):
            raise ConfigError(f"{ckpt_dir} already has parameter-server checkpoints and resume "
                              "= 'never': choose another run_name/out_dir or resume = 'auto'")
        return None
    if cfg.resume == "auto":
        ckpt = ckpt_io.load_latest(ckpt_dir, prefix, warn=log.warning)
    else:
        ckpt = ckpt_io.load(Path(cfg.resume.replace("ps-server0", prefix)))
    if ckpt is None:
        return None
    ckpt_io.check_compatible(ckpt, identity)
    saved = (ckpt.meta.get("ps_servers", cfg.ps_servers), ckpt.meta.get("world_size", world_size))
    if saved != (cfg.ps_servers, world_size):
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written by {saved[0]} server(s) and "
            f"{saved[1] - saved[0]} worker(s), this run has {cfg.ps_servers} and "
            f"{world_size - cfg.ps_servers}: each server's shard and each worker's position are "
            "saved, so resume with the same ps_servers and number of ranks, or start in a fresh "
            "run_name/out_dir")
    pos = ckpt.meta["position"]
    return {"params": ckpt.weights["params"], "momentum": ckpt.optimizer["momentum"],
            "version": pos["step"], "clock": pos["clock"],
            # each worker's own clock (checkpoints before per-worker clocks had the minimum)
            "clocks": pos.get("clocks", {}), "samples": pos.get("samples", 0),
            "opt_steps": pos["opt_steps"], "finished": bool(pos.get("finished")),
            "stats": pos.get("stats", {}), "latencies": ckpt.extra.get("latencies", ()),
            "step_times": ckpt.extra.get("step_times", ()), "path": str(ckpt.path)}


def _finished(resume: dict | None, total: int, run_dir: Path) -> bool:
    """The run already ended (every worker that did not fail reached the plan, and its summary
    was written): running the same command again leaves it as it is."""
    if resume is None or not resume["finished"] or not (run_dir / "summary.json").exists():
        return False
    failed = resume["stats"].get("failed_workers", {})
    return all(c >= total for r, c in resume["clocks"].items() if r not in failed)


def _agree(comm, MPI, error: HarnessError | None = None, finished: bool = True) -> bool:
    """Every rank (servers and workers) learns whether a server could not start, and whether
    the run had already finished on every server. Workers contribute neutral values."""
    flags = np.array([1.0 if error else 0.0, 0.0 if finished else 1.0])
    comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
    if flags[0] > 0:
        if error:
            raise error
        raise ConfigError("a parameter server could not start (its error is reported above)")
    return flags[1] == 0


def _wait_for_everyone(comm, watchdog) -> None:
    """A preempted job ends only when every server's checkpoint is written: with Open MPI,
    the first rank to exit non-zero makes mpirun stop the others, which could cut a write."""
    watchdog.describe = None
    watchdog.tick(phase="waiting for every rank to finish its checkpoint (preempted)")
    comm.Barrier()
    watchdog.tick(phase="exiting (preempted)")


def _serve(ctx, comm, MPI, rank, shards, layout, spec, W, per_rank, run_dir, ckpt_dir, watchdog,
           log, write_json_atomic) -> int:
    from harness.backends.mpi_ps.server import Server
    from harness.driver import log_finished
    from harness.runinfo import environment

    cfg = ctx.cfg
    _, start, stop = shards[rank]
    schedule, total, spe = _schedule(cfg, len(ctx.data.x_train), per_rank, W)
    error: HarnessError | None = None
    resume = None
    try:
        resume = _resume_state(cfg, ckpt_dir, rank, {k: ctx.ckpt_meta[k] for k in
                                                      ("framework", "model", "dataset")},
                               comm.Get_size(), log)
        if rank == 0:
            ckpt_io.check_writable(ckpt_dir)
    except HarnessError as e:
        error = e
    # every server must agree before workers are answered
    if _agree(comm, MPI, error, _finished(resume, total, run_dir)):
        if rank == 0 and resume is not None:
            log_finished(log, run_dir, f"{resume['version']} updates, {total} steps per worker")
        return 0
    shard = layout.flatten(spec.init_weights(cfg.seed))[start:stop].copy()
    metrics = None
    if rank == 0:
        metrics = MetricsWriter(run_dir / "metrics.jsonl")
        record = {"config": cfg.to_dict(), "environment": environment(),
                  "world": {"size": comm.Get_size(), "servers": cfg.ps_servers, "workers": W,
                            "launcher": "mpi4py"},
                  "backend": {"framework": cfg.framework, "gradient_path": "parameter-server",
                              "versions": _versions(), "settings": {
                                  "consistency": cfg.ps_consistency,
                                  "staleness_bound": cfg.ps_staleness,
                                  "staleness_lr": cfg.ps_staleness_lr}},
                  "model": {"name": spec.name, "parameters": spec.num_parameters,
                            "flops_per_sample": spec.flops_per_sample},
                  "data": ctx.data.fingerprint(),
                  "resumed_from": resume["path"] if resume else None,
                  "start_step": resume["clock"] if resume else 0,
                  "start_version": resume["version"] if resume else 0}
        write_json_atomic(run_dir / "config.json", record)
        metrics.write("run", **record)
        log.info(f"parameter server: {cfg.ps_servers} server(s), {W} worker(s), "
                 f"{cfg.ps_consistency} consistency, {total} steps per worker, "
                 f"{layout.total:,} parameters")
        if resume:
            log.info(f"resuming from {resume['path']} at version {resume['version']}; worker "
                     f"clocks {resume['clocks'] or resume['clock']} of {total}")
    target: dict[str, Any] = {"time": None, "steps": None, "best": None}

    def on_eval(acc: float, wall: float, version: int) -> None:
        target["best"] = acc if target["best"] is None else max(target["best"], acc)
        if cfg.target_accuracy is not None and target["time"] is None and \
                acc >= cfg.target_accuracy:
            target["time"], target["steps"] = wall, version

    ctx.on_eval = on_eval
    ckpt_every = cfg.checkpoint_every or spe * W
    server = Server(comm, MPI, ctx, shard, rank, start, stop, list(range(cfg.ps_servers,
                    comm.Get_size())), schedule, metrics, ckpt_dir, ckpt_every, watchdog, log,
                    resume)
    report = server.serve()
    if server.preempted:
        server.end_preempted()
        if metrics:
            clocks = server.clocks()
            log.warning(f"preempted: every server checkpointed the same pushes (version "
                        f"{server.version}, worker clocks {clocks} of {total}); resume = "
                        f"'auto' continues each worker from its clock; exit {EXIT_PREEMPTED}")
            metrics.write("preempted", step=server.version, clocks=clocks)
            metrics.close()
        _wait_for_everyone(comm, watchdog)
        return EXIT_PREEMPTED
    if ctx.stop.requested and rank == 0:
        log.info("a stop request came after every worker had finished: the run is complete")
    final = server.finish()
    if rank != 0:
        server.release_left_workers()
        return 0
    try:
        return _write_summary(cfg, comm, run_dir, metrics, report, final, total, spe, W, per_rank,
                              target, log, write_json_atomic)
    finally:
        server.release_left_workers()


def _write_summary(cfg, comm, run_dir, metrics, report, final, total, spe, W, per_rank, target,
                   log, write_json_atomic) -> int:
    summary = dict(report)
    summary.update(
        steps=total, epochs=math.ceil(total / spe), world_size=comm.Get_size(), workers=W,
        global_batch=per_rank * W, train_wall_s=report["ps_wall_s"],
        samples_per_s_wall=report["samples"] / report["ps_wall_s"],
        samples_per_s_per_device=(report["samples_per_s_total"] / W
                                  if report["samples_per_s_total"] else None),
        final_eval_loss=final["eval_loss"] if final else None,
        final_eval_acc=final["eval_acc"] if final else None,
        best_eval_acc=target["best"], target_accuracy=cfg.target_accuracy,
        time_to_target_s=target["time"], steps_to_target=target["steps"])
    metrics.write("summary", **summary)
    metrics.close()
    write_json_atomic(run_dir / "summary.json", summary)
    failed = report["failed_workers"]
    acc = f"{summary['final_eval_acc']:.4f}" if final else "n/a (no worker finished)"
    log.info(f"done: {report['updates']} updates, test accuracy {acc}, "
             f"{report['samples_per_s_total'] or 0:,.0f} samples/s, staleness mean "
             f"{report['staleness_mean'] or 0:.2f} max {report['staleness_max']}; "
             f"results in {run_dir}" + (f"; failed workers: {failed}" if failed else ""))
    return 0


def _work(ctx, comm, MPI, rank, size, shards, layout, spec, W, per_rank, watchdog, log,
          launcher_world) -> int:
    from harness.backends.base import create
    from harness.backends.mpi_ps.worker import Worker

    cfg = ctx.cfg
    index = rank - cfg.ps_servers
    _, total, spe = _schedule(cfg, len(ctx.data.x_train), per_rank, W)
    # the servers must have agreed on resuming before they answer; mirror their Allreduce
    if _agree(comm, MPI):
        return 0                          # the run had finished: nothing to do
    world = World(rank, size, launcher_world.local_rank, launcher_world.local_size,
                  launcher_world.source)
    backend = create(cfg, world, "local")
    backend.setup(spec, spec.init_weights(cfg.seed), cfg.lr)
    sharder = Sharder(len(ctx.data.x_train), per_rank, index, W, cfg.seed, cfg.shuffle)
    worker = Worker(comm, MPI, ctx, backend, layout, shards, sharder, total, index, log, watchdog)
    t0 = time.perf_counter()
    outcome = worker.run()
    if outcome == "done" and index == 0:
        log.info(f"worker {rank}: {worker.clock} steps in {time.perf_counter() - t0:.1f}s")
    if outcome in ("stopped", "preempted"):
        _wait_for_everyone(comm, watchdog)
        return EXIT_PREEMPTED
    # A failed worker reported itself (ps_on_worker_failure = 'continue': the job went on and
    # its summary lists the failed workers), so it ends like the others.
    return 0


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("mpi4py", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out

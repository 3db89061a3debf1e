"""Asynchronous parameter-server mode on mpi4py (``mode = "async"``).

Ranks ``0..S-1`` are servers, each owning an even shard of the flat parameter vector (the
task model's trainable parameters in order: worker 0 builds the model and sends their initial
values, so the servers work for any model without building one) and running SGD
with momentum on it; the other ranks are workers computing gradients with the framework's
``local`` backend. Launch with ``mpirun -np S+W`` or ``srun --mpi=pmix``; see
``slurm/ps.sbatch``.

A stop signal to any rank preempts the whole job (``protocol`` has the messages): every server
checkpoints the same pushes with each worker's clock, every rank waits for those writes and
exits :data:`~harness.preemption.EXIT_PREEMPTED`. A resumed run continues each worker from its
own clock, so it ends with exactly the planned updates and samples.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from harness import checkpoint as ckpt_io
from harness.backends.common import apply_mpi_environment
from harness.config import RunConfig
from harness.backends.base import Backend
from harness.data import Dataset, Sharder
from harness.driver import (Target, agree_on_start, check_layout, check_same_settings,
                            check_worker_batch,
                            checkpoint_identity, find_resume_checkpoint, final_metrics,
                            finish_record, log_finished,
                            model_record, own_task_name, run_dir_of, start_record, track_target)
from harness.env import World, check_runtime_world
from harness.errors import CheckpointError, ConfigError, HarnessError, TrainingAborted
from harness.logging import get_logger
from harness.metrics import MetricsWriter
from harness.tb import open_writer
from harness.preemption import EXIT_PREEMPTED, StopFlag, Watchdog
from harness.ps.join import Relay, ompi_server_uri, write_job
from harness.ps.plan import PSContext, PSPlan, check_ps_world
from harness.task import Task


def run(cfg: RunConfig, launcher_world: World, log, task: Task, data: Dataset,
        own: bool) -> int:
    from harness.backends.mpi_comm import mpi

    apply_mpi_environment(cfg)                       # before MPI_Init
    MPI = mpi()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if launcher_world.size > 1 or size > 1:
        check_runtime_world(launcher_world, rank, size, "mpi4py")
    log = get_logger(rank)
    S = cfg.ps_servers
    check_ps_world(cfg, size)
    if cfg.straggler_rank is not None and not S <= cfg.straggler_rank < size:
        raise ConfigError(f"straggler_rank = {cfg.straggler_rank} is not a worker rank: workers "
                          f"are ranks {S}..{size - 1}")
    run_dir = run_dir_of(cfg, size, own_task_name(cfg, task, own))
    PSPlan.of(cfg, data, 1, size, run_dir)           # the schedule fits: fails on every rank
    if cfg.ps_join and not os.environ.get("OMPI_MCA_pmix_server_uri"):
        raise ConfigError("ps_join = true needs an ompi-server that the job and its joiners "
                          "share: launch with `harness launch --launcher mpirun ...` (it starts "
                          "one), or mpirun --ompi-server file:URI_FILE")
    stop = StopFlag().install()
    identity = checkpoint_identity(cfg, task, data)
    ctx = PSContext(cfg, data, stop, {**identity, "mode": "async", "ps_servers": S,
                                      "config": cfg.to_dict(), "world_size": size},
                    metric="acc" if "acc" in task.metrics else next(iter(task.metrics), None),
                    tokens_per_sample=task.tokens_per_sample)
    watchdog = Watchdog(rank, cfg.stall_timeout_s, log).start()
    try:
        if rank < S:
            return _serve(ctx, task, run_dir, comm, MPI, rank, watchdog, log, own)
        return _work(ctx, task, run_dir, comm, MPI, rank, watchdog, log, launcher_world)
    finally:
        watchdog.stop()
        stop.uninstall()


def _share_model(comm, backend: Backend | None, error: BaseException | None,
                 S: int) -> tuple[np.ndarray, dict]:
    """Worker rank ``S`` built the task's model: every rank gets its initial trainable
    parameters as one flat vector, and its model record (servers never build a model, so any
    model works; buffers such as batch-norm statistics stay each worker's own). A worker that
    could not build it tells every rank, and all stop."""
    head = None
    built = backend if error is None else None
    if comm.Get_rank() == S:
        head = {"params": built.layout.total,
                "model": model_record(built.task, built.layout,
                                      built.canonical_weights())} if built is not None else \
            {"error": f"{type(error).__name__}: {error}"}
    head = comm.bcast(head, root=S)
    if "error" in head:
        if error is not None:
            raise error
        raise TrainingAborted(f"worker rank {S} could not build the task's model ({head['error']}"
                              "; its traceback is above)")
    flat = built.get_flat_params() if comm.Get_rank() == S and built is not None else \
        np.empty(head["params"], np.float32)
    comm.Bcast(flat, root=S)
    return flat, head["model"]


def _resume_state(cfg: RunConfig, ckpt_dir: Path, k: int, identity: dict, world_size: int,
                  log) -> dict | None:
    """Server ``k``'s shard, momentum and clocks to resume from (None: a fresh start). Each
    server has its own checkpoints, ``ps-server<k>-<step>.npz``; ``resume = PATH`` names
    server 0's, and server k takes its own of the same step next to it."""
    prefix = f"ps-server{k}"
    given = None
    if cfg.resume not in ("never", "auto"):
        path = Path(cfg.resume)
        given = path.with_name(path.name.replace("ps-server0", prefix, 1))
    ckpt = find_resume_checkpoint(cfg, ckpt_dir, log, prefix, given)
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
    check_same_settings(ckpt, cfg, ("ps_consistency", "seed", "shuffle", "momentum",
                                    "weight_decay"))
    check_worker_batch(ckpt, cfg, world_size - cfg.ps_servers)
    pos = ckpt.meta["position"]
    return {"params": ckpt.weights["params"], "momentum": ckpt.optimizer["momentum"],
            "version": pos["step"], "clock": pos["clock"],
            # each worker's own clock (checkpoints before per-worker clocks had the minimum)
            "clocks": pos.get("clocks", {}), "samples": pos.get("samples", 0),
            "opt_steps": pos["opt_steps"], "finished": bool(pos.get("finished")),
            "stats": pos.get("stats", {}), "latencies": ckpt.extra.get("latencies", ()),
            "step_times": ckpt.extra.get("step_times", ()), "path": str(ckpt.path),
            "ckpt": ckpt}


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
    def reduce_sum(v: np.ndarray) -> np.ndarray:
        comm.Allreduce(MPI.IN_PLACE, v, op=MPI.SUM)
        return v

    return agree_on_start(reduce_sum, error, finished, who="a parameter server")[1]


def _wait_for_everyone(comm, watchdog) -> None:
    """A preempted job ends only when every server's checkpoint is written: with Open MPI,
    the first rank to exit non-zero makes mpirun stop the others, which could cut a write."""
    watchdog.describe = None
    watchdog.tick(phase="waiting for every rank to finish its checkpoint (preempted)")
    comm.Barrier()
    watchdog.tick(phase="exiting (preempted)")


def _serve(ctx: PSContext, task: Task, run_dir: Path, comm, MPI, rank: int, watchdog,
           log, own: bool = False) -> int:
    from harness.ps.server import Server

    cfg, ckpt_dir = ctx.cfg, run_dir / "checkpoints"
    size = comm.Get_size()
    total = PSPlan.of(cfg, ctx.data, 1, size, run_dir).total_steps
    W = size - cfg.ps_servers
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
    watchdog.tick(phase="waiting for worker 0's model")
    flat, model = _share_model(comm, None, None, cfg.ps_servers)
    ctx.ckpt_meta["layout"] = model["layout"]
    if resume is not None:       # every server holds a checkpoint of the same run: all agree
        check_layout(resume["ckpt"], model["layout"], cfg.framework)
    plan = PSPlan.of(cfg, ctx.data, flat.size, size, run_dir)
    _, start, stop = plan.shards[rank]
    shard = flat[start:stop].copy()
    metrics = None
    if rank == 0:
        metrics = MetricsWriter(run_dir / "metrics.jsonl",
                                tensorboard=open_writer(run_dir, cfg, log))
        start_record(run_dir, metrics, cfg, model, ctx.data,
                     world={"size": comm.Get_size(), "servers": cfg.ps_servers, "workers": W,
                            "launcher": "mpi4py"},
                     backend={"framework": cfg.framework, "gradient_path": "parameter-server",
                              "versions": _versions(), "settings": {
                                  "consistency": cfg.ps_consistency,
                                  "staleness_bound": cfg.ps_staleness,
                                  "staleness_lr": cfg.ps_staleness_lr}},
                     resumed_from=resume["path"] if resume else None,
                     start_step=resume["clock"] if resume else 0,
                     start_version=resume["version"] if resume else 0)
        log.info(f"parameter server: {cfg.ps_servers} server(s), {W} worker(s), "
                 f"{cfg.ps_consistency} consistency, {total} steps per worker, "
                 f"{plan.params:,} parameters")
        if resume:
            log.info(f"resuming from {resume['path']} at version {resume['version']}; worker "
                     f"clocks {resume['clocks'] or resume['clock']} of {total}")
        if cfg.ps_join:
            write_job(run_dir, cfg.to_dict(), size, cfg.ps_servers, plan.params,
                      own_task_name(cfg, task, own), own and cfg.task is None,
                      ompi_server_uri() or "")
            log.info(f"workers may join: `harness join {run_dir}` takes the place of a worker "
                     "that failed")
    target = Target()

    def on_eval(value: float, wall: float, version: int) -> None:
        if ctx.metric == "acc":
            track_target(cfg, target, value, wall, version)

    ctx.on_eval = on_eval
    server = Server(comm, MPI, ctx, plan, rank, shard, metrics, watchdog, log, resume)
    code = _serve_to_end(server, ctx, task, comm, watchdog, log, plan, metrics, target, total,
                         rank)
    watchdog.tick(phase="disconnecting the workers that joined")
    server.close_links()        # not after an error: the launcher stops everyone then
    return code


def _serve_to_end(server, ctx: PSContext, task: Task, comm, watchdog, log, plan: PSPlan,
                  metrics, target: Target, total: int, rank: int) -> int:
    cfg = ctx.cfg
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
        return _write_summary(cfg, plan, metrics, report, final, target, log, ctx.metric,
                              task.loss_name, task.tokens_per_sample)
    finally:
        server.release_left_workers()


def _write_summary(cfg: RunConfig, plan: PSPlan, metrics, report: dict, final: dict | None,
                   target: Target, log, m: str | None, loss_name: str,
                   tokens_per_sample: int = 0) -> int:
    total, spe, W, run_dir = plan.total_steps, plan.steps_per_epoch, plan.workers, plan.run_dir
    summary = dict(report)
    summary.update(
        steps=total, epochs=-(-total // spe), world_size=plan.world_size, workers=W,
        global_batch=plan.per_rank * W, train_wall_s=report["ps_wall_s"],
        samples_per_s_wall=report["samples"] / report["ps_wall_s"],
        samples_per_s_per_device=(report["samples_per_s_total"] / W
                                  if report["samples_per_s_total"] else None),
        final_eval_loss=final["eval_loss"] if final else None,
        **({f"final_eval_{m}": final.get(f"eval_{m}") if final else None} if m else {}),
        loss_name=loss_name, metrics=[m] if m else [],
        best_eval_acc=target.best_eval_acc, target_accuracy=cfg.target_accuracy,
        time_to_target_s=target.time_to_target_s, steps_to_target=target.steps_to_target,
        **push_bytes(cfg, plan))
    finish_record(run_dir, metrics, summary, tokens_per_sample)
    failed = report["failed_workers"]
    result = final_metrics(summary) if final else "no test results (no worker finished)"
    log.info(f"done: {report['updates']} updates, {result}, "
             f"{report['samples_per_s_total'] or 0:,.0f} samples/s, staleness mean "
             f"{report['staleness_mean'] or 0:.2f} max {report['staleness_max']}; "
             f"results in {run_dir}" + (f"; failed workers: {failed}" if failed else ""))
    return 0


def push_bytes(cfg: RunConfig, plan: PSPlan) -> dict:
    """What one worker's push sends (its gradient shards, or their compressed pushes), and
    the full gradient's float32 bytes."""
    from harness.ps.worker import push_codecs

    dense = 4 * plan.params
    codecs = push_codecs(cfg, plan.shards)
    return {"compression": cfg.compression, "dense_bytes_per_step": dense,
            "sent_bytes_per_step": dense if codecs is None else sum(c.nbytes for c in codecs)}


def _work(ctx: PSContext, task: Task, run_dir: Path, comm, MPI, rank: int, watchdog, log,
          launcher_world: World) -> int:
    from harness.backends.base import create
    from harness.ps.worker import Worker

    cfg = ctx.cfg
    index = rank - cfg.ps_servers
    # the servers must have agreed on resuming before they answer; mirror their Allreduce
    if _agree(comm, MPI):
        return 0                          # the run had finished: nothing to do
    world = World(rank, comm.Get_size(), launcher_world.local_rank, launcher_world.local_size,
                  launcher_world.source)
    backend, error = create(cfg, world, "local"), None
    try:
        per_rank = PSPlan.of(cfg, ctx.data, 1, comm.Get_size(), run_dir).per_rank
        backend.setup(task, *ctx.data.train.batch(slice(0, per_rank)), cfg.lr)
    except Exception as e:   # noqa: BLE001 - every rank learns of it before this one raises
        error = e
    flat, _ = _share_model(comm, backend, error, cfg.ps_servers)
    if error is not None:
        raise error
    backend.set_flat_params(flat)        # worker 0's initial weights, on every worker
    plan = PSPlan.of(cfg, ctx.data, flat.size, comm.Get_size(), run_dir)
    sharder = Sharder(len(ctx.data.train), plan.per_rank, index, plan.workers, cfg.seed,
                      cfg.shuffle)
    worker = Worker(comm, MPI, ctx, plan, backend, sharder, index, log, watchdog,
                    relay=Relay(run_dir) if cfg.ps_join else None)
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

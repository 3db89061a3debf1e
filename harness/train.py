"""One rank's training run: world, backend, data, resume, loop, results.

``run(cfg)`` is what ``harness train`` calls in every rank, whichever launcher started it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from harness import checkpoint as ckpt_io
from harness.backends.base import Backend, create, resolve_gradient_path
from harness.config import RunConfig
from harness.data import Dataset, Sharder, check_model_input, load_dataset
from harness.env import World, check_runtime_world, detect_world
from harness.errors import CheckpointError, ConfigError, HarnessError
from harness.files import atomic_write
from harness.logging import get_logger
from harness.loop import Position, Preempted, RunContext, step_batch, train
from harness.metrics import MetricsWriter
from harness.preemption import EXIT_PREEMPTED, StopFlag
from harness.runinfo import environment
from models import default_classes, default_input_shape, get_spec


def write_json_atomic(path: Path, data: Any) -> None:
    blob = (json.dumps(data, indent=2, default=str) + "\n").encode()
    atomic_write(path, lambda f: f.write(blob))


def load_data(cfg: RunConfig) -> tuple[Dataset, Any]:
    data = load_dataset(cfg.dataset, default_input_shape(cfg.model), default_classes(cfg.model),
                        cfg.data_path, cfg.synthetic_samples, cfg.seed)
    check_model_input(cfg.model, data.input_shape)
    try:
        spec = get_spec(cfg.model, data.input_shape, data.num_classes)
    except ValueError as e:
        raise ConfigError(f"model {cfg.model!r} does not fit dataset {data.name!r}: {e}") from None
    return data, spec


def run_dir_of(cfg: RunConfig, world_size: int) -> Path:
    return Path(cfg.out_dir) / (cfg.run_name or cfg.default_run_name(world_size))


def find_resume_checkpoint(cfg: RunConfig, run_dir: Path, log) -> ckpt_io.Checkpoint | None:
    """Rank 0's view of what to resume from, per ``cfg.resume``."""
    ckpt_dir = run_dir / "checkpoints"
    if cfg.resume == "never":
        existing = ckpt_io.latest_paths(ckpt_dir)
        if existing:
            raise ConfigError(f"{run_dir} already has checkpoints ({existing[0].name}) and "
                              "resume = 'never': choose another run_name/out_dir, or set "
                              "resume = 'auto' to continue that run")
        return None
    if cfg.resume == "auto":
        return ckpt_io.load_latest(ckpt_dir, warn=log.warning)
    return ckpt_io.load(Path(cfg.resume))


def checkpoint_identity(cfg: RunConfig, data: Dataset) -> dict[str, Any]:
    return {"framework": cfg.framework, "model": cfg.model, "dataset": data.fingerprint()}


def _agree_on_resume(backend: Backend, world: World, error: HarnessError | None,
                     pos: Position) -> Position:
    """Rank 0 found (or failed to find) a checkpoint; every rank learns the outcome."""
    vec = np.zeros(6)
    if world.rank == 0:
        vec[0] = 1.0 if error else 0.0
        vec[1:] = pos.as_vector()
    vec = backend.allreduce_host(vec)
    if vec[0] > 0:
        if error is not None:
            raise error
        raise CheckpointError("rank 0 could not resume (its error is reported above)")
    return Position.from_vector(vec[1:])


def run(cfg: RunConfig) -> int:
    launcher_world = detect_world()
    log = get_logger(launcher_world.rank)
    if cfg.mode == "async":
        from harness.backends.mpi_ps import run as run_ps

        return run_ps(cfg, launcher_world, log)
    backend = create(cfg, launcher_world, resolve_gradient_path(cfg.allreduce, cfg.mode))
    rt = backend.init_distributed()
    if launcher_world.size > 1 or rt.size > 1:
        check_runtime_world(launcher_world, rt.rank, rt.size, backend.gradient_path)
    world = rt
    backend.world = world
    log = get_logger(world.rank)
    stop = StopFlag().install()
    try:
        return _run(cfg, backend, world, log, stop)
    finally:
        stop.uninstall()


def _run(cfg: RunConfig, backend: Backend, world: World, log, stop: StopFlag) -> int:
    # Everything that can be wrong with the input is checked before anything is written.
    data, spec = load_data(cfg)
    Sharder(len(data.x_train), step_batch(cfg, world.size), world.rank, world.size, cfg.seed,
            cfg.shuffle)                                     # fails the same way on every rank
    run_dir = run_dir_of(cfg, world.size)
    identity = checkpoint_identity(cfg, data)
    ckpt, error, pos = None, None, Position()
    if world.rank == 0:
        try:
            ckpt = find_resume_checkpoint(cfg, run_dir, log)
            if ckpt is not None:
                ckpt_io.check_compatible(ckpt, identity)
            ckpt_io.check_writable(run_dir / "checkpoints")     # the first write of the run
            if ckpt is not None:
                p = ckpt.meta["position"]
                pos = Position(p["epoch"], p["step_in_epoch"], p["step"], p["samples"],
                               p["wall_s"], p.get("best_eval_acc"), p.get("time_to_target_s"),
                               p.get("steps_to_target"))
        except HarnessError as e:
            error = e
    agreed = _agree_on_resume(backend, world, error, pos)
    if world.rank == 0:
        agreed.best_eval_acc, agreed.time_to_target_s = pos.best_eval_acc, pos.time_to_target_s
        agreed.steps_to_target = pos.steps_to_target
    pos = agreed
    resumed = pos.step > 0 or ckpt is not None

    backend.setup(spec, spec.init_weights(cfg.seed), cfg.lr)
    if ckpt is not None:
        backend.set_weights(ckpt.weights)
        if ckpt.optimizer:
            backend.set_optimizer_state(ckpt.optimizer, ckpt.meta["optimizer"])
        log.info(f"resuming from {ckpt.path} at step {pos.step} (epoch {pos.epoch + 1})")

    metrics = MetricsWriter(run_dir / "metrics.jsonl" if world.rank == 0 else None)
    info = backend.info()
    if world.rank == 0:
        record = {"config": cfg.to_dict(), "environment": environment(),
                  "world": {"size": world.size, "launcher": world.source},
                  "backend": {"framework": info.framework, "gradient_path": info.gradient_path,
                              "versions": info.versions, "settings": info.settings},
                  "model": {"name": spec.name, "parameters": spec.num_parameters,
                            "flops_per_sample": spec.flops_per_sample},
                  "data": data.fingerprint(),
                  "resumed_from": str(ckpt.path) if ckpt is not None else None,
                  "start_step": pos.step}
        write_json_atomic(run_dir / "config.json", record)
        metrics.write("run", **record)
    ctx = RunContext(cfg, world, backend, data, run_dir, log, metrics, stop,
                     ckpt_meta={**identity, "config": cfg.to_dict(), "world_size": world.size},
                     last_saved_step=ckpt.step if ckpt is not None else None)
    try:
        summary = train(ctx, pos, resumed)
    except Preempted as p:
        metrics.write("preempted", step=p.step)
        metrics.close()
        return EXIT_PREEMPTED
    metrics.write("summary", **summary)
    metrics.close()
    if world.rank == 0:
        write_json_atomic(run_dir / "summary.json", summary)
        log.info(f"done: {summary['steps']} steps, test accuracy "
                 f"{summary['final_eval_acc']:.4f}, {summary['samples_per_s_total'] or 0:,.0f} "
                 f"samples/s total; results in {run_dir}")
    backend.shutdown()
    return 0

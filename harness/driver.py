"""What every training mode shares: the data and model of a run, its folder and record, which
checkpoint to resume from and the ranks' agreement on it, the learning-rate schedule,
evaluation batches, target tracking and the summary.

The synchronous driver (``harness/train.py`` with ``harness/loop.py``) and the parameter
server's (``harness/ps``) both build on this module; it imports neither of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

import numpy as np

from harness import checkpoint as ckpt_io
from harness.config import RunConfig
from harness.data import Dataset, check_model_input, load_dataset
from harness.errors import CheckpointError, ConfigError, HarnessError
from harness.files import atomic_write
from harness.metrics import MetricsWriter
from harness.runinfo import environment
from models import default_classes, default_input_shape, get_spec
from models.base import ModelSpec

EVAL_BATCH = 512            # samples per evaluation batch (any size gives the same sums)


def write_json_atomic(path: Path, data: Any) -> None:
    blob = (json.dumps(data, indent=2, default=str) + "\n").encode()

    def write(f: BinaryIO) -> None:
        f.write(blob)

    atomic_write(path, write)


def load_data(cfg: RunConfig) -> tuple[Dataset, ModelSpec]:
    """The run's dataset and the model spec that fits it (ConfigError/DataError otherwise)."""
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


def checkpoint_identity(cfg: RunConfig, data: Dataset) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes from it."""
    return {"framework": cfg.framework, "model": cfg.model, "dataset": data.fingerprint()}


def finished(run_dir: Path, step: int, total_steps: int) -> bool:
    """A run whose checkpoint is at the end of its plan and whose summary was written."""
    return step >= total_steps and (run_dir / "summary.json").exists()


def find_resume_checkpoint(cfg: RunConfig, ckpt_dir: Path, log, prefix: str = "ckpt",
                           given: Path | None = None) -> ckpt_io.Checkpoint | None:
    """The checkpoint of ``prefix`` in ``ckpt_dir`` to resume from, per ``cfg.resume``.

    ``resume = PATH`` starts from that file (``given``: where this prefix's file of PATH is),
    but once the run folder holds a checkpoint of its own saved after it (the run was
    preempted and requeued with the same command), that one wins: requeues never go back to
    PATH. A job SLURM requeued continues its own checkpoints even with ``resume = 'never'``.
    """
    existing = ckpt_io.latest_paths(ckpt_dir, prefix)
    if cfg.resume == "never":
        if not existing:
            return None
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if restarts == 0:
            raise ConfigError(f"{ckpt_dir.parent} already has checkpoints ({existing[0].name}) "
                              "and resume = 'never': choose another run_name/out_dir, or set "
                              "resume = 'auto' to continue that run")
        log.info(f"requeued job (SLURM_RESTART_COUNT = {restarts}): continuing its own "
                 "checkpoints despite resume = 'never'")
        return ckpt_io.load_latest(ckpt_dir, prefix, warn=log.warning)
    own = ckpt_io.load_latest(ckpt_dir, prefix, warn=log.warning) if existing else None
    if cfg.resume == "auto":
        return own
    chosen = ckpt_io.load(given or Path(cfg.resume))
    if own is not None and own.path != chosen.path and \
            own.meta.get("saved_at", 0) > chosen.meta.get("saved_at", 0):
        log.info(f"the run folder has a newer checkpoint ({own.path}, step {own.step}) "
                 f"than resume = {cfg.resume} (step {chosen.step}): continuing from it")
        return own
    return chosen


def agree_on_start(reduce_sum: Callable[[np.ndarray], np.ndarray], error: HarnessError | None,
                   finished: bool, payload: np.ndarray | None = None,
                   who: str = "rank 0") -> tuple[np.ndarray, bool]:
    """One collective before anything is written: every rank learns whether a rank that looked
    for its checkpoint could not start (that rank raises its own error, the others a one-line
    CheckpointError), whether the run had already finished everywhere it was checked, and the
    payload (the sum of what the ranks sent: the one rank that found the position sends it).

    Ranks that check nothing pass ``error = None``, ``finished = True`` and a zero payload.
    Returns ``(payload, finished)``.
    """
    body = np.zeros(0) if payload is None else np.asarray(payload, dtype=np.float64)
    vec = np.concatenate([[1.0 if error else 0.0, 0.0 if finished else 1.0], body])
    vec = np.asarray(reduce_sum(vec), dtype=np.float64)
    if vec[0] > 0:
        if error is not None:
            raise error
        raise CheckpointError(f"{who} could not start the run (its error is reported above)")
    return vec[2:], bool(vec[1] == 0)


def log_finished(log, run_dir: Path, what: str) -> None:
    log.info(f"{run_dir} already finished ({what}; results in its summary.json): nothing to do. "
             "Raise epochs or max_steps to train it further, or choose another run_name to "
             "train again")


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
class Target:
    """Best test accuracy and the first ``target_accuracy`` crossing (a ``TargetState``)."""

    best_eval_acc: float | None = None
    time_to_target_s: float | None = None
    steps_to_target: int | None = None


class TargetState(Protocol):
    best_eval_acc: float | None
    time_to_target_s: float | None
    steps_to_target: int | None


def track_target(cfg: RunConfig, state: TargetState, acc: float, wall_s: float,
                 step: int) -> None:
    """Best test accuracy so far, and the wall time and step of the first ``target_accuracy``
    crossing."""
    state.best_eval_acc = acc if state.best_eval_acc is None else max(state.best_eval_acc, acc)
    if (cfg.target_accuracy is not None and state.time_to_target_s is None
            and acc >= cfg.target_accuracy):
        state.time_to_target_s = wall_s
        state.steps_to_target = step


def start_record(run_dir: Path, metrics: MetricsWriter, cfg: RunConfig, spec: ModelSpec,
                 data: Dataset, world: dict[str, Any], backend: dict[str, Any],
                 resumed_from: str | None, **start: Any) -> dict[str, Any]:
    """The record of one (re)start: ``config.json`` and the ``run`` line of metrics.jsonl."""
    record = {"config": cfg.to_dict(), "environment": environment(), "world": world,
              "backend": backend,
              "model": {"name": spec.name, "parameters": spec.num_parameters,
                        "flops_per_sample": spec.flops_per_sample},
              "data": data.fingerprint(), "resumed_from": resumed_from, **start}
    write_json_atomic(run_dir / "config.json", record)
    metrics.write("run", **record)
    return record


def finish_record(run_dir: Path, metrics: MetricsWriter, summary: dict[str, Any]) -> None:
    """The ``summary`` line of metrics.jsonl and ``summary.json`` (rank 0)."""
    metrics.write("summary", **summary)
    metrics.close()
    write_json_atomic(run_dir / "summary.json", summary)

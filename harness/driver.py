"""What every training mode shares: the data and model of a run, its folder and record, the
learning-rate schedule, evaluation batches, target tracking and the summary.

The synchronous driver (``harness/train.py`` with ``harness/loop.py``) and the parameter
server's (``harness/ps``) both build on this module; it imports neither of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from harness.config import RunConfig
from harness.data import Dataset, check_model_input, load_dataset
from harness.errors import ConfigError
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

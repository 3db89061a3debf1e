"""What every training mode shares: the data and model of a run, its folder and record, which
checkpoint to resume from and the ranks' agreement on it, the learning-rate schedule,
evaluation batches, target tracking and the summary.

The synchronous driver (``harness/train.py`` with ``harness/loop.py``) and the parameter
server's (``harness/ps``) both build on this module; it imports neither of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Protocol

import numpy as np

from harness import checkpoint as ckpt_io
from harness.config import RunConfig
from harness.data import Dataset
from harness.errors import CheckpointError, ConfigError, HarnessError
from harness.files import atomic_write
from harness.metrics import MetricsWriter
from harness.runinfo import environment
from harness.task import Task, load_task

if TYPE_CHECKING:
    from harness.backends.base import Backend
    from harness.backends.common import FlatLayout

EVAL_BATCH = 512            # samples per evaluation batch (any size gives the same sums)


def write_json_atomic(path: Path, data: Any) -> None:
    blob = (json.dumps(data, indent=2, default=str) + "\n").encode()

    def write(f: BinaryIO) -> None:
        f.write(blob)

    atomic_write(path, write)


#: the built-in models' task (``--model``, ``--dataset``): loaded like any user's task
BUILTIN_TASK = "models.tasks:builtin"


def load_task_data(cfg: RunConfig, task: Task | None = None) -> tuple[Task, Dataset]:
    """The run's task (``task``, else ``cfg.task``, else the built-in model) and its data
    (TaskError/ConfigError/DataError when they do not fit the config)."""
    if task is None:
        task = load_task(cfg.task or BUILTIN_TASK, cfg)
    if task.framework != cfg.framework:
        raise ConfigError(f"task {task.name!r} is a {task.framework} task, but framework = "
                          f"{cfg.framework!r}: set framework = {task.framework!r}")
    if cfg.target_accuracy is not None and "acc" not in task.metrics:
        raise ConfigError(f"target_accuracy = {cfg.target_accuracy} needs a metric named 'acc', "
                          f"and task {task.name!r} has {', '.join(task.metrics) or 'none'}: "
                          "drop target_accuracy or add an 'acc' metric to the task")
    return task, task.load_data()


def run_dir_of(cfg: RunConfig, world_size: int, task_name: str | None = None) -> Path:
    """The run folder; ``task_name``: a user's task (None for the built-in models)."""
    return Path(cfg.out_dir) / (cfg.run_name or cfg.default_run_name(world_size, task_name))


def own_task_name(cfg: RunConfig, task: Task, given: bool) -> str | None:
    """The task name that names the run folder: a user's task's (``given``), else None."""
    return task.name if given or cfg.task else None


def checkpoint_identity(cfg: RunConfig, task: Task, data: Dataset) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes from it (the built-in gpt: its
    size too, which the weights' shapes do not all show: the heads)."""
    out = {"framework": cfg.framework, "model": task.name, "dataset": data.fingerprint()}
    if cfg.task is None and cfg.model == "gpt":
        out["gpt"] = {"layers": cfg.gpt_layers, "dim": cfg.gpt_dim, "heads": cfg.gpt_heads}
    return out


def model_record(task: Task, layout: "FlatLayout", canonical: dict | None) -> dict[str, Any]:
    """The ``model`` entry of a run record: what the report names and checks."""
    checksum = None if canonical is None else \
        float(sum(np.sum(np.asarray(v, np.float64)) for v in canonical.values()))
    return {"name": task.name, "parameters": layout.total, "layout": layout_signature(layout),
            "flops_per_sample": task.flops_per_sample, "loss": task.loss_name,
            "tokens_per_sample": task.tokens_per_sample,
            "metrics": list(task.metrics), "canonical": canonical is not None,
            "initial_weights_checksum": checksum}


def layout_signature(layout: "FlatLayout") -> str:
    """A short fingerprint of the trainable parameters' names, shapes and order: a checkpoint
    of another model (or of a model whose parameters were reordered) does not match it."""
    blob = json.dumps([[n, list(s)] for n, s in zip(layout.names, layout.shapes)]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_layout(ckpt: ckpt_io.Checkpoint, layout: str, framework: str) -> None:
    """The checkpoint holds this model's parameters, in its names and order. Checkpoints
    written before layouts were recorded are accepted for PyTorch (whose names and order did
    not change) and refused for TensorFlow (they hold the canonical layout, not Keras')."""
    saved = ckpt.meta.get("layout")
    if saved == layout or (saved is None and framework == "torch"):
        return
    if saved is None:
        raise CheckpointError(f"checkpoint {ckpt.path} was written before checkpoints held "
                              "Keras' own variable names and layouts, and cannot be resumed by "
                              "this version: start in a fresh run_name/out_dir")
    raise CheckpointError(f"checkpoint {ckpt.path} holds another model's parameters (layout "
                          f"{saved}, this model's is {layout}): resume with the model it was "
                          "written by, or start in a fresh run_name/out_dir")


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
    if not existing and cfg.resume in ("auto", "never"):
        check_no_other_mode(ckpt_dir, prefix, cfg.mode)
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
    if given is None and not Path(cfg.resume).exists():
        raise CheckpointError(f"resume = {cfg.resume!r} is not 'auto', 'never' or an existing "
                              "checkpoint file: give one of them (a file such as "
                              "<run>/checkpoints/ckpt-<step>.npz)")
    chosen = ckpt_io.load(given or Path(cfg.resume))
    check_same_settings(chosen, cfg, ("mode",))
    if own is not None and own.path != chosen.path and \
            own.meta.get("saved_at", 0) > chosen.meta.get("saved_at", 0):
        log.info(f"the run folder has a newer checkpoint ({own.path}, step {own.step}) "
                 f"than resume = {cfg.resume} (step {chosen.step}): continuing from it")
        return own
    return chosen


#: settings a resume must keep, and why (the optimizer's hyperparameters: PyTorch's
#: load_state_dict restores them with its state, so a new value was silently ignored there)
RESUME_KEEPS = {
    "momentum": "the optimizer state continues with the momentum it was written with",
    "weight_decay": "the optimizer state continues with the weight decay it was written with",
    "ps_consistency": "the servers' plan of updates depends on it",
    "mode": "a parameter server's checkpoint holds its servers' shards, a sync run's the "
            "whole model",
    "seed": "the order of the data in the epoch it stopped in comes from the seed",
    "shuffle": "the order of the data in the epoch it stopped in depends on it",
}


def check_same_settings(ckpt: ckpt_io.Checkpoint, cfg: RunConfig, keys: tuple[str, ...]) -> None:
    """Refuse a resume whose ``keys`` (of RESUME_KEEPS) differ from the checkpoint's config."""
    saved = ckpt.meta.get("config") or {}
    for key in keys:
        if key not in saved:                   # a checkpoint from before the key existed
            continue
        old, new = saved[key], getattr(cfg, key)
        same = math.isclose(old, new, rel_tol=1e-9) if isinstance(new, float) and \
            isinstance(old, (int, float)) else old == new
        if not same:
            fresh = "drop resume (it names that checkpoint) to start afresh" \
                if cfg.resume not in ("auto", "never") else \
                "start in a fresh run_name/out_dir"
            raise CheckpointError(f"checkpoint {ckpt.path} was written with {key} = {old!r}, "
                                  f"this run has {key} = {new!r} ({RESUME_KEEPS[key]}): resume "
                                  f"with {key} = {old!r}, or {fresh}")


def check_worker_batch(ckpt: ckpt_io.Checkpoint, cfg: RunConfig, workers: int) -> None:
    """A parameter server's workers count their position in batches: the samples a worker
    takes per update (batch_size, or global_batch_size over the workers, times
    backward_passes_per_step) must stay what the checkpoint's were."""
    keys = ("batch_size", "global_batch_size", "backward_passes_per_step")
    saved = ckpt.meta.get("config") or {}
    if not all(k in saved for k in keys):
        return
    then = dataclasses.replace(cfg, **{k: saved[k] for k in keys})
    old = then.per_rank_batch(workers) * then.backward_passes_per_step
    new = cfg.per_rank_batch(workers) * cfg.backward_passes_per_step
    if old != new:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written with {old} samples per worker and update "
            f"({', '.join(f'{k} = {saved[k]}' for k in keys)}), this run has {new}: each "
            f"worker's position is counted in its own batches; resume with "
            f"{', '.join(f'{k} = {saved[k]}' for k in keys)}, or start in a fresh "
            "run_name/out_dir")


def check_no_other_mode(ckpt_dir: Path, prefix: str, mode: str) -> None:
    """A run folder holds one run: checkpoints of the other mode (a parameter server's
    ``ps-server<k>-*`` beside a sync run's ``ckpt-*``) mean another run is there, which this
    one would neither resume nor leave alone (it would start over and append to its
    records)."""
    other, was = ("ps-server0", "async") if prefix == "ckpt" else ("ckpt", "sync")
    found = ckpt_io.latest_paths(ckpt_dir, other)
    if found:
        raise CheckpointError(f"{ckpt_dir.parent} holds checkpoints of a mode = {was!r} run "
                              f"({found[0].name}), this run is mode = {mode!r}: resume it with "
                              f"mode = {was!r}, or start in a fresh run_name/out_dir")


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


def eval_sums(backend: "Backend", data: Dataset, index: np.ndarray) -> np.ndarray:
    """[loss, each metric, samples] summed over the test samples ``index``."""
    names = list(backend.task.metrics)
    sums = np.zeros(len(names) + 2, np.float64)
    for i in range(0, len(index), EVAL_BATCH):
        xb, yb = data.test.batch(index[i:i + EVAL_BATCH])
        loss, metrics = backend.eval_batch(xb, yb)
        sums += [loss, *(metrics[m] for m in names), len(yb)]
    return sums


def eval_record(names: list[str], sums: np.ndarray, tokens_per_sample: int = 0) -> dict[str, Any]:
    """``eval_loss``, ``eval_<metric>`` and ``eval_samples`` from :func:`eval_sums`; for a
    language model (``tokens_per_sample``) also ``eval_perplexity``, exp(eval_loss)."""
    n = sums[-1]
    rec = {"eval_loss": sums[0] / n, **{f"eval_{m}": v / n for m, v in zip(names, sums[1:-1])},
           "eval_samples": int(n)}
    if tokens_per_sample:
        rec["eval_perplexity"] = perplexity(rec["eval_loss"])
    return rec


def perplexity(loss: float | None) -> float | None:
    """exp(mean cross-entropy in nats); None without a finite loss, or past float range (a
    diverged run)."""
    if loss is None or not math.isfinite(loss) or loss > 700:
        return None
    return math.exp(loss)


def language_model_summary(summary: dict[str, Any], tokens_per_sample: int) -> dict[str, Any]:
    """A language model's summary fields from its sample counts: tokens/s (median step, per
    device and total, and over the wall time) and the final test perplexity."""
    if not tokens_per_sample:
        return {}

    def tokens(key: str) -> float | None:
        v = summary.get(key)
        return v * tokens_per_sample if v is not None else None

    return {"tokens_per_sample": tokens_per_sample,
            "tokens_per_s_total": tokens("samples_per_s_total"),
            "tokens_per_s_per_device": tokens("samples_per_s_per_device"),
            "tokens_per_s_wall": tokens("samples_per_s_wall"),
            "final_eval_perplexity": perplexity(summary.get("final_eval_loss"))}


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


def start_record(run_dir: Path, metrics: MetricsWriter, cfg: RunConfig, model: dict[str, Any],
                 data: Dataset, world: dict[str, Any], backend: dict[str, Any],
                 resumed_from: str | None, **start: Any) -> dict[str, Any]:
    """The record of one (re)start: ``config.json`` and the ``run`` line of metrics.jsonl
    (``model``: :func:`model_record`)."""
    record = {"config": cfg.to_dict(), "environment": environment(), "world": world,
              "backend": backend, "model": model,
              "data": data.fingerprint(), "resumed_from": resumed_from, **start}
    if os.environ.get("HARNESS_FAULT"):     # a drill's numbers: the report says so
        record["fault"] = os.environ["HARNESS_FAULT"]
    write_json_atomic(run_dir / "config.json", record)
    metrics.write("run", **record)
    return record


def final_metrics(summary: dict) -> str:
    """``test <loss name> 0.1234, acc 0.9876`` from a summary."""
    loss = summary.get("final_eval_loss")
    parts = [f"test {summary.get('loss_name', 'loss')} "
             f"{loss:.4f}" if loss is not None else "no test loss"]
    if summary.get("final_eval_perplexity") is not None:
        parts.append(f"perplexity {summary['final_eval_perplexity']:.3f}")
    for m in summary.get("metrics", []):
        v = summary.get(f"final_eval_{m}")
        if v is not None:
            parts.append(f"{m} {v:.4f}")
    return ", ".join(parts)


def finish_record(run_dir: Path, metrics: MetricsWriter, summary: dict[str, Any],
                  tokens_per_sample: int = 0) -> None:
    """The ``summary`` line of metrics.jsonl and ``summary.json`` (rank 0); a language model's
    (``tokens_per_sample``) with its tokens/s and perplexity."""
    summary.update(language_model_summary(summary, tokens_per_sample))
    metrics.write("summary", **summary)
    metrics.close()
    write_json_atomic(run_dir / "summary.json", summary)

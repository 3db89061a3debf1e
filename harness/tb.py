"""TensorBoard event files of a run, written by rank 0 next to ``metrics.jsonl`` (``<run>/tb/``).

One writer for both frameworks: the ``tensorboard`` package's own ``EventFileWriter`` (it
writes from a background thread), fed from the records ``MetricsWriter`` writes, so the
scalars are the ``metrics.jsonl`` values at the same step numbers:

* ``step`` records every ``every`` steps (the progress cadence, ``log_every``) and the first:
  ``train/loss``, ``train/<metric>``, ``train/lr``, ``perf/samples_per_s``,
  ``perf/step_time_s``, the step breakdown ``step_time/<part>_s``, the bytes this rank sent
  for the exchange ``comm/sent_bytes``, the ranks training ``perf/world_size`` (it changes in
  elastic runs); for the parameter server
  ``ps/staleness``, ``ps/push_pull_latency_s``, ``ps/compute_s``;
* ``epoch`` and ``eval`` records: ``eval/loss``, ``eval/<metric>``, ``train/epoch_loss``,
  ``train/epoch_<metric>``, at the step the epoch ended;
* the ``run`` record: the config as text (``config``) and as hyperparameters (HParams tab).

TensorBoard's ``tensorboard.compat.tf`` imports TensorFlow when it is installed; a PyTorch rank
must not (one framework per process), so the writer is told to use TensorBoard's own stub.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Any

#: step-record fields that are not scalars of their own (or are shown under another tag)
_STEP_FIELDS = {"kind", "restart", "time", "step", "epoch", "applied", "samples",
                "samples_per_s_rank", "wall_s", "worker", "clock"}
_STEP_TAGS = {"loss": "train/loss", "lr": "train/lr", "samples_per_s_total": "perf/samples_per_s",
              "step_time_s": "perf/step_time_s", "staleness": "ps/staleness",
              "latency_s": "ps/push_pull_latency_s", "compute_s": "ps/compute_s",
              "t_data_s": "step_time/data_s", "t_compute_s": "step_time/compute_s",
              "t_exchange_s": "step_time/exchange_s", "t_harness_s": "step_time/harness_s",
              "sent_bytes": "comm/sent_bytes", "world_size": "perf/world_size",
              "tokens_per_s_total": "perf/tokens_per_s"}


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a ``step`` record (a task metric ``m``: ``train/m``)."""
    out = {}
    for key, value in record.items():
        v = _number(value)
        if key in _STEP_FIELDS or v is None:
            continue
        out[_STEP_TAGS.get(key, f"train/{key}")] = v
    return out


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of an ``epoch``/``eval`` record: test metrics and the epoch's train means."""
    out = {}
    for key, value in record.items():
        v = _number(value)
        if v is None:
            continue
        if key == "eval_samples":             # the test set's size, not a measurement
            continue
        if key.startswith("eval_"):
            out[f"eval/{key[5:]}"] = v
        elif key.startswith("train_"):
            out[f"train/epoch_{key[6:]}"] = v
    return out


def _without_tensorflow() -> None:
    """Make ``tensorboard.compat.tf`` TensorBoard's stub (its documented 'notf' switch)."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


class TensorBoardWriter:
    """Scalars and the config of one run, for ``tensorboard --logdir``."""

    def __init__(self, logdir: Path, every: int) -> None:
        _without_tensorflow()
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2, summary_pb2
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir), flush_secs=30)
        self.every = max(1, every)

    def _write(self, step: int, wall: float, values: list[Any]) -> None:
        if values:
            self._writer.add_event(self._event.Event(
                wall_time=wall, step=step, summary=self._summary.Summary(value=values)))

    def scalars(self, step: int, wall: float, scalars: dict[str, float]) -> None:
        value = self._summary.Summary.Value
        self._write(step, wall, [value(tag=t, simple_value=v) for t, v in scalars.items()])

    def record(self, kind: str, record: dict[str, Any]) -> None:
        """Mirror one metrics.jsonl record (see the module for which and when)."""
        wall = float(record.get("time", 0.0))
        if kind == "step":
            step = int(record["step"])
            if step == 1 or step % self.every == 0:
                self.scalars(step, wall, step_scalars(record))
        elif kind in ("epoch", "eval"):
            if "step" in record:
                self.scalars(int(record["step"]), wall, epoch_scalars(record))
            self.flush()                 # a crash loses at most the epoch in progress
        elif kind == "run":
            self.config(record.get("config") or {}, wall)
        elif kind in ("summary", "preempted"):
            self.flush()

    def config(self, config: dict[str, Any], wall: float) -> None:
        from tensorboard.plugins.hparams import summary_v2 as hp
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.util import tensor_util

        text = "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```"
        meta = text_metadata.create_summary_metadata(display_name="config", description="")
        self._write(0, wall, [self._summary.Summary.Value(
            tag="config", metadata=meta, tensor=tensor_util.make_tensor_proto([text]))])
        hparams = {k: v for k, v in config.items()
                   if isinstance(v, (bool, str)) or _number(v) is not None}
        pb = hp.hparams_pb(hparams, start_time_secs=int(wall))
        self._write(0, wall, list(pb.value))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_writer(run_dir: Path, cfg: Any, log: Any) -> TensorBoardWriter | None:
    """Rank 0's TensorBoard writer for ``<run_dir>/tb`` (None when ``tensorboard = false``, or,
    with a warning, when the tensorboard package is missing)."""
    if not cfg.tensorboard:
        return None
    try:
        return TensorBoardWriter(run_dir / "tb", cfg.log_every)
    except ImportError as e:
        log.warning(f"no TensorBoard events for this run: {e} (pip install tensorboard, or set "
                    "tensorboard = false)")
        return None

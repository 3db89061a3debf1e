"""Metrics from explicit counts, written as JSON lines by rank 0.

``results/<run>/metrics.jsonl`` holds one record per line, each with a ``kind``:

* ``run``: once per (re)start: config, environment, world, versions, command.
* ``step``: loss and the task's metrics (``acc`` for the built-in classifiers) of rank 0's batch,
  lr, step time, samples/s per rank and in total;
  for the parameter server, one per applied push (worker, clock, staleness, compute time and
  push/pull latency), written by server 0.
* ``epoch``: epoch means on rank 0 (``train_loss``, ``train_<metric>``) and the test loss and
  metrics over all ranks (``eval_loss``, ``eval_<metric>``: exact global sums);
  for the parameter server, each evaluation a worker reports.
* ``eval``: the final evaluation of a run that ends mid-epoch (``max_steps``).
* ``preempted``: the step (parameter server: version and worker clocks) at which a stop signal
  ended this start; no ``summary`` follows it.
* ``reset``: an elastic run changed its world size (``old_size``, ``new_size``, ``reason``: rank
  lost, hosts added or removed), at ``step``, the step training goes on from (after a lost
  rank, the last commit: ``steps_redone`` steps are trained again).
* ``join``: a worker joined a parameter-server job (``ps_join``): its id (``worker``), the
  ``slot`` of the failed worker it replaces, the slot's ``clock`` it continues from, its
  ``host``, at ``step`` (the server's version).
* ``summary``: percentiles and rates computed from the step records above, nothing estimated:
  a value that was not measured is ``null``. The parameter server's counters (updates/s,
  push/pull latency, staleness histogram) are in it too.

The file is opened in append mode so records survive requeues; ``restart`` numbers the starts.
"""

from __future__ import annotations

import errno
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from harness.errors import StorageError


def percentile(values: Iterable[float], q: float) -> float | None:
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else None


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become strings so the line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


class MetricsWriter:
    """Appends records to metrics.jsonl (rank 0); other ranks get a writer that drops them."""

    def __init__(self, path: Path | None, flush_every: int = 50, tensorboard: Any = None) -> None:
        self.path = path
        #: a harness.tb.TensorBoardWriter that mirrors the records (rank 0), or None
        self.tensorboard = tensorboard
        self._f = None
        self._pending = 0
        self.flush_every = flush_every
        self.restart = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.restart = sum(1 for r in read_records(path) if r.get("kind") == "run") \
                if path.exists() else 0
            self._f = open(path, "a", encoding="utf-8")

    def write(self, kind: str, **fields: Any) -> None:
        if self._f is None:
            return
        record = {"kind": kind, "restart": self.restart, "time": time.time(), **fields}
        try:
            try:                # a record of plain finite numbers needs no cleaning (most)
                line = json.dumps(record, allow_nan=False)
            except (ValueError, TypeError):
                line = json.dumps(_clean(record), allow_nan=False)
            self._f.write(line + "\n")
        except OSError as e:
            self._fail(e)
        self._pending += 1
        if kind != "step" or self._pending >= self.flush_every:
            self.flush()
        if self.tensorboard is not None:
            self.tensorboard.record(kind, record)

    def flush(self) -> None:
        if self._f is not None:
            try:
                self._f.flush()
            except OSError as e:
                self._fail(e)
            self._pending = 0

    def _fail(self, e: OSError) -> None:
        raise StorageError(f"could not write {self.path}: {e.strerror}"
                           f"{' (the disk is full)' if e.errno == errno.ENOSPC else ''}; "
                           "free space or choose another out_dir, then resume from the last "
                           "checkpoint")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self._f is not None:
            try:
                self.flush()
            finally:
                try:
                    self._f.close()
                except OSError:
                    pass
                self._f = None


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a torn last line (killed writer) is ignored, and so is a
    line that is JSON but not a record (an object with a kind)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "kind" in record:
                out.append(record)
    return out


def latest_by_step(records: list[dict[str, Any]], kind: str, key: str = "step") -> list[dict]:
    """Records of ``kind`` keeping only the last one written for each ``key`` value.

    After a resume the steps since the last checkpoint run again; the later record is the one
    whose effects the final weights contain.
    """
    by: dict[Any, dict] = {}
    for r in records:
        if r.get("kind") == kind:
            by[r[key]] = r
    return [by[k] for k in sorted(by)]


class StepTimer:
    """Step times of one run, with warm-up steps (graph tracing, allocator growth) set apart."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.count = 0
        self.excluded_before = 0      # warm-up steps excluded in earlier segments of the run

    def add(self, seconds: float) -> None:
        self.count += 1
        if self.count > self.warmup:
            self.times.append(seconds)

    def state(self) -> dict[str, np.ndarray]:
        """The timed steps so far, for a checkpoint: a resumed run's summary covers every
        segment (each segment's own first steps are warm-up again)."""
        return {"step_times": np.asarray(self.times, dtype=np.float64),
                "warmup_excluded": np.array(self.excluded_before + min(self.count, self.warmup))}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        if "step_times" in state:
            self.times = [float(t) for t in state["step_times"]]
            self.excluded_before = int(state["warmup_excluded"])

    def summary(self, global_batch: int, world_size: int) -> dict[str, Any]:
        p50 = percentile(self.times, 50)
        total = global_batch / p50 if p50 else None
        return {
            "steps_timed": len(self.times),
            "warmup_steps_excluded": self.excluded_before + min(self.count, self.warmup),
            "step_time_p50_s": p50,
            "step_time_p90_s": percentile(self.times, 90),
            "step_time_p99_s": percentile(self.times, 99),
            "step_time_mean_s": float(np.mean(self.times)) if self.times else None,
            "samples_per_s_total": total,
            "samples_per_s_per_device": total / world_size if total else None,
        }


#: the parts of a step (``t_<part>_s`` in step records): the batch from the dataset; the
#: backend's step less its exchange (forward, backward, update, the framework's dispatch); the
#: wait for the reduced gradients; everything else in the loop (lr, faults, metrics, progress,
#: the stop agreement, the previous step's bookkeeping)
BREAKDOWN_PARTS = ("data", "compute", "exchange", "harness")


class StepBreakdown:
    """Where each timed step's time went on this rank (warm-up steps set apart as in
    StepTimer). A part the backend cannot measure (the exchange under Horovod's gradient tape)
    is None in every step, on every rank alike (the same config)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.count = 0
        self.rows: list[tuple[float, float | None, float | None, float]] = []

    def add(self, data: float, compute: float | None, exchange: float | None,
            harness: float) -> None:
        self.count += 1
        if self.count > self.warmup:
            self.rows.append((data, compute, exchange, harness))

    def medians(self) -> np.ndarray:
        """This rank's median of each part (NaN: not measured, or no timed step)."""
        if not self.rows:
            return np.full(len(BREAKDOWN_PARTS), np.nan)
        arr = np.array([[np.nan if v is None else v for v in r] for r in self.rows])
        return np.array([np.median(col) if np.isfinite(col).all() else np.nan
                         for col in arr.T])

    @staticmethod
    def summary(own: np.ndarray, rank_max: np.ndarray, rank_min: np.ndarray) -> dict[str, Any]:
        """The summary's ``time_breakdown``: rank 0's medians and, per part, the slowest and
        fastest rank's median (a straggler shows as a wide compute range); null where not
        measured."""
        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {f"{part}_s": num(own[i]) for i, part in enumerate(BREAKDOWN_PARTS)} | {
            "ranks_s": {f"{part}": [num(rank_min[i]), num(rank_max[i])]
                        for i, part in enumerate(BREAKDOWN_PARTS)}}

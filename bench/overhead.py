"""Harness overhead: median step time of ``harness train`` against a bare Horovod loop of the
same model, batch, data and settings (bench/bare_loop.py), A/B interleaved over several
launches, np=1 and np=2, both frameworks. Reports the ratio harness/bare with its spread."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.common import emit, median, mpirun, python, run_json_lines, spread


def harness_step_time(framework: str, model: str, np_: int, batch: int, steps: int,
                      samples: int, env: dict, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        argv = mpirun(np_, bind="none") + [
            python(), "-m", "harness", "train", "--framework", framework, "--model", model,
            "--dataset", "synthetic", "--synthetic-samples", str(samples), "--no-shuffle",
            "--batch-size", str(batch), "--max-steps", str(steps), "--eval-every", "0",
            "--log-every", "100000", "--out-dir", d, "--run-name", "o", *extra]
        run_json_lines(argv, env=env)
        return json.loads((Path(d) / "o" / "summary.json").read_text())["step_time_p50_s"]


def bare_step_time(framework: str, model: str, np_: int, batch: int, steps: int, samples: int,
                   env: dict) -> float:
    warmup = min(5, max(1, steps // 10))        # what the harness excludes
    argv = mpirun(np_, bind="none") + [python(), "-m", "bench.bare_loop", framework, model,
                                       str(batch), str(steps), str(samples), str(warmup)]
    rec = [r for r in run_json_lines(argv, env=env) if r.get("kind") == "bare_loop"]
    return rec[0]["step_time_p50_s"]


def run(quick: bool = False, out=None, model: str = "resnet20", launches: int = 5,
        extra: list[str] | None = None) -> list[dict]:
    batch, steps, samples = (8, 6, 64) if quick else (32, 40, 2048)
    launches = 1 if quick else launches
    rows = []
    per_step = bookkeeping_us(2000 if quick else 20000)
    emit({"kind": "bookkeeping", "us_per_step": per_step,
          "what": "harness work per step outside the framework (in-process, no runtime)"}, out)
    for framework in (("torch",) if quick else ("torch", "tensorflow")):
        for np_ in ((2,) if quick else (1, 2)):
            pairs = []
            # The bare loop gets the MPI setting the harness applies (OMPI_MCA_mpi_yield_when_idle,
            # harness/backends/common.py): same settings, so the ratio is the harness itself.
            same = {"OMPI_MCA_mpi_yield_when_idle": "1"}
            for _ in range(launches):       # interleaved: A, B, A, B, ...
                h = harness_step_time(framework, model, np_, batch, steps, samples, {},
                                      extra or [])
                b = bare_step_time(framework, model, np_, batch, steps, samples, same)
                pairs.append((h, b))
                emit({"kind": "overhead_pair", "framework": framework, "model": model,
                      "ranks": np_, "harness_step_s": h, "bare_step_s": b, "ratio": h / b}, out)
            ratios = [h / b for h, b in pairs]
            row = {"kind": "overhead", "framework": framework, "model": model, "ranks": np_,
                   "batch_per_rank": batch, "steps": steps, "launches": launches,
                   "harness_step_p50_s": median([h for h, _ in pairs]),
                   "bare_step_p50_s": median([b for _, b in pairs]),
                   "ratio": spread(ratios), "extra": extra or []}
            rows.append(row)
            emit(row, out)
    return rows


def bookkeeping_us(steps: int = 20000) -> float:
    """What the harness adds per step outside the framework: data slicing, fault lookup, lr
    schedule, metrics record, progress, NaN/stop checks (framework-free, so in-process)."""
    import logging
    import tempfile as tf_

    import numpy as np

    from harness.backends.base import StepResult
    from harness.config import RunConfig
    from harness.data import Data
    from harness.env import World
    from harness.faults import FaultInjector
    from harness.loop import Position, RunContext, TrainingRun
    from harness.metrics import MetricsWriter
    from harness.preemption import StopFlag

    from harness.task import Task

    class NullBackend:                  # answers the agreement allreduce without a runtime
        task = Task(framework="torch", name="null", model=lambda: None, data=None,
                    loss=lambda out, y: 0.0, metrics={"acc": lambda out, y: 0.0})

        def allreduce_host(self, values, op="sum"):
            return np.asarray(values, np.float64)

        def update_every(self):
            return 1

    cfg = RunConfig(epochs=10_000, log_every=100, shuffle=False, agree_every=20)
    x = np.zeros((4096, 8, 8, 1), np.float32)
    y = np.zeros(4096, np.int64)
    data = Data(train=(x, y), test=(x[:8], y[:8]), name="synthetic", num_classes=10)
    with tf_.TemporaryDirectory() as d:
        metrics = MetricsWriter(Path(d) / "metrics.jsonl")
        ctx = RunContext(cfg, World(0, 1, 0, 1), NullBackend(), data, Path(d),
                         logging.getLogger("bench-null"), metrics, StopFlag())
        run = TrainingRun(ctx, Position(), False, cfg.batch_size)
        faults = FaultInjector(0, spec="")
        res = StepResult(0.5, {"acc": 16.0}, True)
        t0 = time.perf_counter()
        for _ in range(steps):
            if run.pos.step_in_epoch >= run.spe:
                run.pos.step_in_epoch = 0
            xb, yb = data.train.batch(run.sharder.indices(run.pos.epoch, run.pos.step_in_epoch))
            faults.before_step(run.pos.step + 1, xb)
            run.schedule(run.pos.step)
            run.record_step(res.loss, res.metrics, len(yb), 0.05, res.applied)
        elapsed = time.perf_counter() - t0
        metrics.close()
    return elapsed / steps * 1e6

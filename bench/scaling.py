"""Weak scaling with one compute thread per rank: E(n) = X(n) / (n X(1)), X = samples/s of
``harness train`` (its summary's global batch over the median step time)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.common import emit, mpirun, python, run_json_lines, spread


def throughput(framework: str, model: str, np_: int, batch: int, steps: int, samples: int,
               extra: list[str]) -> float:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        argv = mpirun(np_, bind="core") + [
            python(), "-m", "harness", "train", "--framework", framework, "--model", model,
            "--dataset", "synthetic", "--synthetic-samples", str(samples), "--no-shuffle",
            "--batch-size", str(batch), "--max-steps", str(steps), "--eval-every", "0",
            "--threads-per-rank", "1", "--log-every", "100000", "--out-dir", d,
            "--run-name", "s", *extra]
        run_json_lines(argv)
        return json.loads((Path(d) / "s" / "summary.json").read_text())["samples_per_s_total"]


def run(quick: bool = False, out=None, model: str = "resnet20", repeats: int = 3,
        extra: list[str] | None = None) -> list[dict]:
    batch, steps, samples = (8, 6, 64) if quick else (32, 30, 2048)
    repeats = 1 if quick else repeats
    rows = []
    for framework in (("torch",) if quick else ("torch", "tensorflow")):
        effs = []
        for _ in range(repeats):
            x1 = throughput(framework, model, 1, batch, steps, samples, extra or [])
            x2 = throughput(framework, model, 2, batch, steps, samples, extra or [])
            effs.append(x2 / (2 * x1))
            emit({"kind": "scaling_pair", "framework": framework, "model": model,
                  "x1_samples_per_s": x1, "x2_samples_per_s": x2, "E2": effs[-1]}, out)
        row = {"kind": "scaling", "framework": framework, "model": model,
               "batch_per_rank": batch, "threads_per_rank": 1, "E2": spread(effs),
               "extra": extra or []}
        rows.append(row)
        emit(row, out)
    return rows

"""Harness overhead: median step time of ``harness train`` against a bare Horovod loop of the
same model, batch, data and settings (bench/bare_loop.py), A/B interleaved over several
launches, np=1 and np=2, both frameworks. Reports the ratio harness/bare with its spread."""

from __future__ import annotations

import json
import tempfile
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
    for framework in (("torch",) if quick else ("torch", "tensorflow")):
        for np_ in ((2,) if quick else (1, 2)):
            pairs = []
            for _ in range(launches):       # interleaved: A, B, A, B, ...
                h = harness_step_time(framework, model, np_, batch, steps, samples, {},
                                      extra or [])
                b = bare_step_time(framework, model, np_, batch, steps, samples, {})
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

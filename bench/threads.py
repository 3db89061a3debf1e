"""The main job's 1-rank baseline at one compute thread and at all of them: the ceiling that
the machine puts on its scaling efficiency.

The report's E(2) = X(2) / (2 X(1)), X = global batch / median step time, so E(2) = t(1) / t(2)
for the two runs' median steps. At 1 rank the harness gives the rank every core
(``threads_per_rank`` = cores / local ranks), at 2 ranks on the same cores one each. A 2-rank
step computes what a 1-rank step computes at one thread, and then exchanges, so even with a free
exchange and no contention between the ranks E(2) <= t(1 rank, all cores) / t(1 rank, 1 thread):
that ratio is the ceiling this benchmark measures.

Each launch is the main job's 1-rank run as ``make compare`` starts it (``harness launch
--launcher horovodrun -np 1`` with ``configs/compare_digits.toml``), evaluation off, with
``--threads-per-rank 1`` or the default; each of ``launches`` rounds per framework runs 1 thread
first, then the default. A
``threads_pair`` record per launch holds the summary's median step and its compute part; a
``threads`` row per framework holds both medians and the ceiling's spread over the rounds (each
round's all-cores step over its 1-thread step).

``--quick`` (the test suite's smoke run): PyTorch, one round of one epoch.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from bench.common import REPO, emit, median, python, spread
from harness.env import cores_per_rank

CONFIG = "configs/compare_digits.toml"


def one_rank(framework: str, threads: int | None, quick: bool) -> dict:
    """The main job's 1-rank run; ``threads`` None: the harness's default (every core)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        argv = [python(), "-m", "harness", "launch", "--launcher", "horovodrun", "-np", "1",
                "--", "--config", CONFIG, "--framework", framework, "--eval-every", "0",
                "--log-every", "100000", "--out-dir", d, "--run-name", "t"]
        argv += ["--epochs", "1"] if quick else []
        argv += ["--threads-per-rank", str(threads)] if threads else []
        p = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{argv} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        s = json.loads((Path(d) / "t" / "summary.json").read_text())
        records = [json.loads(line) for line in (Path(d) / "t" / "metrics.jsonl").open()
                   if line.strip()]
        start = next(r for r in records if r.get("kind") == "run")
    return {"threads_per_rank": start["backend"]["settings"]["threads_per_rank"],
            "step_time_p50_s": s["step_time_p50_s"],
            "compute_s": s["time_breakdown"]["compute_s"], "steps_timed": s["steps_timed"]}


def run(quick: bool = False, out=None, launches: int = 5) -> list[dict]:
    launches = 1 if quick else launches
    if cores_per_rank(1) < 2:                  # one core: both variants are the same run
        emit({"kind": "threads_skipped", "why": "one core: a rank has no second thread"}, out)
        return []
    rows = []
    for framework in ("torch",) if quick else ("torch", "tensorflow"):
        steps: dict[str, list[float]] = {"one": [], "all": []}
        ratios, cores = [], 0
        for i in range(launches):              # interleaved: 1 thread, then every core
            pair = {}
            for key, threads in (("one", 1), ("all", None)):
                r = one_rank(framework, threads, quick)
                if threads is None:            # what the harness gave the rank, not our guess
                    cores = r["threads_per_rank"]
                    if cores < 2:
                        raise RuntimeError(f"the default run computed with {cores} thread: "
                                           "the rank was bound to one core")
                pair[key] = r["step_time_p50_s"]
                steps[key].append(r["step_time_p50_s"])
                emit({"kind": "threads_pair", "framework": framework, "round": i,
                      "config": CONFIG, **r}, out)
            ratios.append(pair["all"] / pair["one"])
        row = {"kind": "threads", "framework": framework, "config": CONFIG, "ranks": 1,
               "cores": cores, "launches": launches,
               "step_time_p50_s_1_thread": median(steps["one"]),
               f"step_time_p50_s_{cores}_threads": median(steps["all"]),
               "e2_ceiling": spread(ratios)}
        rows.append(row)
        emit(row, out)
    return rows

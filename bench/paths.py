"""The default gradient path, chosen by measurement (``allreduce = "auto"``,
``resolve_gradient_path`` in harness/backends/base.py).

The main job's sync config (``configs/compare_digits.toml``, evaluation off), launched as
``make compare`` launches it (``harness launch --launcher horovodrun``, which starts its ranks
through Open MPI here), at np=1 and np=2, in both frameworks, through each gradient path that can
run it: Horovod (its flat exchange, the harness's Horovod default) and ``local`` at np=1, Horovod
and ``mpi`` (one mpi4py Allreduce of the flat buffer) at np=2, and ``auto`` (what a user gets
without a flag; the record says which path it resolved to). Variants are interleaved: each
round runs every variant once, the order rotating from round to round (``position`` in the
record).

What is timed: rank 0's wall clock from step W's record to the last step's (steps W+1..N, every
step and everything the harness does between steps), as bench/overhead.py; samples/s is the
global batch times those steps over that time. Each round's ratio is a variant's samples/s
over Horovod's in the same round.

``--quick`` (the test suite's smoke run): PyTorch at np=2, one round, one epoch.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from bench.common import REPO, emit, median, python, spread

CONFIG = "configs/compare_digits.toml"
#: ranks -> the explicit paths that can run them (auto is added to each)
PATHS = {1: ("horovod", "local"), 2: ("horovod", "mpi")}


def _train(out_dir: Path, framework: str, np_: int, path: str, epochs: int) -> dict:
    argv = [python(), "-m", "harness", "launch", "--launcher", "horovodrun", "-np", str(np_),
            "--", "--config", CONFIG, "--framework", framework, "--allreduce", path,
            "--eval-every", "0", "--log-every", "100000", "--epochs", str(epochs),
            "--out-dir", str(out_dir), "--run-name", "r"]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{argv} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    records = [json.loads(line) for line in
               (out_dir / "r" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = {r["step"]: r for r in records if r.get("kind") == "step"}
    last = max(steps)
    warmup = max(1, last // 10)
    wall = steps[last]["wall_s"] - steps[warmup]["wall_s"]
    summary = json.loads((out_dir / "r" / "summary.json").read_text())
    batch = summary["global_batch"]
    start = next(r for r in records if r.get("kind") == "run")
    return {"gradient_path": start["backend"]["gradient_path"], "steps": last,
            "warmup": warmup, "wall_s": wall, "samples_per_s": batch * (last - warmup) / wall,
            "step_time_p50_s": summary["step_time_p50_s"]}


def rotated(variants: tuple[str, ...], round_: int) -> tuple[str, ...]:
    """Round ``round_``'s order: each variant starts a round in turn, so none always runs
    first, after a launch of another kind (the cyclic order itself stays)."""
    k = round_ % len(variants)
    return variants[k:] + variants[:k]


def run(quick: bool = False, out=None, launches: int = 3) -> list[dict]:
    launches, epochs = (1, 1) if quick else (launches, 20)
    rows = []
    for framework in ("torch",) if quick else ("torch", "tensorflow"):
        for np_ in (2,) if quick else (1, 2):
            variants = (*PATHS[np_], "auto")
            got: dict[str, list[dict]] = {v: [] for v in variants}
            for i in range(launches):          # interleaved: every variant once per round
                order = rotated(variants, i)
                for v in order:
                    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
                        got[v].append(_train(Path(d), framework, np_, v, epochs))
                for v in variants:
                    r = got[v][i]
                    emit({"kind": "path_pair", "framework": framework, "ranks": np_,
                          "round": i, "position": order.index(v), "allreduce": v, **r,
                          "ratio_to_horovod": (r["samples_per_s"] / got["horovod"][i][
                              "samples_per_s"])}, out)
            for v, rs in got.items():
                row = {"kind": "path", "framework": framework, "ranks": np_, "allreduce": v,
                       "gradient_path": sorted({r["gradient_path"] for r in rs}),
                       "launches": len(rs), "config": CONFIG, "epochs": epochs,
                       "step_time_p50_s": median([r["step_time_p50_s"] for r in rs]),
                       "samples_per_s": spread([r["samples_per_s"] for r in rs]),
                       "ratio_to_horovod": spread([
                           r["samples_per_s"] / h["samples_per_s"]
                           for r, h in zip(rs, got["horovod"])])}
                rows.append(row)
                emit(row, out)
    return rows

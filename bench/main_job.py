"""The README's main job, measured as a user meets it, and the A/B behind its Horovod defaults.

* ``main_job``: ``harness compare`` with ``configs/compare_digits.toml`` at 1 and 2 ranks, sync
  and async (what ``make compare`` runs), ``launches`` times. Each launch's scaling efficiency
  E(2) per framework and mode is read with the report's own ``scaling_efficiency`` from the runs
  that launch wrote, so the numbers are the ones its ``report.md`` shows.
* ``idle_cycle_pair``: the same sync job at 2 ranks (``horovodrun``, the main job's launcher)
  with stock Horovod (``HOROVOD_WAKE_ON_ENQUEUE=0``: each step sleeps out the 1 ms cycle), the
  harness's Horovod settings (an enqueue wakes Horovod's thread; 1 ms cycle), those with a
  20 ms idle cycle, without Horovod (``allreduce = "mpi"``), and the harness's default
  (``allreduce = "auto"``: mpi4py for PyTorch on CPU, Horovod for TensorFlow), launches
  interleaved; median step time and samples/s from each run's summary.

``--quick`` (the test suite's smoke run): one launch of PyTorch's sync runs for one epoch, and
two idle-cycle variants (``QUICK_VARIANTS``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from bench.common import REPO, emit, median, python, spread

CONFIG = "configs/compare_digits.toml"


def _compare(out_dir: Path, quick: bool) -> None:
    argv = [python(), "-m", "harness", "compare", "--config", CONFIG, "--np", "1,2",
            "--modes", "sync" if quick else "sync,async", "--out-dir", str(out_dir)]
    if quick:                  # the smoke test: PyTorch's runs, one epoch
        argv += ["--frameworks", "torch", "--", "--epochs", "1"]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{argv} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                           f"{p.stderr[-3000:]}")


def main_job_efficiency(out_dir: Path) -> list[dict]:
    """One record per multi-worker run of a compare folder: E(n) as its report computes it."""
    from harness.report import load_run, scaling_efficiency

    runs = [load_run(d) for d in sorted(out_dir.iterdir()) if (d / "summary.json").exists()]
    eff = scaling_efficiency(runs)
    return [{"run": r.path.name, "framework": r.framework, "mode": r.mode, "workers": r.workers,
             "samples_per_s_total": r.summary.get("samples_per_s_total"),
             "final_acc": r.summary.get("final_eval_acc"), "scaling_efficiency": eff[r.path]}
            for r in runs if r.workers > 1]


def _train(out_dir: Path, name: str, extra: list[str], quick: bool,
           env: dict[str, str] | None = None) -> dict:
    argv = [python(), "-m", "harness", "launch", "--launcher", "horovodrun", "-np", "2", "--",
            "--config", CONFIG, "--eval-every", "0", "--log-every", "100000",
            "--epochs", "1" if quick else "20", "--out-dir", str(out_dir), "--run-name", name,
            *extra]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"{argv} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    s = json.loads((out_dir / name / "summary.json").read_text())
    return {"step_time_p50_s": s["step_time_p50_s"],
            "samples_per_s_total": s["samples_per_s_total"]}


HOROVOD = ["--allreduce", "horovod"]
#: variant -> (train flags, environment)
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "stock Horovod (sleeps out the 1 ms cycle)": (HOROVOD, {"HOROVOD_WAKE_ON_ENQUEUE": "0"}),
    "Horovod, an enqueue wakes it (1 ms cycle)": (HOROVOD, {}),
    "wake on enqueue, 20 ms idle cycle": (HOROVOD + ["--cycle-time-ms", "20"], {}),
    "allreduce = mpi (no Horovod)": (["--allreduce", "mpi"], {}),
    "default (allreduce = auto)": ([], {})}
#: --quick (the smoke test): one variant set through the environment, one through a flag
QUICK_VARIANTS = ("stock Horovod (sleeps out the 1 ms cycle)", "allreduce = mpi (no Horovod)")


def run(quick: bool = False, out=None, launches: int = 3, pairs: int = 3) -> list[dict]:
    launches, pairs = (1, 1) if quick else (launches, pairs)
    rows: list[dict] = []
    effs: dict[tuple[str, str], list[float]] = {}
    for i in range(launches):
        with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
            _compare(Path(d), quick)
            for rec in main_job_efficiency(Path(d)):
                emit({"kind": "main_job_run", "launch": i, **rec}, out)
                if rec["scaling_efficiency"] is not None:
                    effs.setdefault((rec["framework"], rec["mode"]), []).append(
                        rec["scaling_efficiency"])
    for (framework, mode), xs in sorted(effs.items()):
        row = {"kind": "main_job", "framework": framework, "mode": mode, "workers": 2,
               "config": CONFIG, "scaling_efficiency": spread(xs)}
        rows.append(row)
        emit(row, out)
    variants = {v: VARIANTS[v] for v in QUICK_VARIANTS} if quick else VARIANTS
    for framework in ("torch",) if quick else ("torch", "tensorflow"):
        samples: dict[str, list[dict]] = {v: [] for v in variants}
        for i in range(pairs):                   # interleaved: each variant once per round
            for variant, (extra, env) in variants.items():
                with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
                    r = _train(Path(d), "r", ["--framework", framework, *extra], quick, env)
                samples[variant].append(r)
                emit({"kind": "idle_cycle_pair", "framework": framework, "round": i,
                      "variant": variant, **r}, out)
        for variant, rs in samples.items():
            row = {"kind": "idle_cycle", "framework": framework, "ranks": 2,
                   "variant": variant, "launches": len(rs),
                   "step_time_p50_s": median([r["step_time_p50_s"] for r in rs]),
                   "samples_per_s_total": spread([r["samples_per_s_total"] for r in rs])}
            rows.append(row)
            emit(row, out)
    return rows

"""Shared by the benchmarks: environment metadata, JSON-lines output, launcher helpers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.runinfo import environment

REPO = Path(__file__).resolve().parent.parent


def env_record(**extra: Any) -> dict[str, Any]:
    """Versions, CPU, load average and commit: printed before and after every benchmark."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "tensorflow-cpu", "tensorflow", "keras", "horovod", "mpi4py", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    env = environment()
    mpirun = subprocess.run(["mpirun", "--version"], capture_output=True, text=True)
    return {"kind": "environment", "versions": versions, "cpu": env["cpu"], "cpus": env["cpus"],
            "loadavg": env["loadavg"], "git_commit": env["git_commit"], "host": env["host"],
            "mpi": mpirun.stdout.splitlines()[0] if mpirun.returncode == 0 else None,
            "settings_env": env["env"], **extra}


def emit(record: dict[str, Any], out=None) -> None:
    line = json.dumps(record, default=str)
    print(line, flush=True)
    if out is not None:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs),
            "n": len(xs)}


def python() -> str:
    return sys.executable


def mpirun(np_: int, transport: str = "shm", bind: str | None = "core") -> list[str]:
    """Open MPI mpirun argv for ``np_`` local ranks on one transport (shared memory or TCP)."""
    from launchers.builders import mpirun_argv
    from launchers.spec import LaunchSpec

    argv = mpirun_argv(LaunchSpec.with_defaults(launcher="mpirun", np=np_, bind_to=bind,
                                                export=[]), [])
    btl = "self,vader" if transport == "shm" else "self,tcp"
    argv += ["--mca", "btl", btl]
    if transport == "tcp":
        argv += ["--mca", "btl_tcp_if_include", "lo"]
    return argv


def run_json_lines(argv: list[str], env: dict | None = None, timeout: float = 1800) -> list[dict]:
    """Run a benchmark worker; return the JSON objects it printed (launcher prefixes dropped)."""
    full = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    p = subprocess.run(argv, capture_output=True, text=True, env=full, timeout=timeout,
                       cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"{argv} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                           f"{p.stderr[-5000:]}")
    return json_lines(p.stdout)


def json_lines(text: str) -> list[dict]:
    """The JSON objects in a worker's output (launcher prefixes dropped, other lines skipped)."""
    out = []
    for line in text.splitlines():
        if "{" in line:
            try:
                out.append(json.loads(line[line.index("{"):]))
            except json.JSONDecodeError:
                pass
    return out


def now() -> float:
    return time.perf_counter()

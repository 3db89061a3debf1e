"""Allreduce bus bandwidth and latency, 4 KiB to 64 MiB float32, 2 ranks, per transport.

Each group (mpi4py alone; torch + Horovod; TensorFlow + Horovod) runs in its own ``mpirun -np 2
--bind-to core`` job, on shared-memory Open MPI (``btl self,vader``) and on TCP loopback
(``btl self,tcp``, ``lo``); Horovod groups run with Horovod's default cycle time and with 0.1 ms.
"""

from __future__ import annotations

import numpy as np

from bench.common import emit, mpirun, python, run_json_lines

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 1 << 20]


def run(quick: bool = False, out=None) -> list[dict]:
    sizes = QUICK_SIZES if quick else SIZES
    iters = 5 if quick else 50
    rows = []
    transports = ("shm",) if quick else ("shm", "tcp")
    groups = ("mpi", "torch", "tensorflow", "harness-flat") if quick else \
        ("mpi", "torch", "tensorflow", "harness-optimizer", "harness-flat", "harness-mpi")
    for transport in transports:
        for group in groups:
            cycles = [None] if group in ("mpi", "harness-mpi") or quick else [None, "0.1"]
            for cycle in cycles:
                env = {"HOROVOD_CYCLE_TIME": cycle} if cycle else {}
                argv = mpirun(2, transport) + [python(), "-m", "bench.allreduce_worker", group,
                                               transport, ",".join(map(str, sizes)), str(iters)]
                for r in run_json_lines(argv, env=env):
                    if r.get("kind") == "allreduce":
                        r["horovod_cycle_time_ms"] = cycle or "default (1)"
                        rows.append(r)
                        emit(r, out)
    summarize(rows, out)
    rows += target_check(quick, out)
    return rows


def target_check(quick: bool, out=None, repeats: int = 5) -> list[dict]:
    """The harness's fastest gradient path against mpi4py for messages >= 4 MiB, launches
    interleaved (mpi4py, flat with the harness's default yield, flat without) so that the
    ratios compare measurements taken minutes apart at most."""
    sizes = [4 << 20] if quick else [4 << 20, 16 << 20, 64 << 20]
    repeats = 1 if quick else repeats
    variants = [("mpi", "mpi4py", {}), ("harness-flat", "harness_flat (yield, default)", {}),
                ("harness-flat", "harness_flat (no yield)", {"OMPI_MCA_mpi_yield_when_idle": "0"})]
    rows = []
    for transport in (("shm",) if quick else ("shm", "tcp")):
        samples: dict[tuple[str, int], list[float]] = {}
        for _ in range(repeats):
            for group, label, env in variants:
                argv = mpirun(2, transport) + [python(), "-m", "bench.allreduce_worker", group,
                                               transport, ",".join(map(str, sizes)), "40"]
                for r in run_json_lines(argv, env=env):
                    if r.get("kind") == "allreduce":
                        samples.setdefault((label, r["bytes"]), []).append(r["busbw_GBps"])
        for _, label, _ in variants[1:]:
            for size in sizes:
                ratios = [a / b for a, b in zip(samples[(label, size)],
                                                samples[("mpi4py", size)])]
                row = {"kind": "allreduce_target", "transport": transport, "path": label,
                       "bytes": size, "launch_pairs": len(ratios),
                       "busbw_vs_mpi4py_median": float(np.median(ratios)),
                       "min": min(ratios), "max": max(ratios)}
                rows.append(row)
                emit(row, out)
    return rows


def summarize(rows: list[dict], out=None) -> None:
    """Ratio of each implementation's bus bandwidth to mpi4py's, same size and transport."""
    ref = {(r["transport"], r["bytes"]): r["busbw_GBps"] for r in rows if r["impl"] == "mpi4py"}
    for r in rows:
        base = ref.get((r["transport"], r["bytes"]))
        if r["impl"] == "mpi4py" or not base:
            continue
        emit({"kind": "allreduce_ratio", "impl": r["impl"], "group": r["group"],
              "transport": r["transport"], "bytes": r["bytes"],
              "horovod_cycle_time_ms": r["horovod_cycle_time_ms"],
              "busbw_vs_mpi4py": r["busbw_GBps"] / base}, out)

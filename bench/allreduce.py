"""Allreduce bus bandwidth and latency, 4 KiB to 64 MiB float32, 2 ranks, per transport.

Each group (mpi4py alone; torch + Horovod; TensorFlow + Horovod) runs in its own ``mpirun -np 2
--bind-to core`` job, on shared-memory Open MPI (``btl self,vader``) and on TCP loopback
(``btl self,tcp``, ``lo``); Horovod groups run with Horovod's default cycle time and with 0.1 ms.
The harness's groups start with ``OMPI_MCA_mpi_yield_when_idle=1`` (what ``harness train``
applies), the others with 0 (Open MPI's default), given to the ranks by ``mpirun -x`` so that it
is in place before ``MPI_Init``. The target check (harness_flat against mpi4py, interleaved) is
its own benchmark: bench/allreduce_target.py.
"""

from __future__ import annotations

from bench.common import emit, mpirun, python, run_json_lines

YIELD = "OMPI_MCA_mpi_yield_when_idle"

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 1 << 20]


def run(quick: bool = False, out=None) -> list[dict]:
    sizes = QUICK_SIZES if quick else SIZES
    iters = 5 if quick else 50
    rows = []
    transports = ("shm",) if quick else ("shm", "tcp")
    groups = ("mpi", "torch", "tensorflow", "harness-flat") if quick else \
        ("mpi", "torch", "tensorflow", "harness-optimizer", "harness-flat", "harness-tf-flat",
         "harness-mpi")
    for transport in transports:
        for group in groups:
            cycles = [None] if group in ("mpi", "harness-mpi") or quick else [None, "0.1"]
            for cycle in cycles:
                env = {"HOROVOD_CYCLE_TIME": cycle} if cycle else {}
                env[YIELD] = "1" if group.startswith("harness-") else "0"
                argv = mpirun(2, transport) + ["-x", YIELD, python(), "-m",
                                               "bench.allreduce_worker", group, transport,
                                               ",".join(map(str, sizes)), str(iters)]
                for r in run_json_lines(argv, env=env):
                    if r.get("kind") == "allreduce":
                        r["horovod_cycle_time_ms"] = cycle or "default (1)"
                        rows.append(r)
                        emit(r, out)
    summarize(rows, out)
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

"""The default gradient exchange of each framework against mpi4py, 4-64 MiB on shared memory:
``mpi4py``, the harness's PyTorch flat exchange and its TensorFlow flat exchange, each group in
its own ``mpirun -np 2 --bind-to core`` job (bench/allreduce_worker.py), the three groups
interleaved over ``launches`` rounds (``--launches``, default 3); the busbw ratio to mpi4py is
taken per round.
"""

from __future__ import annotations

from bench.allreduce import YIELD
from bench.common import emit, mpirun, python, run_json_lines, spread

SIZES = [4 << 20, 16 << 20, 64 << 20]
GROUPS = ("mpi", "harness-flat", "harness-tf-flat")


def run(quick: bool = False, out=None, launches: int = 3) -> list[dict]:
    sizes, iters, rounds = ([1 << 20], 5, 1) if quick else (SIZES, 50, launches)
    ratios: dict[tuple[str, int], list[float]] = {}
    for i in range(rounds):
        ref: dict[int, float] = {}
        for group in GROUPS:
            env = {YIELD: "0" if group == "mpi" else "1"}     # as harness train sets it
            argv = mpirun(2, "shm") + ["-x", YIELD, python(), "-m", "bench.allreduce_worker",
                                       group, "shm", ",".join(map(str, sizes)), str(iters)]
            for r in run_json_lines(argv, env=env):
                if r.get("kind") != "allreduce":
                    continue
                emit({**r, "kind": "allreduce_flat_sample", "round": i}, out)
                if group == "mpi":
                    ref[r["bytes"]] = r["busbw_GBps"]
                else:
                    ratios.setdefault((r["impl"], r["bytes"]), []).append(
                        r["busbw_GBps"] / ref[r["bytes"]])
    rows = []
    for (impl, nbytes), xs in sorted(ratios.items()):
        row = {"kind": "allreduce_flat", "impl": impl, "transport": "shm", "bytes": nbytes,
               "busbw_vs_mpi4py": spread(xs)}
        rows.append(row)
        emit(row, out)
    return rows

"""The allreduce target check: the harness's default gradient exchange (``harness_flat``: one
in-place Horovod allreduce of the flat gradient buffer) against mpi4py for messages >= 4 MiB,
2 ranks, shared memory and TCP loopback, launches interleaved so that each ratio compares
measurements taken seconds apart.

Each round launches, in turn (the order rotating from round to round):

* ``mpi4py``: the reference, ``OMPI_MCA_mpi_yield_when_idle=0`` (Open MPI's own default);
* ``harness_flat (yield, default)``: ``OMPI_MCA_mpi_yield_when_idle=1``, what ``harness train``
  applies by default;
* ``harness_flat (no yield)``: ``OMPI_MCA_mpi_yield_when_idle=0``;
* ``mpi4py (yield)``: the reference with ``OMPI_MCA_mpi_yield_when_idle=1``, to tell what the
  setting costs Open MPI itself from what it costs Horovod's path.

The variable is put in the launched processes' environment (``mpirun -x``), so it is in place
before ``MPI_Init``: the worker initialises MPI through mpi4py before the harness's own code
could set it. Every worker record carries each rank's value at its start (``env_seen``).

Records: ``allreduce_target_environment`` (versions, load, commit and the code's uncommitted
changes) at the start and at the end, and ``allreduce_target_warning`` if the code changed
between them; ``allreduce_target_sample`` for every launch, path and size (its
median busbw over the iterations); ``allreduce_target`` per transport, path and size: the ratios
busbw / mpi4py's of the same round, their median, min and max.
"""

from __future__ import annotations

import hashlib
import subprocess

import numpy as np

from bench.common import REPO, emit, env_record, mpirun, python, run_json_lines

YIELD = "OMPI_MCA_mpi_yield_when_idle"
VARIANTS = [("mpi", "mpi4py", "0"), ("harness-flat", "harness_flat (yield, default)", "1"),
            ("harness-flat", "harness_flat (no yield)", "0"), ("mpi", "mpi4py (yield)", "1")]


#: the directories whose code a measurement runs (a commit that changes none of them, e.g. one
#: of docs, does not change what was measured)
CODE = ("bench", "harness", "models", "launchers")


def worktree_state() -> dict:
    """What code ran: HEAD, the tree of each code directory at HEAD, and the uncommitted changes
    to them (files, and a hash over ``git diff HEAD`` and the untracked files' contents), so
    that a record from a dirty tree still names what ran."""
    def git(*args: str) -> str:
        p = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
        return p.stdout if p.returncode == 0 else ""

    changes = git("status", "--porcelain", "--", *CODE).splitlines()
    h = hashlib.sha1(git("diff", "HEAD", "--", *CODE).encode())
    for line in sorted(changes):
        if line.startswith("??"):
            path = REPO / line[3:]
            for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if f.is_file() and "__pycache__" not in f.parts:
                    h.update(f.read_bytes())
    return {"git_head": git("rev-parse", "HEAD").strip() or None,
            "code_trees": {d: git("rev-parse", f"HEAD:{d}").strip() or None for d in CODE},
            "code_changes": [line[3:] for line in changes],
            "code_diff_sha1": h.hexdigest() if changes else None}


def environment(stage: str, out=None) -> dict:
    rec = dict(env_record(), kind="allreduce_target_environment", stage=stage, **worktree_state())
    emit(rec, out)
    return rec


def run(quick: bool = False, out=None, repeats: int = 5, iters: int = 80) -> list[dict]:
    sizes = [4 << 20] if quick else [4 << 20, 16 << 20, 64 << 20]
    repeats = 1 if quick else repeats
    start = environment("start", out)
    rows = []
    for transport in (("shm",) if quick else ("shm", "tcp")):
        samples: dict[tuple[str, int], list[float]] = {}
        for launch in range(repeats):
            k = launch % len(VARIANTS)
            for group, label, yield_value in VARIANTS[k:] + VARIANTS[:k]:
                argv = mpirun(2, transport)
                argv += ["-x", YIELD, python(), "-m", "bench.allreduce_worker", group,
                         transport, ",".join(map(str, sizes)), str(iters if not quick else 5)]
                for r in run_json_lines(argv, env={YIELD: yield_value}):
                    if r.get("kind") != "allreduce":
                        continue
                    seen = [e.get(YIELD) for e in r["env_at_start"]]
                    if seen != [yield_value] * r["ranks"]:
                        raise RuntimeError(f"{label}: the ranks started with {YIELD}={seen}, "
                                           f"not {yield_value}")
                    emit({"kind": "allreduce_target_sample", "transport": transport,
                          "launch": launch, "path": label, "group": group, "impl": r["impl"],
                          "bytes": r["bytes"], "iters": r["iters"],
                          "busbw_GBps": r["busbw_GBps"], "time_us_median": r["time_us_median"],
                          "time_us_p10": r["time_us_p10"], "env_seen": r["env_at_start"],
                          "env_after_setup": r["env_after_setup"]}, out)
                    samples.setdefault((label, r["bytes"]), []).append(r["busbw_GBps"])
        for _, label, _ in VARIANTS[1:]:
            for size in sizes:
                ref = samples[("mpi4py", size)]
                ratios = [a / b for a, b in zip(samples[(label, size)], ref)]
                row = {"kind": "allreduce_target", "transport": transport, "path": label,
                       "bytes": size, "launch_pairs": len(ratios),
                       "busbw_vs_mpi4py_median": float(np.median(ratios)),
                       "min": min(ratios), "max": max(ratios),
                       "busbw_GBps_median": float(np.median(samples[(label, size)])),
                       "mpi4py_busbw_GBps_median": float(np.median(ref)),
                       "ratios": ratios}
                rows.append(row)
                emit(row, out)
    end = environment("end", out)
    same = ("code_trees", "code_diff_sha1")
    if [start[k] for k in same] != [end[k] for k in same]:
        emit({"kind": "allreduce_target_warning",
              "message": f"the code changed during the run: {start['git_commit']} "
                         f"{start['code_changes']} at the start, {end['git_commit']} "
                         f"{end['code_changes']} at the end"}, out)
    return rows

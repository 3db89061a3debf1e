"""Tensor fusion: 100 tensors of 40 KiB allreduced per round, Horovod's default fusion against
fusion disabled (HOROVOD_FUSION_THRESHOLD=0), and the harness's answer (the tensors as views of
one buffer, one in-place allreduce, HOROVOD_WAKE_ON_ENQUEUE=1), 2 ranks, shared memory and TCP.

The fused and unfused settings run stock Horovod (its 1 ms cycle). The ">= 3x fused over unfused"
target is retired: on one host fusion does not pay (docs/benchmarks.md, section 5); this
measurement stays as the record of why."""

from __future__ import annotations

from bench.common import emit, mpirun, python, run_json_lines


def run(quick: bool = False, out=None) -> list[dict]:
    rounds = 5 if quick else 50
    rows = []
    for transport in (("shm",) if quick else ("shm", "tcp")):
        res = {}
        for label, env in (("fused", {}), ("unfused", {"HOROVOD_FUSION_THRESHOLD": "0"}),
                           ("harness_flat", {"BENCH_FLAT": "1", "HOROVOD_WAKE_ON_ENQUEUE": "1"})):
            argv = mpirun(2, transport, bind="core") + [
                python(), "-m", "bench.fusion_worker", "100", "10240", str(rounds)]
            r = [x for x in run_json_lines(argv, env=env) if x.get("kind") == "fusion_round"][0]
            r.update(setting=label, transport=transport)
            res[label] = r
            emit(r, out)
        row = {"kind": "fusion", "transport": transport, "tensors": 100, "tensor_bytes": 40960,
               "fused_round_ms": res["fused"]["round_ms_median"],
               "unfused_round_ms": res["unfused"]["round_ms_median"],
               "speedup": res["unfused"]["round_ms_median"] / res["fused"]["round_ms_median"],
               "flat_round_ms": res["harness_flat"]["round_ms_median"],
               "flat_speedup_vs_unfused": (res["unfused"]["round_ms_median"] /
                                           res["harness_flat"]["round_ms_median"])}
        rows.append(row)
        emit(row, out)
    return rows

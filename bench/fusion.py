"""Tensor fusion: 100 tensors of 40 KiB allreduced per round, Horovod's default fusion against
fusion disabled (HOROVOD_FUSION_THRESHOLD=0), 2 ranks."""

from __future__ import annotations

from bench.common import emit, mpirun, python, run_json_lines


def run(quick: bool = False, out=None) -> list[dict]:
    rounds = 5 if quick else 50
    res = {}
    for label, env in (("fused", {}), ("unfused", {"HOROVOD_FUSION_THRESHOLD": "0"})):
        argv = mpirun(2, bind="core") + [python(), "-m", "bench.fusion_worker", "100", "10240",
                                         str(rounds)]
        r = [x for x in run_json_lines(argv, env=env) if x.get("kind") == "fusion_round"][0]
        r["setting"] = label
        res[label] = r
        emit(r, out)
    row = {"kind": "fusion", "tensors": 100, "tensor_bytes": 40960,
           "fused_round_ms": res["fused"]["round_ms_median"],
           "unfused_round_ms": res["unfused"]["round_ms_median"],
           "speedup": res["unfused"]["round_ms_median"] / res["fused"]["round_ms_median"]}
    emit(row, out)
    return [row]

"""Every benchmark still runs (at a tiny size); the measurements themselves are in
docs/benchmarks.md and are not asserted here."""

from __future__ import annotations

import json

import pytest

from conftest import harness, needs_horovod, needs_mpi, run

pytestmark = [needs_horovod, needs_mpi, pytest.mark.mpi]

EXPECTED = {"allreduce": {"allreduce", "allreduce_ratio"}, "overhead": {"overhead"},
            "scaling": {"scaling"}, "async_sync": {"async_vs_sync"}, "fusion": {"fusion"}}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_benchmark_runs(name, tmp_path):
    out = tmp_path / "bench.jsonl"
    run(harness("bench", name, "--quick", "--out", out), timeout=600, check=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert EXPECTED[name] <= kinds, kinds
    env = [r for r in records if r["kind"] == "environment"]
    assert [e["stage"] for e in env] == ["before", "after"]
    assert env[0]["versions"]["horovod"] == "0.28.1" and env[0]["loadavg"] is not None

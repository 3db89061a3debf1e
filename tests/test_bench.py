"""Every benchmark still runs (at a tiny size); the measurements themselves are in
docs/benchmarks.md and are not asserted here."""

from __future__ import annotations

import json

import pytest

from bench.slowlink import available
from harness.env import cores_per_rank
from conftest import harness, needs_horovod, needs_mpi, run


EXPECTED = {"allreduce": {"allreduce", "allreduce_ratio"},
            "allreduce_target": {"allreduce_target_environment", "allreduce_target_sample",
                                 "allreduce_target"},
            "overhead": {"bookkeeping", "overhead_pair", "overhead"},
            "scaling": {"scaling"}, "async_sync": {"async_vs_sync"}, "fusion": {"fusion"},
            "peers": {"peer_pair", "peers"},
            "main_job": {"main_job_run", "main_job", "idle_cycle_pair", "idle_cycle"},
            "allreduce_flat": {"allreduce_flat_sample", "allreduce_flat"},
            "compression": {"compression_run", "compression_row"},
            "threads": {"threads_pair", "threads"}, "paths": {"path_pair", "path"}}


@pytest.mark.parametrize("args, message", [
    (("allreduce", "--launches", "5"), "--launches applies to none of these"),
    (("overhead", "--launches", "0"), "give 1 or more"),
    (("allreduce", "--models", "gpt"), "--models applies to none of these"),
    (("peers", "--models", "gpt2"), "peers has no step plan for 'gpt2'"),
])
def test_bench_options_are_checked_before_anything_is_written(args, message, tmp_path):
    out = tmp_path / "bench.jsonl"
    p = run(harness("bench", *args, "--out", out), timeout=60)
    assert p.returncode == 2 and message in p.stderr
    assert not out.exists()


@needs_horovod
@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("name", list(EXPECTED))
def test_benchmark_runs(name, tmp_path):
    if name == "compression" and available() is not None:
        pytest.skip(f"the slow link needs network namespaces: {available()}")
    if name == "threads" and cores_per_rank(1) < 2:
        pytest.skip("one core: no second thread to compare")
    out = tmp_path / "bench.jsonl"
    run(harness("bench", name, "--quick", "--out", out), timeout=600, check=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert EXPECTED[name] <= kinds, kinds
    env = [r for r in records if r["kind"] == "environment"]
    assert [e["stage"] for e in env] == ["before", "after"]
    assert env[0]["versions"]["horovod"] == "0.28.1" and env[0]["loadavg"] is not None
    check = RAW_CHECKS.get(name)
    if check is not None:
        check(records)


def check_overhead(records: list[dict]) -> None:
    """Both sides' wall clock over the same steps, one pair per launch."""
    pairs = [r for r in records if r["kind"] == "overhead_pair"]
    row = [r for r in records if r["kind"] == "overhead"][0]
    assert len(pairs) == row["launches"] and row["method"] == "wall"
    for p in pairs:
        assert p["method"] == "wall" and p["harness_wall_s"] > 0 and p["bare_wall_s"] > 0
        assert p["ratio"] == pytest.approx(p["harness_wall_s"] / p["bare_wall_s"])
        # the harness's default path: mpi4py for PyTorch on CPU at np=2 (allreduce = auto)
        assert p["harness_gradient_path"] == "mpi" and p["harness_grad_exchange"] is None
        assert p["bare_env"]["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert row["steps_timed"] == row["steps"] - row["warmup"] > 0


def check_allreduce_target(records: list[dict]) -> None:
    """Every launch's sample is kept, each rank started with the yield setting its path names,
    and the environment (commit included) is recorded at the start and at the end."""
    samples = [r for r in records if r["kind"] == "allreduce_target_sample"]
    rows = [r for r in records if r["kind"] == "allreduce_target"]
    paths = {"mpi4py": "0", "harness_flat (yield, default)": "1", "harness_flat (no yield)": "0",
             "mpi4py (yield)": "1"}
    assert {s["path"] for s in samples} == set(paths)
    for s in samples:
        assert s["busbw_GBps"] > 0
        assert [e["OMPI_MCA_mpi_yield_when_idle"] for e in s["env_seen"]] == \
            [paths[s["path"]]] * 2
    for r in rows:
        mine = [s for s in samples if (s["transport"], s["path"], s["bytes"]) ==
                (r["transport"], r["path"], r["bytes"])]
        assert len(mine) == len(r["ratios"]) == r["launch_pairs"]
    env = [r for r in records if r["kind"] == "allreduce_target_environment"]
    assert [e["stage"] for e in env] == ["start", "end"]
    assert all(e["git_commit"] and e["git_head"] for e in env)


def check_threads(records: list[dict]) -> None:
    """Each round runs the 1-rank job at one thread, then at every core the harness gives it,
    and the ceiling is the all-cores step over the 1-thread step of the same round."""
    pairs = [r for r in records if r["kind"] == "threads_pair"]
    row = [r for r in records if r["kind"] == "threads"][0]
    cores = row["cores"]
    assert [p["threads_per_rank"] for p in pairs] == [1, cores] * row["launches"]
    assert all(p["step_time_p50_s"] >= p["compute_s"] > 0 for p in pairs)
    ratio = pairs[1]["step_time_p50_s"] / pairs[0]["step_time_p50_s"]
    assert row["e2_ceiling"]["median"] == pytest.approx(ratio)
    assert row[f"step_time_p50_s_{cores}_threads"] == pairs[1]["step_time_p50_s"]


def check_paths(records: list[dict]) -> None:
    """Each round runs every path once; auto says which path it resolved to (PyTorch at np=2
    under horovodrun's MPI: mpi4py), and each ratio is against Horovod's run of its round."""
    pairs = [r for r in records if r["kind"] == "path_pair"]
    assert [p["allreduce"] for p in pairs] == ["horovod", "mpi", "auto"]
    assert [p["gradient_path"] for p in pairs] == ["horovod", "mpi", "mpi"]
    assert [p["position"] for p in pairs] == [0, 1, 2]          # round 0: the listed order
    assert all(p["wall_s"] > 0 and p["steps"] > p["warmup"] for p in pairs)
    for p in pairs:
        assert p["ratio_to_horovod"] == pytest.approx(p["samples_per_s"] /
                                                      pairs[0]["samples_per_s"])


RAW_CHECKS = {"overhead": check_overhead, "allreduce_target": check_allreduce_target,
              "threads": check_threads, "paths": check_paths}


def test_the_paths_benchmark_rotates_its_order_from_round_to_round():
    """Found by a review: every round ran Horovod first, so its runs alone met a cold start."""
    from bench.paths import rotated

    orders = [rotated(("horovod", "mpi", "auto"), i) for i in range(4)]
    assert orders[:3] == [("horovod", "mpi", "auto"), ("mpi", "auto", "horovod"),
                          ("auto", "horovod", "mpi")]
    assert orders[3] == orders[0]
    assert {o[0] for o in orders[:3]} == {"horovod", "mpi", "auto"}

"""Resume that must not corrupt, crash or lose work (issue 12, items 1-5, 8, 9).

The preempt/resume matrix over frameworks, gradient paths and signal positions is in
test_resume_matrix.py; these are the cases around it: crash recovery on the flat exchange,
ranks that drift apart, a different world size or optimizer on resume, a finished run run
again, and ``resume = PATH`` under requeue.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import checkpoint_weights, harness, latest_checkpoint, launch, needs_horovod, \
    needs_mpi, read_jsonl, run
from harness import checkpoint as ck

pytestmark = [needs_horovod, needs_mpi]
#: the tests that launch several ranks; the others are one process each (make test's first
#: part runs them beside each other)
job, one_process = pytest.mark.mpi, pytest.mark.framework

BATCH, SPE = 16, 5


def args_for(world: int, *extra, epochs: int = 3, global_batch: int | None = None,
             samples: int | None = None) -> list:
    """mlp on synthetic data with SPE steps per epoch at ``world`` ranks (or at the global
    batch given)."""
    g = global_batch or BATCH * world
    return ["--framework", "torch", "--model", "mlp", "--dataset", "synthetic",
            "--synthetic-samples", samples or SPE * g + 3, "--epochs", epochs, "--agree-every", 1,
            "--log-every", 1000, *(["--global-batch-size", g] if global_batch else
                                   ["--batch-size", BATCH]), *extra]


def files_of(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def assert_same_weights(a_dir, b_dir, atol: float = 1e-6) -> None:
    a = checkpoint_weights(latest_checkpoint(a_dir))
    b = checkpoint_weights(latest_checkpoint(b_dir))
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


@job
def test_flat_exchange_resumes_in_sync_after_a_crash(results):
    """Item 1: a restored optimizer used to take the gradients out of the flat buffer on the
    ranks that broadcast_optimizer_state initialised, so they trained on stale gradients."""
    common = args_for(2, "--grad-exchange", "flat", "--out-dir", results)
    crash_step = SPE + 3                               # mid-epoch 2: resume from step SPE
    p = run(launch("mpirun", 2, *common, "--run-name", "fc"),
            env={"HARNESS_FAULT": f"raise@1:{crash_step}"}, timeout=180)
    assert p.returncode not in (0, 2, 75), p.stderr[-3000:]
    assert ck.load_latest(results / "fc" / "checkpoints").step == SPE
    r = run(launch("mpirun", 2, *common, "--run-name", "fc"), timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"at step {SPE}" in r.stderr
    run(launch("mpirun", 2, *common, "--run-name", "ref"), timeout=180, check=True)
    s = json.loads((results / "fc" / "summary.json").read_text())
    assert s["ranks_consistent"] and s["weights_spread"] == 0.0
    assert_same_weights(results / "fc", results / "ref")


@job
def test_ranks_that_drift_apart_fail_the_run(results):
    """Item 2: one rank's weights nudged once; the run must fail and say by how much."""
    p = run(launch("mpirun", 2, *args_for(2, "--out-dir", results, "--run-name", "drift",
                                              epochs=1)),
            env={"HARNESS_FAULT": "desync@1:2"}, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode == 3, f"exit {p.returncode}\n{out[-3000:]}"
    assert "ranks ended with different weights (checksum spread" in out
    s = json.loads((results / "drift" / "summary.json").read_text())
    assert s["ranks_consistent"] is False and s["weights_spread"] > 0
    # (without the nudge the same runs are consistent: every cell of test_resume_matrix.py)


def preempt(world: int, args: list, step: int) -> None:
    argv = harness("train", *args) if world == 1 else launch("mpirun", world, *args)
    p = run(argv, env={"HARNESS_FAULT": f"sigusr1@0:{step}"}, timeout=180)
    assert p.returncode == 75, p.stderr[-3000:]


@job
def test_other_world_size_on_resume_is_refused_when_the_plan_changes(results):
    """Item 4: per-rank batch at np=2 -> np=1 halves the global batch (the position in the
    data no longer maps): refused before anything is written, exit 2, one line."""
    n = SPE * 2 * BATCH + 3                        # the same data at both sizes
    preempt(2, args_for(2, "--out-dir", results, "--run-name", "w", samples=n), 3)
    before = files_of(results / "w")
    p = run(harness("train", *args_for(1, "--out-dir", results, "--run-name", "w", samples=n)))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "global batch of 32" in p.stderr and "this run has 16" in p.stderr
    assert len(error_lines(p.stderr)) == 1, p.stderr
    assert files_of(results / "w") == before

    # same global batch, but the linearly scaled learning rate would change with the ranks
    g = ["--out-dir", results, "--run-name", "lin"]
    preempt(2, args_for(2, *g, global_batch=32), 3)
    p = run(harness("train", *args_for(1, *g, global_batch=32)))
    assert p.returncode == 2 and "peak lr 0.1" in p.stderr and "peak lr 0.05" in p.stderr, \
        p.stderr[-3000:]


@job
def test_other_world_size_on_resume_continues_when_the_plan_is_the_same(results):
    """Item 4: a requeue onto an allocation of another size goes on exactly when the global
    batch and the learning-rate schedule do not depend on the number of ranks."""
    common = ["--lr-scaling", "none", "--out-dir", results]
    preempt(2, args_for(2, *common, "--run-name", "m", global_batch=32), SPE + 2)
    p = run(harness("train", *args_for(1, *common, "--run-name", "m", global_batch=32)),
            timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "was written by 2 rank(s), this run has 1" in p.stderr
    run(launch("mpirun", 2, *args_for(2, *common, "--run-name", "ref", global_batch=32)),
        timeout=180, check=True)
    recs = [r for r in read_jsonl(results / "m" / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in recs] == list(range(1, 3 * SPE + 1))     # none lost, none twice
    assert_same_weights(results / "m", results / "ref", atol=1e-5)    # np=1 x 2B == np=2 x B


@one_process
def test_other_optimizer_on_resume_is_refused_before_anything_is_written(results):
    """Item 5: it crashed with KeyError after config.json and metrics.jsonl were written."""
    g = ["--allreduce", "local", "--out-dir", results, "--run-name", "o"]
    preempt(1, args_for(1, *g), 3)
    before = files_of(results / "o")
    p = run(harness("train", *args_for(1, *g, "--optimizer", "adam")))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "holds sgd optimizer state" in p.stderr and "optimizer = 'adam'" in p.stderr
    assert len(error_lines(p.stderr)) == 1 and "Traceback" not in p.stderr, p.stderr
    assert files_of(results / "o") == before
    # found by a new-user hunt: PyTorch's restored optimizer kept momentum 0.9 while
    # config.json said 0.0 (TensorFlow refused with "optimizer state has 8 variables")
    p = run(harness("train", *args_for(1, *g, "--momentum", "0.0")))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "written with momentum = 0.9, this run has momentum = 0.0" in p.stderr, p.stderr
    assert len(error_lines(p.stderr)) == 1 and files_of(results / "o") == before


@one_process
def test_finished_run_is_left_as_it_is(results):
    """Item 8: the same command again used to overwrite summary.json with 0 samples/s."""
    a = args_for(1, "--allreduce", "local", "--out-dir", results, "--run-name", "f")
    run(harness("train", *a), check=True)
    before = files_of(results / "f")
    p = run(harness("train", *a))
    assert p.returncode == 0 and "already finished" in p.stderr, p.stderr[-3000:]
    assert files_of(results / "f") == before
    # more epochs: the run continues from its last checkpoint
    p = run(harness("train", *args_for(1, "--allreduce", "local", "--out-dir", results,
                                       "--run-name", "f", epochs=4)), check=True)
    assert f"at step {3 * SPE}" in p.stderr
    assert json.loads((results / "f" / "summary.json").read_text())["steps"] == 4 * SPE


@one_process
def test_resume_path_gives_way_to_the_run_folders_newer_checkpoint(results):
    """Item 9: a requeued `--resume PATH` job went back to PATH and lost its progress."""
    local = ["--allreduce", "local", "--out-dir", results]
    run(harness("train", *args_for(1, *local, "--run-name", "src", epochs=1)), check=True)
    src = latest_checkpoint(results / "src")
    a = args_for(1, *local, "--run-name", "ft", "--resume", src)
    preempt(1, a, SPE + 3)
    p = run(harness("train", *a), check=True)
    assert "newer checkpoint" in p.stderr and f"at step {SPE + 3}" in p.stderr, p.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(results / "ft" / "metrics.jsonl")
             if r["kind"] == "step"]
    assert steps == list(range(SPE + 1, 3 * SPE + 1))     # each step once: nothing redone


@one_process
def test_requeued_job_continues_its_own_run_despite_resume_never(results):
    """A requeued SLURM job (SLURM_RESTART_COUNT > 0) reruns its command line: with
    resume = 'never' it used to refuse its own checkpoints and fail the requeue."""
    a = args_for(1, "--allreduce", "local", "--resume", "never", "--out-dir", results,
                 "--run-name", "rq")
    preempt(1, a, SPE + 2)
    p = run(harness("train", *a))
    assert p.returncode == 2 and "resume = 'never'" in p.stderr      # a user's rerun: refused
    p = run(harness("train", *a), env={"SLURM_RESTART_COUNT": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "requeued job" in p.stderr and f"at step {SPE + 2}" in p.stderr

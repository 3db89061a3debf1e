"""Asynchronous parameter server on mpi4py, launched with mpirun -np 3 / -np 4."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import (FRAMEWORKS, checkpoint_weights, fw_check, latest_checkpoint, launch,
                      needs_horovod, needs_mpi, read_jsonl, run, summary)
from harness import checkpoint as ck

pytestmark = [needs_mpi, pytest.mark.mpi]

EXACT = ["--model", "mlp", "--mode", "async", "--threads-per-rank", "1", "--max-steps", "25",
         "--eval-every", "0", "--lr", "0.05", "--momentum", "0.9", "--weight-decay", "0.0001"]


def ps(np_, *args, env=None, timeout=240, check=True):
    return run(launch("mpirun", np_, *args), timeout=timeout, env=env, check=check)


def server_params(run_dir, servers=1) -> np.ndarray:
    parts = []
    for k in range(servers):
        c = ck.load(latest_checkpoint(run_dir, f"ps-server{k}"))
        parts.append(c.weights["params"])
    return np.concatenate(parts)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_one_async_worker_is_bit_identical_to_serial_sgd(fw, results, tmp_path):
    ps(2, "--framework", fw, *EXACT, "--ps-consistency", "async", "--out-dir", results,
       "--run-name", "one")
    fw_check(fw, "serial_sgd", tmp_path / "serial.npy", "25", *EXACT)
    np.testing.assert_array_equal(server_params(results / "one"), np.load(tmp_path / "serial.npy"))


@pytest.mark.parametrize("fw, method", [("torch", "topk"), ("tensorflow", "int8")])
def test_a_compressed_push_applies_what_a_serial_reference_compresses(fw, method, results,
                                                                     tmp_path):
    """One worker pushing to two servers with top-k (5%) or int8 and error feedback ends with
    the parameters of serial SGD on the same gradients compressed shard by shard by the test's
    own NumPy, and its summary counts the compressed bytes."""
    flags = [*EXACT, "--ps-servers", "2", "--compression", method, "--compression-ratio", "0.05"]
    ps(3, "--framework", fw, *flags, "--ps-consistency", "async", "--out-dir", results,
       "--run-name", method)
    fw_check(fw, "serial_sgd", tmp_path / "serial.npy", "25", *flags)
    got, want = server_params(results / method, servers=2), np.load(tmp_path / "serial.npy")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    fw_check(fw, "serial_sgd", tmp_path / "dense.npy", "25", *EXACT)
    assert np.abs(got - np.load(tmp_path / "dense.npy")).max() > 1e-3   # compression did act
    s = summary(results / method)
    n = s["dense_bytes_per_step"] // 4
    halves = [n // 2, n - n // 2]                       # the two servers' shards
    want_bytes = sum(8 * int(np.ceil(0.05 * h)) if method == "topk" else
                     -(-h // 512) * (512 + 4) for h in halves)
    assert s["compression"] == method and s["sent_bytes_per_step"] == want_bytes


@needs_horovod
def test_bsp_equals_sync_allreduce_and_shards_change_nothing(results):
    common = ["--framework", "torch", "--model", "mlp", "--threads-per-rank", "1",
              "--max-steps", "20", "--eval-every", "0", "--out-dir", results, "--batch-size", "16"]
    ps(3, *common, "--mode", "async", "--ps-consistency", "bsp", "--run-name", "bsp1")
    ps(4, *common, "--mode", "async", "--ps-consistency", "bsp", "--ps-servers", "2",
       "--run-name", "bsp2")
    run(launch("horovodrun", 2, *common, "--run-name", "sync"), timeout=240, check=True)
    one, two = server_params(results / "bsp1"), server_params(results / "bsp2", servers=2)
    np.testing.assert_array_equal(one, two)                   # K shards == one server, bitwise
    sync = checkpoint_weights(latest_checkpoint(results / "sync"))
    from models import get_spec
    # the servers' vector is the model's trainable parameters in order (PyTorch: the spec's)
    trainable = [p.name for p in get_spec("mlp").trainable]
    flat_sync = np.concatenate([sync[n].ravel() for n in trainable])
    np.testing.assert_allclose(one, flat_sync, rtol=1e-5, atol=1e-6)
    init = get_spec("mlp").init_weights(0)
    assert not np.array_equal(one, np.concatenate([init[n].ravel() for n in trainable]))


def test_ssp_never_exceeds_its_bound(results):
    """A 4x straggler makes the fast worker run ahead; ssp holds it to the bound, async not."""
    common = ["--framework", "torch", "--mode", "async", "--model", "mlp", "--max-steps", "40",
              "--eval-every", "0",
              "--straggler-rank", "2", "--straggler-factor", "4", "--out-dir", results]
    ps(3, *common, "--ps-consistency", "ssp", "--ps-staleness", "1", "--run-name", "ssp")
    ps(3, *common, "--ps-consistency", "async", "--run-name", "async")
    s_ssp, s_async = summary(results / "ssp"), summary(results / "async")
    assert s_ssp["max_clock_lead"] <= 1
    assert s_async["max_clock_lead"] > 1          # without the bound the lead does grow
    steps = [r for r in read_jsonl(results / "ssp" / "metrics.jsonl") if r["kind"] == "step"]
    staleness = [r["staleness"] for r in steps]
    assert len(staleness) == 80 and max(staleness) == s_ssp["staleness_max"]
    # server 0's TensorBoard events: staleness and push/pull latency at the logged versions
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(results / "ssp" / "tb"))
    ea.Reload()
    logged = [r for r in steps if r["step"] == 1 or r["step"] % 10 == 0]     # log_every = 10
    for tag, key in (("ps/staleness", "staleness"), ("ps/push_pull_latency_s", "latency_s")):
        assert {e.step: e.value for e in ea.Scalars(tag)} == \
            {r["step"]: pytest.approx(r[key], rel=1e-6) for r in logged}, tag


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_async_digits_two_workers_reaches_90_percent(fw, results):
    # asynchrony adds implicit momentum (Mitliagkas et al. 2016): async runs use less
    ps(3, "--framework", fw, "--mode", "async", "--model", "cnn", "--epochs", "5",
       "--momentum", "0.5", "--lr", "0.1", "--out-dir", results, "--run-name", "digits")
    s = summary(results / "digits")
    assert s["final_eval_acc"] >= 0.90
    assert s["workers"] == 2 and s["updates"] == 2 * 5 * (1437 // 64)
    assert s["staleness_mean"] is not None and s["push_pull_latency_p50_s"] > 0
    assert s["samples_per_s_total"] > 0 and s["staleness_histogram"]


def test_killed_worker_stops_the_job_quickly_and_names_the_rank(results):
    start = time.monotonic()
    p = ps(3, "--framework", "torch", "--mode", "async", "--model", "cnn", "--epochs", "20",
           "--checkpoint-every", "10", "--out-dir", results, "--run-name", "killed",
           env={"HARNESS_FAULT": "kill@2:40"}, check=False)
    assert p.returncode != 0
    assert time.monotonic() - start < 30
    out = p.stdout + p.stderr
    assert "rank 2" in out and ("signal 9" in out or "Killed" in out)
    ckpt = ck.load_latest(results / "killed" / "checkpoints", "ps-server0")
    assert ckpt is not None and ckpt.weights["params"].size > 0


def test_worker_exception_continues_with_the_others(results):
    p = ps(3, "--framework", "torch", "--mode", "async", "--model", "mlp", "--epochs", "3",
           "--out-dir", results, "--run-name", "cont", env={"HARNESS_FAULT": "raise@2:10"})
    # "continuing with 1 worker", or 0 when rank 1 finished before rank 2 reached step 10
    assert "worker rank 2 failed at clock 9" in p.stderr and "continuing with" in p.stderr
    s = summary(results / "cont")
    assert "injected fault" in s["failed_workers"]["2"]
    assert s["updates"] == 9 + 3 * (1437 // 64)


def test_worker_exception_aborts_when_configured(results):
    start = time.monotonic()
    p = ps(3, "--framework", "torch", "--mode", "async", "--model", "mlp", "--epochs", "50",
           "--ps-on-worker-failure", "abort", "--out-dir", results, "--run-name", "abort",
           env={"HARNESS_FAULT": "raise@1:10"}, check=False)
    assert p.returncode != 0 and time.monotonic() - start < 60
    assert "worker rank 1 failed" in p.stderr and "aborting the job" in p.stderr


# --- preemption and resume (issue 12, item 10) -------------------------------------------------
# A resumed asynchronous run owes exactly the planned work: every worker ends at the planned
# number of steps, each of its steps applied once on every server (so updates and samples over
# all segments are those of an uninterrupted run), and bsp ends with the same weights.

BATCH, SPE, EPOCHS, WORKERS = 16, 5, 4, 2
SAMPLES = SPE * BATCH * WORKERS + 3        # SPE steps per epoch per worker, 3 samples left over


def preempt_args(consistency: str, *extra) -> list:
    return ["--framework", "torch", "--mode", "async", "--model", "mlp", "--dataset", "synthetic",
            "--synthetic-samples", SAMPLES, "--batch-size", BATCH, "--epochs", EPOCHS,
            "--ps-consistency", consistency, "--threads-per-rank", "1", "--eval-every", "0",
            "--log-every", "1000", *extra]


def plan(consistency: str) -> dict:
    """What the whole run owes, from the data and the config."""
    steps = EPOCHS * (SAMPLES // (BATCH * WORKERS))
    return {"steps": steps, "updates": steps if consistency == "bsp" else WORKERS * steps,
            "samples": WORKERS * steps * BATCH}


def stopped_cut(run_dir, servers: int) -> dict:
    """Every server's newest checkpoint after a preemption: the same pushes (a consistent cut)."""
    metas = [ck.load(latest_checkpoint(run_dir, f"ps-server{k}")).meta["position"]
             for k in range(servers)]
    for m in metas[1:]:
        assert (m["step"], m["clocks"], m["samples"]) == \
            (metas[0]["step"], metas[0]["clocks"], metas[0]["samples"]), metas
    return metas[0]


def preempt_then_resume(results, name: str, np_: int, args: list, fault: str, consistency: str,
                        servers: int = 1, before_resume=None) -> tuple[dict, dict, str]:
    """Run with the fault (must exit 75, every server checkpointed the same cut), run the same
    command again, and check the whole run did exactly the planned work. Returns the workers'
    clocks at the stop, the final summary and the resumed job's stderr."""
    want = plan(consistency)
    run_dir = results / name
    cmd = [*args, "--out-dir", results, "--run-name", name]
    p = ps(np_, *cmd, env={"HARNESS_FAULT": fault}, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 75, f"exit {p.returncode}\n{out[-4000:]}"
    assert "MPI_ABORT" not in out and "Traceback" not in out, out[-4000:]
    assert not (run_dir / "summary.json").exists()
    cut = stopped_cut(run_dir, servers)
    clocks = {int(r): c for r, c in cut["clocks"].items()}
    assert sorted(clocks) == list(range(servers, servers + WORKERS))
    # a worker may have finished before the stop (async); then it waited, and exits 75 too
    assert all(0 <= c <= want["steps"] for c in clocks.values()) and \
        min(clocks.values()) < want["steps"], clocks
    assert cut["samples"] == sum(clocks.values()) * BATCH
    assert cut["step"] == (max(clocks.values()) if consistency == "bsp" else sum(clocks.values()))
    if consistency == "bsp":                            # bsp finishes the clock in progress
        assert len(set(clocks.values())) == 1, clocks
    if before_resume:
        before_resume(run_dir)
    resumed = ps(np_, *cmd)                             # resume = "auto"
    s = summary(run_dir)
    assert (s["updates"], s["samples"]) == (want["updates"], want["samples"]), s
    assert s["worker_clocks"] == {str(w): want["steps"] for w in clocks}
    # each worker's steps were applied once each: none repeated, none lost
    steps = [(r["worker"], r["clock"]) for r in read_jsonl(run_dir / "metrics.jsonl")
             if r["kind"] == "step"]
    assert sorted(steps) == [(w, c) for w in sorted(clocks) for c in range(1, want["steps"] + 1)]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")
            if r["kind"] == "preempted"] == [cut["step"]]
    return clocks, s, resumed.stderr


@pytest.mark.parametrize("consistency", ["async", "ssp", "bsp"])
def test_signal_on_one_worker_preempts_and_the_resumed_run_does_the_planned_work(consistency,
                                                                                  results):
    extra = ["--ps-staleness", "1", "--straggler-rank", "1", "--straggler-factor", "3"] \
        if consistency == "ssp" else []
    args = preempt_args(consistency, *extra)
    clocks, s, _ = preempt_then_resume(results, "pre", 3, args, "sigusr1@2:7", consistency)
    assert clocks[2] == 7             # the signalled worker pushes step 7 (flagged), then stops
    if consistency == "ssp":
        assert s["max_clock_lead"] <= 1
    if consistency == "bsp":          # deterministic: the same weights as without the signal
        ps(3, *args, "--out-dir", results, "--run-name", "ref")
        np.testing.assert_array_equal(server_params(results / "pre"),
                                      server_params(results / "ref"))


def test_two_servers_signal_on_server_1_only(results):
    """Server 1 alone gets the signal (at a third of the planned updates); its replies carry
    the stop to the workers, which tell server 0."""
    want = plan("async")
    version = want["updates"] // 3
    cut = {}

    def server_1_loses_its_newest_checkpoint(run_dir):
        """As if the job had died between the two servers' writes: server 1 resumes from its
        previous (periodic) checkpoint, behind server 0. Workers continue from the earlier
        clock; server 0 answers the pushes it already holds without applying them again."""
        newest, older = ck.latest_paths(run_dir / "checkpoints", "ps-server1")[:2]
        cut.update(ck.load(older).meta["position"]["clocks"])
        newest.unlink()

    clocks, _, err = preempt_then_resume(
        results, "two", 4, preempt_args("async", "--ps-servers", "2"), f"sigusr1@1:{version}",
        "async", servers=2, before_resume=server_1_loses_its_newest_checkpoint)
    assert sum(clocks.values()) >= version
    assert any(cut[str(r)] < c for r, c in clocks.items()), (cut, clocks)
    assert "the servers' checkpoints hold clocks" in err

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
    from harness.backends.common import FlatLayout
    flat_sync = FlatLayout.of(get_spec("mlp")).flatten(sync)
    np.testing.assert_allclose(one, flat_sync, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(one, FlatLayout.of(get_spec("mlp")).flatten(
        get_spec("mlp").init_weights(0)))


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
    staleness = [r["staleness"] for r in read_jsonl(results / "ssp" / "metrics.jsonl")
                 if r["kind"] == "step"]
    assert len(staleness) == 80 and max(staleness) == s_ssp["staleness_max"]


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
    assert "worker rank 2 failed at clock 9" in p.stderr and "continuing with 1 worker" in p.stderr
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


def test_zero_workers_is_refused(results):
    p = ps(2, "--framework", "torch", "--mode", "async", "--ps-servers", "2", "--out-dir",
           results, check=False)
    assert p.returncode != 0 and "leaves no worker" in p.stderr

"""The sbatch scripts on a real two-node SLURM cluster started on this machine."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (PY, REPO, checkpoint_weights, harness, latest_checkpoint, launch,
                      needs_horovod, read_jsonl, run, summary)
from slurm_cluster import Cluster, available

pytestmark = [pytest.mark.slurm, needs_horovod,
              pytest.mark.skipif(available() is not None, reason=f"SLURM: {available()}")]

CPU_LAYOUT = ["--gpus-per-task=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster().start()
    yield c
    c.stop()


@pytest.fixture
def jobs(cluster, request) -> Path:
    d = cluster.dir / "jobs" / request.node.name.replace("[", "-").replace("]", "")
    d.mkdir(parents=True)
    return d


def submit(cluster, script, *args, layout=("--nodes=2", "--ntasks-per-node=1"), env=None,
           cwd=None):
    env = {"HARNESS_ROOT": str(REPO), "HARNESS_PYTHON": PY, **(env or {})}
    return cluster.sbatch(*layout, *CPU_LAYOUT, f"--chdir={cwd}", str(REPO / "slurm" / script),
                          *args, cwd=cwd, env=env)


def output(cwd: Path, job: int) -> str:
    return "\n".join(p.read_text() for p in cwd.glob(f"slurm-*-{job}.out"))


@pytest.mark.parametrize("fw", ["torch", "tensorflow"])
def test_train_sbatch_across_two_nodes(cluster, jobs, fw):
    job = submit(cluster, "train.sbatch", "--framework", fw, "--model", "mlp", "--epochs", "2",
                 "--out-dir", jobs / "results", cwd=jobs)
    info = cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED", output(jobs, job)
    run_dir = jobs / "results" / f"harness-train-{job}"
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["final_eval_acc"] > 0.8
    rec = read_jsonl(run_dir / "metrics.jsonl")[0]
    assert rec["world"]["launcher"] == "PMIx" and rec["backend"]["gradient_path"] == \
        ("mpi" if fw == "torch" else "horovod")      # allreduce = auto on CPU under PMIx
    assert "node[1-2]" in output(jobs, job)


def test_train_sbatch_with_mpirun_inside_the_allocation(cluster, jobs):
    job = submit(cluster, "train.sbatch", "--framework", "torch", "--model", "mlp", "--epochs",
                 "1", "--out-dir", jobs / "results", cwd=jobs, env={"HARNESS_LAUNCH": "mpirun"})
    info = cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED", output(jobs, job)
    rec = read_jsonl(jobs / "results" / f"harness-train-{job}" / "metrics.jsonl")[0]
    assert rec["world"] == {"size": 2, "launcher": "Open MPI"}


def test_ps_sbatch(cluster, jobs):
    job = submit(cluster, "ps.sbatch", "--framework", "torch", "--model", "mlp", "--epochs", "2",
                 "--momentum", "0.5", "--out-dir", jobs / "results",
                 layout=("--nodes=2", "--ntasks-per-node=2"), cwd=jobs, env={"PS_SERVERS": "1"})
    info = cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED", output(jobs, job)
    s = summary(jobs / "results" / f"harness-ps-{job}")
    assert s["workers"] == 3 and s["updates"] == 3 * 2 * (1437 // 96)
    assert s["final_eval_acc"] > 0.5 and s["staleness_mean"] is not None


def test_harness_launch_sbatch_from_another_folder_asks_for_what_np_says(cluster, jobs):
    """`harness launch --launcher sbatch -np 2` started outside the repository: one node with
    two tasks (not train.sbatch's 2 nodes x 4), the harness found, the run folder relative to
    where it was launched (issue 12, item 17)."""
    p = run(harness("launch", "--launcher", "sbatch", "-np", "2", "--gpus-per-task", "0",
                    "--cpus-per-task", "1", "--", "--framework", "torch", "--model", "mlp",
                    "--epochs", "1", "--out-dir", "my results"),
            env={"SLURM_CONF": str(cluster.conf)}, cwd=jobs, check=True)
    job = int(p.stdout.split()[-1])                  # "Submitted batch job N"
    info = cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED", output(jobs, job)
    assert info["NumNodes"] == "1" and info["NumTasks"] == "2", info
    s = summary(jobs / "my results" / f"harness-train-{job}")
    assert s["world_size"] == 2


def test_compare_sbatch(cluster, jobs):
    job = submit(cluster, "compare.sbatch", "--model", "mlp", "--epochs", "2", cwd=jobs,
                 env={"NP": "2", "OUT_DIR": str(jobs / "cmp")})
    info = cluster.wait(job, timeout=400)
    assert info["JobState"] == "COMPLETED", output(jobs, job)
    report = (jobs / "cmp" / "report.md").read_text()
    for name in ("torch-sync-np2", "tensorflow-sync-np2"):     # np=1 runs: tests/test_report.py
        assert name in report
    assert "srun --mpi=pmix" in report


def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(cluster, jobs):
    args = ["--framework", "torch", "--model", "cnn", "--epochs", "40", "--eval-every", "10",
            "--out-dir", jobs / "results"]
    job = submit(cluster, "train.sbatch", *args, cwd=jobs)
    metrics = jobs / "results" / f"harness-train-{job}" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count('"kind": "step"') >= 100:
            break
        time.sleep(0.2)
    cluster.signal_batch(job, "USR1")          # what --signal=B:USR1@120 sends before the limit
    info = cluster.wait(job, timeout=300)
    log = output(jobs, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log
    for expected in ("preemption warning", "requeueing job", "resuming from"):
        assert expected in log, log
    records = read_jsonl(metrics)
    assert [r["kind"] for r in records].count("run") == 2
    assert any(r["kind"] == "preempted" for r in records)
    # the same run without interruption, launched directly
    run(launch("mpirun", 2, *args[:-1], jobs / "reference", "--run-name", "ref"),
        timeout=300, check=True)
    a = checkpoint_weights(latest_checkpoint(metrics.parent))
    b = checkpoint_weights(latest_checkpoint(jobs / "reference" / "ref"))
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("kind, expected", [("raise", "unexpected error on rank 1"),
                                            ("kill", "task 1")])
def test_rank_crash_under_srun_ends_the_job(cluster, jobs, kind, expected):
    """A rank that raises or is SIGKILLed mid-step: srun (--kill-on-bad-exit) stops the step,
    the job fails within a minute naming the rank, and no rank is left running."""
    start = time.monotonic()
    job = submit(cluster, "train.sbatch", "--framework", "torch", "--model", "mlp", "--epochs",
                 "3", "--out-dir", jobs / "results", cwd=jobs,
                 env={"HARNESS_FAULT": f"{kind}@1:30"})
    info = cluster.wait(job, timeout=120)
    log = output(jobs, job)
    assert info["JobState"] == "FAILED", log
    assert time.monotonic() - start < 60
    assert expected in log, log
    ps = subprocess.run(["pgrep", "-af", f"harness-train-{job}"], capture_output=True, text=True)
    assert not [line for line in ps.stdout.splitlines() if "pgrep" not in line]
    ckpt = latest_checkpoint(jobs / "results" / f"harness-train-{job}")
    assert ckpt.name == "ckpt-000000022.npz"


def test_elastic_sbatch_goes_on_on_one_node_when_the_other_nodes_rank_dies(cluster, jobs):
    """slurm/elastic.sbatch: horovodrun's elastic driver in the allocation, its hosts from
    slurm/elastic_hosts.sh; the rank on node2 is killed at step 15 and the job finishes on
    node1's, every training sample applied exactly once per epoch (tests/elastic_task.py)."""
    job = submit(cluster, "elastic.sbatch", "--task", str(REPO / "tests" / "elastic_task.py")
                 + ":task", "--global-batch-size", "32", "--epochs", "3", "--commit-every",
                 "4", "--threads-per-rank", "1", "--out-dir", jobs / "results", cwd=jobs,
                 env={"HARNESS_FAULT": "kill@1:15", "HOROVOD_GLOO_TIMEOUT_SECONDS": "10"})
    info = cluster.wait(job, timeout=300)
    assert info["JobState"] == "COMPLETED", output(jobs, job)
    run_dir = jobs / "results" / f"harness-elastic-{job}"
    s = summary(run_dir)
    assert [(r["old_size"], r["new_size"], r["reason"]) for r in s["elastic"]["resets"]] == \
        [(2, 1, "rank lost")]
    (w,) = checkpoint_weights(latest_checkpoint(run_dir)).values()
    np.testing.assert_allclose(-w, 3.0, atol=1e-4)
    assert "--host-discovery-script" in output(jobs, job)

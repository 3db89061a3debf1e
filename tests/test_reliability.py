"""Fault injection: crashes, hangs, preemption, storage and numerical faults, bad input, security.

Faults are injected with HARNESS_FAULT=kind@rank:step (harness/faults.py) into real jobs.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time

import numpy as np
import pytest

from conftest import (PY, REPO, checkpoint_weights, harness, latest_checkpoint, launch,
                      needs_horovod, needs_mpi, read_jsonl, run, summary)
from harness import checkpoint as ck
from harness.config import RunConfig
from harness.data import load_dataset
from harness.preemption import EXIT_STALLED, Watchdog


def multiprocess(test):
    """A job of several ranks under horovodrun or mpirun (left out of `make test-unit`)."""
    for mark in (needs_horovod, needs_mpi, pytest.mark.mpi):
        test = mark(test)
    return test


EPOCHS = 3
SHORT = ["--framework", "torch", "--model", "mlp", "--epochs", EPOCHS]
# steps per epoch of SHORT on the digits data (the default batch per rank, the last partial
# global batch dropped), one rank and two
N_TRAIN = len(load_dataset("digits", (8, 8, 1), 10).x_train)
BATCH = RunConfig().batch_size
SPE1, SPE2 = N_TRAIN // BATCH, N_TRAIN // (2 * BATCH)
FAULT_STEP = SPE2 + SPE2 // 2          # mid-epoch 2: the epoch-1 checkpoint is the newest
# the exit codes the README promises: bad input, a run aborted on purpose (NaN, diverged
# ranks), preempted at a checkpoint
EXIT_BAD_INPUT, EXIT_ABORTED, EXIT_PREEMPTED = 2, 3, 75


def leftover_ranks(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


# --- rank crashes -----------------------------------------------------------------------------

# kind: (exit code of the job, what must be in its output). The job's exit code is the failed
# rank's: the harness's 1 for an unexpected error, the fault's os._exit(13), 128 + SIGKILL.
CRASHES = {
    "raise": (1, [r"unexpected error on rank 1\b",
                  rf"injected fault: rank 1 raises at step {FAULT_STEP}\b"]),
    "exit": (13, [r"Exit code:\s+13\n"]),                     # Open MPI's report of the rank
    "kill": (128 + 9, [r"exited on signal 9 \(Killed\)"]),
}


@multiprocess
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
@pytest.mark.parametrize("kind", list(CRASHES))
def test_rank_crash_ends_the_job_and_names_the_rank(launcher, kind, results):
    code, expected = CRASHES[kind]
    name = f"crash-{launcher}-{kind}"
    start = time.monotonic()
    p = run(launch(launcher, 2, *SHORT, "--out-dir", results, "--run-name", name),
            env={"HARNESS_FAULT": f"{kind}@1:{FAULT_STEP}"}, timeout=120)
    elapsed = time.monotonic() - start
    out = p.stdout + p.stderr
    assert p.returncode == code, f"exit {p.returncode}\n{out[-3000:]}"
    assert elapsed < 60
    for pattern in expected:
        assert re.search(pattern, out), f"{pattern!r} not in:\n{out[-3000:]}"
    # our own report ("rank 1"), or Open MPI's process name [[job,1],1] for a rank that died
    # without a word (exit, SIGKILL)
    assert re.search(r"rank 1\b|\[\[\d+,\d+\],1\]", out), out[-3000:]
    time.sleep(1)
    assert not leftover_ranks(name), "ranks left running"
    # the fault came mid-epoch 2: the epoch-1 checkpoint is the last one and it loads
    c = ck.load_latest(results / name / "checkpoints")
    assert c is not None and c.step == SPE2


@multiprocess
@pytest.mark.parametrize("path", ["horovod", "mpi"])
def test_hung_rank_is_reported_and_the_job_stopped(path, results):
    """Rank 1 hangs at step 10; rank 0 waits for its gradients. On either path the waiting
    rank reports later than the hung one (a grace period), so the hung rank names itself and
    the launcher stops the job on it (before, both watchdogs fired together and either might
    speak first; on Horovod, a new-user hunt found, rank 0 too, with no stall report)."""
    start = time.monotonic()
    p = run(launch("horovodrun", 2, *SHORT, "--allreduce", path, "--stall-timeout-s", "8",
                   "--out-dir", results, "--run-name", f"hang-{path}"),
            env={"HARNESS_FAULT": "hang@1:10"}, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == EXIT_STALLED, f"exit {p.returncode}\n{out[-3000:]}"
    assert time.monotonic() - start < 60, out[-3000:]
    assert "rank 1 stalled" in out and "while training at step 9" in out, out[-4000:]
    # the waiting rank, if the launcher has not stopped it yet, speaks after the hung one
    first = out.index("rank 1 stalled")
    assert out.find("rank 0 stalled", 0, first) == -1, out[-4000:]
    # and, if it speaks at all, says that it waited (a grace later)
    said = re.findall(r"rank 0 stalled: .* while (.*) at step", out)
    assert all(s == Watchdog.WAITING for s in said), said
    time.sleep(1)
    assert not leftover_ranks(f"run-name hang-{path}")


# --- preemption -------------------------------------------------------------------------------

@multiprocess
def test_signal_checkpoints_and_resume_is_exact(results):
    """SIGTERM reaches rank 1 only, mid-epoch: all ranks agree at the next agreement point,
    rank 0 checkpoints, the job exits 75; the resumed run ends with the weights of an
    uninterrupted run. (SIGUSR1, as SLURM sends it, is covered by tests/test_slurm.py.)"""
    sig, agree_every, at = "sigterm", 5, SPE2 + 6
    stop = -(-at // agree_every) * agree_every       # the first agreement step from `at` on
    assert stop % SPE2, "the stop must come mid-epoch"
    common = [*SHORT, "--agree-every", agree_every, "--out-dir", results]
    p = run(launch("horovodrun", 2, *common, "--run-name", "pre"),
            env={"HARNESS_FAULT": f"{sig}@1:{at}"}, timeout=120)
    assert p.returncode == EXIT_PREEMPTED, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    assert "stop requested" in p.stderr and f"checkpointing at step {stop}" in p.stderr
    kinds = [r["kind"] for r in read_jsonl(results / "pre" / "metrics.jsonl")]
    assert kinds.count("preempted") == 1 and "summary" not in kinds
    assert ck.load_latest(results / "pre" / "checkpoints").step == stop
    # the resumed and the reference run through mpirun (Horovod as under horovodrun, faster)
    r = run(launch("mpirun", 2, *common, "--run-name", "pre"), timeout=120, check=True)
    assert f"at step {stop}" in r.stderr
    run(launch("mpirun", 2, *common, "--run-name", "ref"), timeout=120, check=True)
    a = checkpoint_weights(latest_checkpoint(results / "pre"))
    b = checkpoint_weights(latest_checkpoint(results / "ref"))
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


@multiprocess
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_sigterm_to_the_launch_command_checkpoints_and_leaves_no_process(results, launcher):
    """A scheduler's SIGTERM to `harness launch` itself (not to a rank): the ranks checkpoint,
    the command exits 75 once they have, and no mpirun or rank is left running. (horovodrun
    runs mpirun under a shell, which used to take the signal and die, leaving the job.)"""
    import signal

    name = f"term-{launcher}"
    log = results / f"{name}.log"
    with log.open("w") as out:
        job = subprocess.Popen(launch(launcher, 2, "--framework", "torch", "--model", "mlp",
                                      "--epochs", 500, "--agree-every", 5, "--out-dir", results,
                                      "--run-name", name), stdout=out, stderr=out, text=True)
        deadline = time.monotonic() + 90
        while "step loop" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=90)
    text, left = log.read_text(), leftover_ranks(f"run-name {name}")
    if left:                                      # not to slow down the tests after this one
        subprocess.run(["pkill", "-KILL", "-f", f"run-name {name}"])
    assert code == EXIT_PREEMPTED, f"exit {code}\n{text[-3000:]}"
    assert "stop requested" in text, text[-3000:]
    step = ck.load_latest(results / name / "checkpoints").step
    kinds = [r["kind"] for r in read_jsonl(results / name / "metrics.jsonl")]
    assert kinds.count("preempted") == 1 and step > 0
    assert not left, left


KILL_DURING_WRITE = """
import os, signal, sys
import numpy as np
from harness import checkpoint as ck
sig = sys.argv[2]
import io
real = np.savez
def slow(f, **arrays):
    buf = io.BytesIO()
    real(buf, **arrays)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.kill(os.getpid(), getattr(signal, sig))   # the signal arrives mid-write
    f.write(data[len(data) // 2:])
np.savez = slow
from harness.preemption import StopFlag
flag = StopFlag().install()
d = __import__("pathlib").Path(sys.argv[1])
ck.save(d, ck.Checkpoint({"position": {"step": 2}}, {"w": np.ones(4, np.float32)}))
print("flag", flag.requested)
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGUSR1"])
def test_signal_during_checkpoint_write_leaves_a_loadable_checkpoint(sig, tmp_path):
    ck.save(tmp_path, ck.Checkpoint({"position": {"step": 1}}, {"w": np.zeros(4, np.float32)}))
    p = run([PY, "-c", KILL_DURING_WRITE, tmp_path, sig])
    latest = ck.load_latest(tmp_path)
    names = sorted(f.name for f in tmp_path.iterdir())
    if sig == "SIGKILL":
        assert p.returncode == -9
        assert latest.step == 1                        # the interrupted write is not visible
        # what is left of it is the writer's temporary file (harness/files.py: atomic_write
        # writes ".<name>.<random>.tmp" beside <name>), never a file under the real name
        real = [n for n in names if not n.startswith(".")]
        temp = [n for n in names if n.startswith(".")]
        assert real == ["ckpt-000000001.npz"] and len(temp) == 1, names
        assert re.fullmatch(r"\.ckpt-000000002\.npz\.[^/]+\.tmp", temp[0]), names
    else:
        assert p.returncode == 0 and "flag True" in p.stdout
        assert latest.step == 2 and latest.weights["w"].sum() == 4   # the write completed
        # and nothing else is left: no temporary file
        assert names == ["ckpt-000000001.npz", "ckpt-000000002.npz"], names


# --- storage faults ---------------------------------------------------------------------------

@pytest.mark.framework
def test_unwritable_output_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    p = run(harness("train", *SHORT, "--allreduce", "local", "--out-dir", blocker / "results"))
    assert p.returncode == EXIT_BAD_INPUT and "is not writable" in p.stderr
    assert "training" not in p.stderr


@pytest.mark.framework
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)], check=True)
    try:
        args = ["--framework", "torch", "--model", "cnn", "--epochs", "40", "--allreduce", "local",
                "--out-dir", mnt, "--run-name", "full", "--log-every", "1000"]
        p = run(harness("train", *args), timeout=300)
        assert p.returncode == EXIT_BAD_INPUT, p.stderr[-3000:]
        assert "No space left on device" in p.stderr and "the disk is full" in p.stderr
        good = ck.load_latest(mnt / "full" / "checkpoints")
        assert good is not None and good.step > 0
        assert not [f for f in (mnt / "full" / "checkpoints").iterdir()
                    if f.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.framework
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(results):
    # checkpoints at the ends of epochs 1 and 2 and at max_steps, mid-epoch 3; two are kept
    stop = 2 * SPE1 + SPE1 // 2
    args = [*SHORT, "--allreduce", "local", "--out-dir", results, "--run-name", "c"]
    run(harness("train", *args, "--max-steps", stop), timeout=120, check=True)
    newest = latest_checkpoint(results / "c")
    assert newest.name == f"ckpt-{stop:09d}.npz"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    p = run(harness("train", *args), timeout=120, check=True)
    assert "skipping unreadable checkpoint" in p.stderr and "corrupt or truncated" in p.stderr
    assert "resuming from" in p.stderr and f"at step {2 * SPE1}" in p.stderr
    assert summary(results / "c")["steps"] == EPOCHS * SPE1


# --- numerical faults -------------------------------------------------------------------------

@multiprocess
@pytest.mark.parametrize("framework, says", [
    ("torch", "non-finite loss (nan)"),
    # found by a new-user hunt: TensorFlow's ReLU and max-pool turn the NaN batch into a
    # finite loss, and its NaN gradients trained on until a checkpoint refused the weights
    ("tensorflow", "non-finite gradients")])
def test_nan_stops_the_run_and_no_nan_checkpoint_is_written(results, framework, says):
    p = run(launch("mpirun", 2, *SHORT, "--framework", framework, "--out-dir", results,
                   "--run-name", "nan"),
            env={"HARNESS_FAULT": f"nan@1:{FAULT_STEP}"}, timeout=120)
    out = p.stderr + p.stdout
    assert p.returncode == EXIT_ABORTED, f"exit {p.returncode}\n{out[-3000:]}"
    assert f"{says} at step {FAULT_STEP}" in out, out[-3000:]
    assert "refusing to checkpoint" not in out
    for path in (results / "nan" / "checkpoints").glob("ckpt-*.npz"):
        assert all(np.isfinite(v).all() for v in ck.load(path).weights.values())
    assert ck.load_latest(results / "nan" / "checkpoints").step == SPE2


@multiprocess
@pytest.mark.parametrize("framework,kind,rank", [("torch", "nan", "*"), ("torch", "nan", "1"),
                                                  ("torch", "inf", "0"),
                                                  ("tensorflow", "inf", "1")])
def test_nan_skip_policy_skips_the_step_on_every_rank_and_finishes(framework, kind, rank,
                                                                   results):
    """A non-finite batch on every rank or on one only: the averaged gradients are not finite
    on any rank, so every rank skips the same update and the ranks end with the same weights
    (a rank that applied it would leave the run with different weights, which fails it)."""
    args = [*SHORT, "--framework", framework, "--nan-policy", "skip"]
    p = run(launch("mpirun", 2, *args, "--out-dir", results, "--run-name", "skip"),
            env={"HARNESS_FAULT": f"{kind}@{rank}:{FAULT_STEP}"}, timeout=180)
    out = p.stderr + p.stdout
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-3000:]}"
    assert f"step {FAULT_STEP}: non-finite gradients, update skipped" in out
    s = summary(results / "skip")
    assert s["skipped_steps"] == 1 and s["steps"] == EPOCHS * SPE2
    assert s["ranks_consistent"] is True and s["weights_spread"] == 0.0
    assert s["final_eval_acc"] > 0.8
    w = checkpoint_weights(latest_checkpoint(results / "skip"))
    assert all(np.isfinite(v).all() for v in w.values())


# --- bad input battery ------------------------------------------------------------------------

def write_npz(path, **change):
    rng = np.random.default_rng(0)
    a = {"x_train": rng.random((64, 8, 8, 1), dtype=np.float32),
         "y_train": rng.integers(0, 10, 64), "x_test": rng.random((16, 8, 8, 1),
                                                                   dtype=np.float32),
         "y_test": rng.integers(0, 10, 16)}
    a.update(change)
    np.savez(path, **a)
    return path


def poisoned(shape, sample: int, value: float) -> np.ndarray:
    x = np.zeros(shape, np.float32)
    x[sample, 2, 3, 0] = value
    return x


BAD_INPUT = {
    "malformed toml": (["--config", "{bad_toml}"], "is not valid TOML"),
    "unknown key": (["--config", "{unknown_key}"], "Did you mean 'epochs'"),
    "wrong type": (["--config", "{wrong_type}"], "lr = 'fast' has the wrong type"),
    "out of range": (["--momentum", "1.5"], "momentum = 1.5 is out of range"),
    "unknown model": (["--model", "vgg"], "model = 'vgg' is not one of"),
    "negative lr": (["--lr", "-0.1"], "lr = -0.1 is out of range"),
    "more ranks than samples": (["--dataset", "npz", "--data-path", "{tiny}", "--batch-size",
                                 "64"], "fewer than one global batch"),
    "missing npz": (["--dataset", "npz", "--data-path", "{missing}"], "does not exist"),
    "wrong shape": (["--dataset", "npz", "--data-path", "{bad_shape}"], "y_train has shape"),
    "wrong dtype": (["--dataset", "npz", "--data-path", "{bad_dtype}"],
                    "labels must be integer"),
    "image model on flat data": (["--model", "cnn", "--dataset", "npz", "--data-path",
                                  "{flat}"], "needs channels-last images"),
    "nan lr": (["--lr", "nan"], "lr = nan is not a finite number"),
    "inf lr": (["--lr", "inf"], "lr = inf is not a finite number"),
    "nan features": (["--dataset", "npz", "--data-path", "{nan_x}"],
                     "x_train holds NaN/Inf (first in sample 7)"),
    "inf features": (["--dataset", "npz", "--data-path", "{inf_x}"],
                     "x_test holds NaN/Inf (first in sample 3)"),
    "corrupt checkpoint": (["--resume", "{corrupt}"], "corrupt or truncated"),
    "checkpoint of another model": (["--model", "cnn", "--run-name", "good"],
                                    "written with model = 'mlp'"),
    "checkpoint of another framework": (["--framework", "tensorflow", "--run-name", "good"],
                                         "written with framework = 'torch'"),
}


# Cases refused after the framework is imported (data and checkpoints are read by then), and
# the one that needs two ranks; the others fail in config validation, in half a second.
AFTER_IMPORT = ("more ranks than samples", "missing npz", "wrong shape", "wrong dtype",
                "image model on flat data", "nan features", "inf features", "corrupt checkpoint",
                "checkpoint of another model", "checkpoint of another framework")
NEEDS_GOOD_RUN = ("checkpoint of another model", "checkpoint of another framework")


def bad_input_case(case: str):
    if case == "more ranks than samples":
        return pytest.param(case, marks=[needs_horovod, needs_mpi, pytest.mark.mpi])
    return pytest.param(case, marks=[pytest.mark.framework] if case in AFTER_IMPORT else [])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "bad.toml").write_text("lr = = 1\n")
    (d / "unknown.toml").write_text("epoch = 3\n")
    (d / "type.toml").write_text('lr = "fast"\n')
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 not really")
    rng = np.random.default_rng(0)
    return {
        "bad_toml": d / "bad.toml", "unknown_key": d / "unknown.toml",
        "wrong_type": d / "type.toml", "missing": d / "missing.npz",
        "tiny": write_npz(d / "tiny.npz", x_train=np.zeros((100, 8, 8, 1), np.float32),
                          y_train=np.zeros(100, np.int64)),
        "bad_shape": write_npz(d / "shape.npz", y_train=rng.integers(0, 10, 10)),
        "bad_dtype": write_npz(d / "dtype.npz", y_train=rng.random(64)),
        "flat": write_npz(d / "flat.npz", x_train=np.zeros((64, 64), np.float32),
                          x_test=np.zeros((16, 64), np.float32)),
        "corrupt": d / "corrupt.npz",
        "nan_x": write_npz(d / "nan.npz", x_train=poisoned((64, 8, 8, 1), 7, np.nan)),
        "inf_x": write_npz(d / "inf.npz", x_test=poisoned((16, 8, 8, 1), 3, -np.inf)),
    }


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A results folder holding a finished torch/mlp run named "good"."""
    results = tmp_path_factory.mktemp("good") / "results"
    run(harness("train", "--framework", "torch", "--model", "mlp", "--max-steps", "5",
                "--allreduce", "local", "--out-dir", results, "--run-name", "good"),
        timeout=120, check=True)
    return results


@pytest.mark.parametrize("case", [bad_input_case(c) for c in BAD_INPUT])
def test_bad_input_gives_one_clear_error_and_writes_nothing(case, bad_files, request, tmp_path):
    args, message = BAD_INPUT[case]
    args = [a.format(**{k: str(v) for k, v in bad_files.items()}) for a in args]
    results = request.getfixturevalue("good_run") if case in NEEDS_GOOD_RUN else tmp_path
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    if case == "more ranks than samples":
        p = run(launch("horovodrun", 2, "--framework", "torch", "--out-dir", results, *args),
                timeout=120)
    else:
        p = run(harness("train", "--framework", "torch", "--allreduce", "local",
                        "--out-dir", results, *args), timeout=120)
    assert p.returncode == EXIT_BAD_INPUT, p.stderr[-3000:]
    assert message in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    assert after == before, "the failed run wrote or changed files"


def test_a_malformed_fault_drill_writes_no_run(tmp_path):
    """Found by a new-user hunt: HARNESS_FAULT was read after the run record was written, so
    the report listed an unfinished drill and offered to resume it."""
    p = run(harness("train", "--framework", "torch", "--model", "mlp", "--max-steps", "3",
                    "--out-dir", tmp_path / "results"), env={"HARNESS_FAULT": "hang@x:3"},
            timeout=120)
    assert p.returncode == EXIT_BAD_INPUT, p.stderr[-3000:]
    assert "HARNESS_FAULT entry 'hang@x:3' is not kind@rank:step" in p.stderr
    assert not (tmp_path / "results").exists()


@needs_mpi
@pytest.mark.mpi
def test_parameter_server_without_workers_is_refused(results):
    p = run(launch("mpirun", 2, "--framework", "torch", "--mode", "async", "--ps-servers", "2",
                   "--out-dir", results))
    assert p.returncode == EXIT_BAD_INPUT, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    assert "leaves no worker" in p.stderr
    assert not any(results.iterdir())


# --- security ---------------------------------------------------------------------------------

@pytest.mark.framework
def test_results_are_created_with_the_users_umask(tmp_path):
    for mask, mode in ((0o022, 0o644), (0o027, 0o640)):
        out = tmp_path / f"u{mask:o}"
        code = (f"import os, sys; os.umask({mask}); from harness.cli import main; "
                f"sys.exit(main(['train', '--model', 'mlp', '--max-steps', '3', '--allreduce', "
                f"'local', '--out-dir', '{out}', '--run-name', 'r']))")
        run([PY, "-c", code], timeout=120, check=True)
        files = [f for f in (out / "r").rglob("*") if f.is_file()]
        assert files and all(stat.S_IMODE(f.stat().st_mode) == mode for f in files), \
            {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}


@pytest.mark.framework
def test_the_harness_opens_no_network_port(tmp_path):
    """A run without a communication runtime listens on nothing (MPI/Gloo sockets are theirs)."""
    psutil = pytest.importorskip("psutil")
    p = subprocess.Popen(harness("train", "--model", "cnn", "--epochs", "30", "--allreduce",
                                 "local", "--out-dir", tmp_path), cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline and p.poll() is None:
            if list(tmp_path.rglob("ckpt-*.npz")):
                proc = psutil.Process(p.pid)
                seen = [c for c in proc.net_connections(kind="all") if c.status == "LISTEN"] + \
                    [c for c in proc.net_connections(kind="inet") if c.raddr]
                break
            time.sleep(0.1)
        assert seen == [], seen
    finally:
        p.kill()
        p.wait()


def test_source_has_no_servers_or_pickle_loads():
    bad = [r"pickle\.loads?\(", r"torch\.load\(", r"allow_pickle=True", r"socketserver",
           r"http\.server", r"\.listen\(", r"(?<![\w.])eval\(", r"(?<![\w.])exec\("]
    for path in [*REPO.glob("harness/**/*.py"), *REPO.glob("launchers/**/*.py"),
                 *REPO.glob("models/**/*.py")]:
        text = path.read_text()
        for b in bad:
            assert not re.search(b, text), f"{path}: {b}"


WATCHDOG = """
import logging, sys, time
from harness.preemption import Watchdog
logging.basicConfig(stream=sys.stderr, format="%(message)s")
w = Watchdog(0, 0.5, logging.getLogger("t"), stall_inspector=sys.argv[2] == "horovod")
w.tick(7, sys.argv[1])
for _ in range(int(sys.argv[3])):      # inside so many (nested) collectives
    w.wait(True, sys.argv[4] if len(sys.argv) > 4 else None)
w.wait(True); w.wait(False)            # one that ended
w.start()
time.sleep(30)
"""


@pytest.mark.parametrize("phase, path, waits, said", [
    ("training", "horovod", 0, "training"), ("training", "mpi", 0, "training"),
    ("training", "mpi", 1, Watchdog.WAITING),
    # local SGD's average, the stop-flag agreement: the phase it waits in
    ("agreeing on stop flags", "mpi", 2, "waiting for the other ranks (agreeing on stop flags)"),
    # TensorFlow on Horovod: the exchange is inside the step's graph
    ("training", "horovod", 1, "in a step whose gradient exchange waits for the other ranks")])
def test_the_watchdog_names_the_phase_and_lets_the_stalled_rank_speak_first(phase, path,
                                                                           waits, said):
    """A rank waiting in a collective (the gradients, local SGD's average, the agreements)
    reports only after a grace period (2 s past the timeout here), so the rank stalled
    elsewhere is the first to name itself; Horovod's stall report is cited only where Horovod
    runs."""
    start = time.monotonic()
    what = [said] if said.startswith("in a step") else []
    p = subprocess.run([PY, "-c", WATCHDOG, phase, path, str(waits), *what],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    took = time.monotonic() - start
    assert p.returncode == EXIT_STALLED, p.stderr
    assert "rank 0 stalled: no progress for" in p.stderr
    assert f"while {said} at step 7" in p.stderr
    assert ("Horovod's stall report" in p.stderr) == (path == "horovod" and not waits)
    if waits:
        assert took >= 2.5 and "reports itself before this one" in p.stderr
    else:
        assert took < 2.5, took

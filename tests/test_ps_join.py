"""A worker joins a running parameter-server job (ps_join = true): it takes the place of a
worker that failed, through the job's ompi-server, and the run does its planned work in full."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PY, REPO, harness, launch, needs_mpi, read_jsonl, run, summary
from harness.ps import join as J

SPE = 1437 // 64                     # digits: steps per epoch of one worker of 2 (batch 32 x 2)


def test_ps_join_is_refused_where_it_cannot_work(tmp_path):
    cases = [(["--mode", "sync"], "set mode = 'async'"),
             (["--mode", "async", "--ps-consistency", "bsp"], "bsp cannot average"),
             (["--mode", "async", "--ps-on-worker-failure", "abort"], "ends the job before")]
    for flags, want in cases:
        p = run(harness("train", "--model", "mlp", "--ps-join", *flags, "--out-dir", tmp_path))
        assert p.returncode == 2 and want in p.stderr, p.stderr
    p = run(launch("horovodrun", 3, "--mode", "async", "--ps-join", "--out-dir", tmp_path))
    assert p.returncode == 2 and "use --launcher mpirun" in p.stderr, p.stderr
    p = run(harness("join", tmp_path / "nothing"))
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr
    p = run(harness("join", tmp_path))
    assert p.returncode == 2 and "only a parameter-server run started with ps_join" in p.stderr
    assert list(tmp_path.iterdir()) == []                   # nothing written
    p = run(launch("mpirun", 3, "--mode", "async", "--ps-join", "--model", "mlp", "--out-dir",
                   tmp_path, extra=("--dry-run",)))
    assert p.returncode == 0 and "--ompi-server OMPI_SERVER_URI" in p.stdout, p.stdout


def test_a_joiner_whose_run_finishes_while_it_waits_stops_with_one_line(tmp_path):
    """The job writes its summary while a joiner waits for server 0 (a MPI accept that
    nothing will answer): the joiner withdraws its request and exits 2, long before its
    timeout."""
    code = f"""
import threading, time
from pathlib import Path
from harness.ps import join as J
run = Path({str(tmp_path)!r})
J.join_dir(run).mkdir()
(J.join_dir(run) / "job.json").write_text("{{}}")
req = J.open_request(run, ["port"], timeout=60)
class Blocking:
    class COMM_SELF:
        @staticmethod
        def Accept(port):
            time.sleep(120)
threading.Timer(1.0, lambda: (run / "summary.json").write_text("{{}}")).start()
J._accept(Blocking, "port", time.monotonic() + 60, run, req.id, 0)
"""
    start = time.monotonic()
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "finished while this worker waited to join" in p.stdout, p.stdout
    assert time.monotonic() - start < 20
    assert J.read_request(tmp_path, 1) is None                 # withdrawn


def test_the_relay_flags_each_live_request_once(tmp_path, monkeypatch):
    """A request is passed on once its heartbeat has been seen to change: a joiner that died
    before it was answered (its heartbeat stands still, or never started) is never flagged."""
    monkeypatch.setattr(J, "POLL_S", 0.0)
    J.join_dir(tmp_path).mkdir()
    relay = J.Relay(tmp_path)
    assert relay.poll() == 0
    first = J.open_request(tmp_path, ["port-a"], timeout=60)
    second = J.open_request(tmp_path, ["port-b"], timeout=60)
    dead = J.open_request(tmp_path, ["port-c"], timeout=60)
    assert (first.id, second.id, dead.id) == (1, 2, 3)
    assert J.read_request(tmp_path, 1).ports == ["port-a"]
    beats = {n: J.Heartbeat(tmp_path, n) for n in (1, 2, 3)}
    for b in beats.values():
        b._beat()
    assert relay.poll() == 0                      # not seen to change yet
    for n in (1, 2):                              # request 3's joiner died: no new beat
        beats[n]._beat()
    assert [relay.poll(), relay.poll(), relay.poll()] == [1, 2, 0]
    J.withdraw(tmp_path, 2)
    assert J.read_request(tmp_path, 2) is None
    assert J.open_request(tmp_path, ["port-d"], timeout=60).id == 4     # numbers are not reused


@needs_mpi
@pytest.mark.mpi
def test_ps_join_needs_the_ompi_server(tmp_path):
    """Started by mpirun without --ompi-server (not through harness launch): one line, exit 2."""
    p = run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PATH",
             "-x", "PYTHONPATH", *harness("train", "--mode", "async", "--model", "mlp",
                                          "--ps-join", "--out-dir", tmp_path)], timeout=120)
    assert p.returncode == 2 and "needs an ompi-server" in p.stderr, p.stderr[-2000:]


@needs_mpi
@pytest.mark.mpi
def test_the_ompi_server_ends_with_a_launcher_that_is_killed():
    """harness launch starts the ompi-server in a session of its own (a Ctrl-C is not for it);
    SIGKILLed, the launcher cannot stop it, so the server ends with its parent."""
    code = ("import sys, time; from launchers.runner import ompi_server\n"
            "with ompi_server() as uri:\n    print(uri, flush=True); time.sleep(120)")
    launcher = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    server = None
    try:
        assert launcher.stdout.readline().strip()              # the server is up
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text()
        server = int(children.split()[0])
        assert "ompi-server" in Path(f"/proc/{server}/cmdline").read_text()
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                os.waitpid(server, os.WNOHANG)               # (not ours: nothing to reap)
            except ChildProcessError:
                pass
        status = Path(f"/proc/{server}/status")
        assert not status.exists() or "zombie" in status.read_text(), "ompi-server left running"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if server is not None and Path(f"/proc/{server}").exists():
            os.kill(server, signal.SIGKILL)              # a failed check leaves nothing behind


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120,
              count: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear:\n{path.read_text()[-4000:]}")


@needs_mpi
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("fw, servers, consistency, kill", [
    ("torch", 1, "async", True), ("tensorflow", 2, "ssp", False)])
def test_a_worker_joins_in_the_place_of_one_that_failed(fw, servers, consistency, kill,
                                                        results, tmp_path):
    """Worker rank S+1 raises at clock 10; a worker started with `harness join` takes its slot
    and clock, so the run applies exactly the planned pushes (every slot's clocks 1..total
    once) and finishes; a second joiner finds no free slot (exit 2). With ``kill``, the first
    joiner is then SIGKILLed: the servers see its heartbeat stop, go on, and a third joiner
    takes the slot from where the killed one left it. Worker S crawls (a ``slow`` fault, 0.25 s
    a step, 220 s for its 880 steps) until the test has seen every join, so the job is still
    running, and still passing requests on, while the joiners start; the first joiner crawls
    too until the second is refused, so its slot is not free again before that."""
    epochs = 40
    total = epochs * SPE
    failing, slow = servers + 1, servers
    log, release = tmp_path / "job.log", tmp_path / "release"
    first_release = tmp_path / "release-first-joiner"
    job = subprocess.Popen(
        [str(a) for a in launch("mpirun", servers + 2, "--framework", fw, "--mode", "async",
                                "--ps-consistency", consistency, "--ps-servers", servers,
                                "--model", "mlp", "--epochs", epochs, "--ps-join",
                                "--ps-join-lost-after-s", 6,
                                "--threads-per-rank", "1", "--out-dir", results,
                                "--run-name", "joined")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        env={**os.environ, "HARNESS_FAULT": f"raise@{failing}:10,slow@{slow}:1",
             "HARNESS_FAULT_RELEASE": str(release)}, text=True)
    run_dir = results / "joined"
    joiners: list[subprocess.Popen] = []

    def join(run_dir: Path, fault: str = "", release: Path | None = None) -> subprocess.Popen:
        joiners.append(subprocess.Popen(
            [PY, "-m", "harness", "join", run_dir, "--timeout", "90"], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
            env={**os.environ, "HARNESS_FAULT": fault,
                 "HARNESS_FAULT_RELEASE": str(release or "")}))
        return joiners[-1]

    try:
        _wait_for(log, f"worker rank {failing} failed at clock 9", job)
        # the first joiner (id S+2) crawls until released (390 steps to its kill: 97 s at the
        # least); with kill, it then SIGKILLs itself before its clock 400
        joiner = join(run_dir, f"slow@{servers + 2}:1" + (f",kill@{servers + 2}:400" if kill
                                                          else ""), first_release)
        _wait_for(log, "joined from", job)
        second = run(harness("join", run_dir, "--timeout", "60"), timeout=120)
        assert second.returncode == 2 and "no worker slot" in second.stdout + second.stderr, \
            second.stdout + second.stderr
        first_release.touch()
        if kill:
            joiner.communicate(timeout=60)
            _wait_for(log, "stopped answering (no heartbeat", job)
            joiner = join(run_dir)
            _wait_for(log, "joined from", job, count=2)
        release.touch()                                      # worker S: full speed again
        out, _ = joiner.communicate(timeout=240)
        assert joiner.returncode == 0, out[-4000:]
        assert job.wait(timeout=240) == 0, log.read_text()[-4000:]
    finally:
        for p in [job, *joiners]:             # a failed check leaves no process behind
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    s = summary(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    if kill:
        # the killed joiner: listed as failed, from clock 9 to where it was killed
        first, wid = servers + 2, servers + 3
        info = s["joined_workers"].pop(str(first))
        assert info["state"] == "left" and "stopped answering (no heartbeat for 6s" in \
            s["failed_workers"][str(first)]
        cut = info["clock"]
        assert cut == 399 and sorted(r["clock"] for r in steps if r["worker"] == first) == \
            list(range(10, cut + 1))
    else:
        wid, cut = servers + 2, 9                      # the first id after the job's ranks
    assert s["updates"] == 2 * total and s["samples"] == 2 * total * 32
    assert s["worker_clocks"] == {str(slow): total, str(failing): total}
    assert "injected fault" in s["failed_workers"][str(failing)]
    assert s["joined_workers"] == {str(wid): {"slot": failing, "from_clock": cut, "clock": total,
                                              "state": "done", "at_version":
                                              s["joined_workers"][str(wid)]["at_version"],
                                              "host": s["joined_workers"][str(wid)]["host"]}}
    assert s["final_eval_acc"] >= 0.9
    joins = [(r["worker"], r["slot"], r["clock"]) for r in records if r["kind"] == "join"]
    assert joins == ([(wid - 1, failing, 9)] if kill else []) + [(wid, failing, cut)]
    # exactly once: the failed slot's clocks 1..total, 1..9 by the failed worker, the rest by
    # the joiners (a clock is a position in the slot's data shard)
    by = {w: sorted(r["clock"] for r in steps if r["worker"] == w) for w in (failing, wid, slow)}
    assert by[failing] == list(range(1, 10)) and by[wid] == list(range(cut + 1, total + 1))
    assert by[slow] == list(range(1, total + 1))
    assert not list(J.join_dir(run_dir).glob("request-*.json"))
    job_info = json.loads((J.join_dir(run_dir) / "job.json").read_text())
    assert job_info["world_size"] == servers + 2 and job_info["servers"] == servers


@needs_mpi
@pytest.mark.mpi
@pytest.mark.slow
def test_a_job_with_a_joined_worker_is_preempted_and_resumes_by_slot(results, tmp_path):
    """The joined worker gets SIGTERM at its clock 30: every rank of both jobs checkpoints and
    exits 75, the checkpoint keeps the clocks by slot, and the same launch command (no joiner)
    finishes every slot's planned steps with exactly the planned updates."""
    epochs = 40                      # worker 1 crawls (0.25 s a step) until the preemption
    total = epochs * SPE
    args = launch("mpirun", 3, "--framework", "torch", "--mode", "async", "--model", "mlp",
                  "--epochs", epochs, "--ps-join", "--threads-per-rank", "1", "--out-dir",
                  results, "--run-name", "pre")
    log = tmp_path / "job.log"
    job = subprocess.Popen([str(a) for a in args], stdout=log.open("w"),
                           stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                           env={**os.environ, "HARNESS_FAULT": "raise@2:10,slow@1:1"}, text=True)
    run_dir = results / "pre"
    try:
        _wait_for(log, "worker rank 2 failed at clock 9", job)
        joiner = run(harness("join", run_dir, "--timeout", "90"), timeout=240,
                     env={"HARNESS_FAULT": "sigterm@3:30"})
        assert joiner.returncode == 75, joiner.stdout[-3000:] + joiner.stderr[-3000:]
        assert job.wait(timeout=120) == 75, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    stopped = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "preempted"]
    assert stopped and stopped[-1]["clocks"]["2"] == 30 and set(stopped[-1]["clocks"]) == \
        {"1", "2"}
    run(args, timeout=300, check=True)                 # resume: the job's own ranks only
    s = summary(run_dir)
    assert s["updates"] == 2 * total and s["worker_clocks"] == {"1": total, "2": total}
    assert s["joined_workers"]["3"]["clock"] == 30 and s["joined_workers"]["3"]["slot"] == 2

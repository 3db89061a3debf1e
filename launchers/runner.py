"""The thin runner: start a built argv, forward stop signals, return its exit code."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from harness.errors import LaunchError

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def launch_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a launcher: this interpreter's bin folder first on PATH, so that the
    virtualenv's horovodrun is found without activating it and every rank runs this harness."""
    full_env = dict(os.environ if env is None else env)
    bindir = str(Path(sys.executable).parent)
    parts = full_env.get("PATH", "").split(os.pathsep)
    if bindir not in parts:
        full_env["PATH"] = os.pathsep.join([bindir, *[p for p in parts if p]])
    return full_env


#: shells a launcher runs itself through: horovodrun execs ``/bin/sh -c "mpirun ..."``
SHELLS = ("sh", "dash", "bash")
#: Open MPI's launcher binaries (what ``mpirun`` resolves to): on SIGTERM they kill the job after
#: a few seconds, but they relay SIGUSR1 to the ranks and then report the ranks' exit code
OPEN_MPI_LAUNCHERS = ("orterun", "prterun")


def _proc_text(pid: int, name: str) -> str:
    try:
        return (Path("/proc") / str(pid) / name).read_text().strip()
    except OSError:
        return ""


def signal_targets(pid: int, signum: int, again: bool = False) -> list[tuple[int, int]]:
    """Where a stop signal for the launcher process ``pid`` goes, as (pid, signal) pairs.

    A shell's child is the launcher (horovodrun's ``sh -c mpirun``): signalled in the shell's
    stead, so that the shell waits for it and returns its exit code, instead of dying and
    leaving the job running. Open MPI's mpirun gets SIGUSR1 for a SIGTERM: the ranks hear a
    stop request either way (checkpoint, exit 75), but mpirun relays SIGUSR1 and waits for
    them, where on SIGTERM it would kill them a few seconds later and exit 1. A SIGTERM
    ``again`` stays SIGTERM: ranks that did not stop on the first are ended.

    (A shell that has not started its launcher yet, a moment at start-up, gets the signal
    itself.)"""
    targets = [pid]
    if _proc_text(pid, "comm") in SHELLS:
        children = _proc_text(pid, f"task/{pid}/children").split()
        targets = [int(c) for c in children] or targets
    out = []
    for t in targets:
        try:
            exe = Path(os.readlink(f"/proc/{t}/exe")).name
        except OSError:
            exe = ""
        graceful = signum == signal.SIGTERM and exe in OPEN_MPI_LAUNCHERS and not again
        out.append((t, signal.SIGUSR1 if graceful else signum))
    return out


def run(argv: list[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> int:
    """Run ``argv`` (never through a shell). Stop signals sent to us reach the launcher, which
    relays them to the ranks (``signal_targets``), and then the handler that was installed
    before (if any); the launcher's exit code is returned."""
    full_env = launch_environment(env)
    try:
        proc = subprocess.Popen(argv, env=full_env, cwd=cwd)
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]!r} is not on PATH: install it or load its module (e.g. "
                          "`module load openmpi`; horovodrun comes with scripts/bootstrap.sh), "
                          "or pick another --launcher") from None
    previous: dict[int, Any] = {}
    heard: list[int] = []

    def forward(signum, frame):
        again = signum in heard
        heard.append(signum)
        for pid, sig in signal_targets(proc.pid, signum, again):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        before = previous.get(signum)
        if callable(before) and before is not signal.default_int_handler:
            before(signum, frame)  # e.g. compare's stop flag: it must not start the next run

    for sig in FORWARDED:
        previous[sig] = signal.signal(sig, forward)
    try:
        return proc.wait()
    finally:
        for signum, prev in previous.items():
            signal.signal(signum, prev)


def _ends_with_its_parent() -> Callable[[], None] | None:
    """What a child runs before it starts, so that it gets SIGTERM when the thread that started
    it ends (Linux ``PR_SET_PDEATHSIG``): a launcher that is SIGKILLed leaves no server of its
    own running. Resolved here, in the parent: the child only makes the call (no loader work
    between fork and exec). None where there is no ``prctl``."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def child() -> None:
        prctl(1, signal.SIGTERM)                       # PR_SET_PDEATHSIG
        if os.getppid() != parent:                     # the parent died before that call
            os.kill(os.getpid(), signal.SIGTERM)
    return child


@contextmanager
def ompi_server(timeout: float = 20.0) -> Iterator[str]:
    """An Open MPI ``ompi-server`` for the length of a job, which connects it with the jobs
    that join it (MPI connect/accept across mpiruns); yields its URI for ``mpirun
    --ompi-server`` (the address itself, not a file: ranks on other nodes read it too). It runs
    in a session of its own, so a Ctrl-C to the terminal reaches the job (which checkpoints)
    but not the server it still talks through; it ends with the launcher's thread that
    started it, however that ends."""
    folder = Path(tempfile.mkdtemp(prefix="harness-ompi-server-"))
    uri = folder / "uri"
    err_path = folder / "stderr"
    try:
        with err_path.open("w") as err_file:
            proc = subprocess.Popen(["ompi-server", "--no-daemonize", "-r", str(uri)],
                                    env=launch_environment(), stdout=subprocess.DEVNULL,
                                    stderr=err_file, start_new_session=True,
                                    preexec_fn=_ends_with_its_parent())
    except FileNotFoundError:
        shutil.rmtree(folder, ignore_errors=True)
        raise LaunchError("'ompi-server' is not on PATH: it comes with Open MPI (the "
                          "openmpi-bin package); ps_join needs it") from None
    try:
        deadline = time.monotonic() + timeout
        while not (uri.exists() and uri.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = err_path.read_text(errors="replace")[-500:]
                why = err.strip() or f"no URI after {timeout:g}s"
                raise LaunchError(f"ompi-server did not start ({why}): check the Open MPI "
                                  "installation")
            time.sleep(0.05)
        yield uri.read_text().strip()
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)

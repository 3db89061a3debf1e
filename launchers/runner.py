"""The thin runner: start a built argv, forward stop signals, return its exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

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


def run(argv: list[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> int:
    """Run ``argv`` (never through a shell). Stop signals sent to us reach the launcher, which
    relays them to the ranks, and then the handler that was installed before (if any); the
    launcher's exit code is returned."""
    full_env = launch_environment(env)
    try:
        proc = subprocess.Popen(argv, env=full_env, cwd=cwd)
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]!r} is not on PATH: install it or load its module (e.g. "
                          "`module load openmpi`; horovodrun comes with scripts/bootstrap.sh), "
                          "or pick another --launcher") from None
    previous: dict[int, Any] = {}

    def forward(signum, frame):
        try:
            proc.send_signal(signum)
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

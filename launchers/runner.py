"""The thin runner: start a built argv, forward stop signals, return its exit code."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Mapping

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def run(argv: list[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> int:
    """Run ``argv`` (never through a shell). Stop signals sent to us reach the launcher, which
    relays them to the ranks; the launcher's exit code is returned."""
    full_env = dict(os.environ if env is None else env)
    try:
        proc = subprocess.Popen(argv, env=full_env, cwd=cwd)
    except FileNotFoundError:
        raise FileNotFoundError(f"{argv[0]!r} is not on PATH: install it or load its module "
                                "(e.g. `module load openmpi`), or pick another --launcher") \
            from None
    previous = {}

    def forward(signum, frame):   # noqa: ARG001
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        previous[sig] = signal.signal(sig, forward)
    try:
        return proc.wait()
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)

"""Elastic launches: the host discovery script horovodrun polls, written or checked.

``harness launch --launcher horovodrun --elastic`` needs a host discovery script: an executable
that prints the hosts the job may use now, one ``host:slots`` a line. The user may give their
own (``--host-discovery-script``; it is run once here, and refused if it cannot run or prints
anything else); otherwise the launcher writes one that prints a hosts file (``--hosts-file``),
which the user edits to add or remove hosts while the job runs. The file starts with the
``--hosts``/``--hostfile`` hosts, or, on one machine, one slot per rank under distinct names of
this machine's loopback address: Horovod's elastic driver blacklists a failed rank's whole
host, so ranks that share a host name would all be lost with one of them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

from harness.errors import ConfigError
from launchers.spec import LaunchSpec

#: names that all resolve to 127.0.0.1, which horovodrun runs locally (no ssh)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "127.1", "127.0.1", "127.0.0.01", "0x7f000001",
                  "0x7f.1", "2130706433")
_LINE = re.compile(r"^([A-Za-z0-9_.\-]+)(?::([0-9]+))?$")


def parse_hosts(text: str, source: str) -> list[tuple[str, int]]:
    """``host[:slots]`` lines (blank lines and # comments skipped); ConfigError naming the
    first bad line."""
    hosts = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ConfigError(f"{source} printed {line!r}, not host:slots (e.g. node1:4): "
                              "fix it to print one host:slots a line")
        hosts.append((m.group(1), int(m.group(2) or 1)))
    return hosts


def check_discovery_script(path: str) -> list[tuple[str, int]]:
    """Run the user's script once: it must be executable and print at least one host."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"host discovery script {path!r} does not exist: check "
                          "--host-discovery-script")
    if not os.access(p, os.X_OK):
        raise ConfigError(f"host discovery script {path!r} is not executable: chmod +x it")
    try:
        out = subprocess.run([str(p.resolve())], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"host discovery script {path!r} could not run ({e}): fix it so "
                          "that it prints one host:slots a line") from None
    if out.returncode != 0:
        raise ConfigError(f"host discovery script {path!r} exited {out.returncode}: fix it so "
                          "that it prints one host:slots a line and exits 0")
    hosts = parse_hosts(out.stdout, f"host discovery script {path!r}")
    if not hosts:
        raise ConfigError(f"host discovery script {path!r} printed no hosts: it must print "
                          "one host:slots a line")
    return hosts


def is_local(host: str) -> bool:
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False


def initial_hosts(spec: LaunchSpec, slots: int) -> list[tuple[str, int]]:
    """The hosts a written hosts file starts with."""
    if spec.hosts:
        return parse_hosts(spec.hosts.replace(",", "\n"), "--hosts")
    if spec.hostfile:
        text = Path(spec.hostfile).read_text()
        # mpirun's "host slots=N" lines read as host:N
        return parse_hosts(re.sub(r"\s+slots\s*=\s*", ":", text), f"hostfile {spec.hostfile!r}")
    if slots > len(LOOPBACK_NAMES):
        raise ConfigError(f"{slots} local elastic ranks need as many names for this machine, "
                          f"and the launcher knows {len(LOOPBACK_NAMES)}: give --hosts or a "
                          "--hosts-file with hosts of your own")
    return [(name, 1) for name in LOOPBACK_NAMES[:slots]]


def prepare(spec: LaunchSpec, max_ranks: int | None, folder: str | None = None) -> LaunchSpec:
    """The spec horovodrun's argv is built from: the most ranks from the run config where the
    launcher options leave it out, and a discovery script (checked, or written with its
    hosts file). A hosts file that is all this machine makes Horovod use the loopback
    interface (it otherwise waits for an interface common to two hosts)."""
    # The harness enforces min_ranks itself (the ranks left checkpoint the last commit and
    # stop), so horovodrun's own minimum stays 1 unless given: it must restart them to tell.
    lo = spec.min_np or 1
    hi = spec.max_np or max_ranks or spec.np
    if lo > hi or not lo <= spec.np <= hi:
        raise ConfigError(f"elastic ranks: np = {spec.np}, --min-np {lo}, max {hi} (--max-np, "
                          "else the run config's max_ranks): make min <= np <= max")
    if spec.host_discovery_script:
        hosts = check_discovery_script(spec.host_discovery_script)
        script = spec.host_discovery_script
    else:
        hosts_file = Path(spec.hosts_file) if spec.hosts_file else \
            Path(folder or tempfile.mkdtemp(prefix="harness-elastic-")) / "hosts"
        if hosts_file.exists():
            hosts = parse_hosts(hosts_file.read_text(), f"hosts file {str(hosts_file)!r}")
        else:
            hosts = initial_hosts(spec, hi)
            hosts_file.parent.mkdir(parents=True, exist_ok=True)
            hosts_file.write_text("".join(f"{h}:{n}\n" for h, n in hosts))
        script_path = hosts_file.parent / "discover.sh"
        script_path.write_text("#!/bin/sh\n# written by harness launch --elastic: the hosts "
                               "this job may use now (edit the hosts file)\n"
                               f"exec cat {shlex.quote(str(hosts_file.resolve()))}\n")
        script_path.chmod(script_path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        script = str(script_path.resolve())
    if sum(n for _, n in hosts) < spec.np:
        raise ConfigError(f"the hosts ({', '.join(f'{h}:{n}' for h, n in hosts)}) have fewer "
                          f"slots than np = {spec.np}: list more hosts or start fewer ranks")
    nics = spec.network_interfaces
    if nics is None and all(is_local(h) for h, _ in hosts):
        nics = "lo"
    return dataclasses.replace(spec, min_np=lo, max_np=hi, host_discovery_script=script,
                               hosts=None, hostfile=None, hosts_file=None,
                               network_interfaces=nics)

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

from harness.env import LOCAL_SLOTS, LOOPBACK_NAMES
from harness.errors import ConfigError
from launchers.spec import LaunchSpec

_LINE = re.compile(r"^([A-Za-z0-9_.\-]+):([0-9]+)$")
#: the written discovery script: the hosts file without comments, blanks and spaces, which
#: horovodrun's parser would take for host names
SCRIPT_NAME = "harness-discover.sh"
_SCRIPT = """#!/bin/sh
# written by harness launch --elastic: the hosts this job may use now, one host:slots a line
# (edit the hosts file; comments and blank lines are dropped here)
exec sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' {hosts}
"""


def parse_hosts(text: str, source: str, comments: bool = False) -> list[tuple[str, int]]:
    """``host:slots`` lines, as horovodrun's elastic driver reads them (``comments``: a hosts
    file, whose comments, blanks and spaces the written script drops); ConfigError naming the
    first bad line."""
    hosts = []
    for line in text.strip().splitlines():
        if comments:
            line = "".join(line.split("#", 1)[0].split())
        if not line:
            continue
        m = _LINE.match(line)
        if m is None or int(m.group(2)) < 1:
            raise ConfigError(f"{source} has the line {line!r}, not host:slots (e.g. node1:4): "
                              "make it one host:slots a line")
        hosts.append((m.group(1), int(m.group(2))))
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
    hosts = parse_hosts(out.stdout, f"the output of host discovery script {path!r}")
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
        try:
            text = Path(spec.hostfile).read_text()
        except OSError as e:
            raise ConfigError(f"hostfile {spec.hostfile!r} cannot be read ({e.strerror}): check "
                              "--hostfile") from None
        # mpirun's "host slots=N" lines read as host:N
        return parse_hosts(re.sub(r"[ \t]+slots\s*=\s*", ":", text),
                           f"hostfile {spec.hostfile!r}", comments=True)
    if slots > len(LOOPBACK_NAMES):
        raise ConfigError(f"{slots} local elastic ranks need as many names for this machine, "
                          f"and the launcher knows {len(LOOPBACK_NAMES)}: give --hosts or a "
                          "--hosts-file with hosts of your own")
    return [(name, 1) for name in LOOPBACK_NAMES[:slots]]


def prepare(spec: LaunchSpec, max_ranks: int | None,
            folder: str | None = None) -> tuple[LaunchSpec, dict[str, str]]:
    """The spec horovodrun's argv is built from, and the environment it adds: the most ranks
    from the run config where the launcher options leave it out, and a discovery script
    (checked, or written with its hosts file). A hosts file that is all this machine makes
    Horovod use the loopback interface (it otherwise waits for an interface common to two
    hosts), and tells the ranks how many local slots there are (harness/env.py)."""
    # The harness enforces min_ranks itself (the ranks left checkpoint the last commit and
    # stop), so horovodrun's own minimum stays 1 unless given: it must restart them to tell.
    lo = spec.min_np or 1
    hi = spec.max_np or max_ranks or spec.np
    if lo > hi or not lo <= spec.np <= hi:
        raise ConfigError(f"elastic ranks: np = {spec.np}, --min-np {lo}, max {hi} (--max-np, "
                          "else the run config's max_ranks): make min <= np <= max")
    write: tuple[Path, str] | None = None
    if spec.host_discovery_script:
        hosts = check_discovery_script(spec.host_discovery_script)
        script = str(Path(spec.host_discovery_script).resolve())
    else:
        hosts_file = Path(spec.hosts_file) if spec.hosts_file else \
            Path(folder or tempfile.mkdtemp(prefix="harness-elastic-")) / "hosts"
        if hosts_file.exists():
            if spec.hosts or spec.hostfile:
                raise ConfigError(f"hosts file {str(hosts_file)!r} exists, so --hosts/--hostfile "
                                  "would not be read: drop them, or remove the file")
            hosts = parse_hosts(hosts_file.read_text(), f"hosts file {str(hosts_file)!r}",
                                comments=True)
        else:
            # the job starts on the first np slots; the user adds hosts to grow it
            hosts = first_slots(initial_hosts(spec, spec.np), spec.np)
            write = hosts_file, "".join(f"{h}:{n}\n" for h, n in hosts)
        script = str((hosts_file.parent / SCRIPT_NAME).resolve())
    if sum(n for _, n in hosts) < spec.np:
        raise ConfigError(f"the hosts ({', '.join(f'{h}:{n}' for h, n in hosts)}) have fewer "
                          f"slots than np = {spec.np}: list more hosts or start fewer ranks")
    if not spec.host_discovery_script:        # everything checked: now write
        if write is not None:
            write[0].parent.mkdir(parents=True, exist_ok=True)
            write[0].write_text(write[1])
        path = Path(script)
        path.write_text(_SCRIPT.format(hosts=shlex.quote(str(hosts_file.resolve()))))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    nics, env = spec.network_interfaces, {}
    if all(is_local(h) for h, _ in hosts):
        nics = nics or "lo"
        if all(h in LOOPBACK_NAMES and n == 1 for h, n in hosts):
            env[LOCAL_SLOTS] = str(min(hi, len(LOOPBACK_NAMES)))
    # horovodrun runs the script through a shell
    return dataclasses.replace(spec, min_np=lo, max_np=hi,
                               host_discovery_script=shlex.quote(script), hosts=None,
                               hostfile=None, hosts_file=None, network_interfaces=nics), env


def first_slots(hosts: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    """The hosts that hold the first ``n`` slots (horovodrun starts as many ranks as the
    discovery script lists slots, up to --max-np)."""
    out = []
    for h, k in hosts:
        if n <= 0:
            break
        out.append((h, min(k, n)))
        n -= k
    return out


#: node states in which a node cannot take ranks (scontrol's State, + flags included)
_DOWN_STATES = ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "POWER", "REBOOT", "MAINT")


def slurm_hosts(show_nodes: str, slots: int) -> list[tuple[str, int]]:
    """``host:slots`` for each node in ``scontrol show node -o`` output that can take ranks,
    named by its NodeAddr (how the job reaches it). Nodes that share a loopback address (a
    test cluster posing as several nodes on one machine) get distinct loopback names, as the
    launcher gives local ranks."""
    hosts, names = [], iter(LOOPBACK_NAMES)
    for line in show_nodes.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "NodeName" not in fields:
            continue
        state = fields.get("State", "")
        if any(s in state for s in _DOWN_STATES):
            continue
        addr = fields.get("NodeAddr") or fields["NodeName"]
        if is_local(addr):
            alias = next(names, None)
            if alias is None:
                raise ConfigError(f"more than {len(LOOPBACK_NAMES)} nodes of this job are "
                                  "this machine: elastic runs name each by a loopback alias")
            addr = alias
        hosts.append((addr, slots))
    return hosts


def print_slurm_hosts() -> int:
    """The host discovery script of slurm/elastic.sbatch: the job's live nodes."""
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    shown = subprocess.run(["scontrol", "show", "node", "-o", ",".join(nodes)],
                           capture_output=True, text=True, check=True).stdout
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    for host, n in slurm_hosts(shown, int(per_node)):
        print(f"{host}:{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(print_slurm_hosts())

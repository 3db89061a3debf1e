"""Two virtual nodes joined by a slow link, on one machine: network namespaces, veth pairs and
``tc``, created here and removed on exit. Nothing outside the namespaces gets an address or a
packet.

::

      namespace <p>h ("head": mpirun runs here)
        bridge <p>br 10.78.0.1  -- management veths (unshaped: Open MPI's launch traffic)
             |                          |
      namespace <p>a                namespace <p>b
        <p>ma 10.78.0.2               <p>mb 10.78.0.3        node names: the 10.78 addresses
        <p>da 10.77.0.1  ========  <p>db 10.77.0.2           the data link, shaped by
                       tbf RATE each way                      ``tc qdisc ... tbf``

Open MPI starts one daemon per node through an rsh agent that runs the command in the node's
namespace (``ip netns exec``), and its ranks talk over TCP on the data link only
(``btl_tcp_if_include``): the two ranks are on different "hosts", so no shared memory. The
machines' kernel has no ``netem``, so the link adds no delay, only a rate limit.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

DATA_NET, MGMT_NET = "10.77.0", "10.78.0"


def _ip(*args: str, ns: str | None = None) -> None:
    argv = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    subprocess.run(argv, check=True, capture_output=True, text=True)


def rate_bits(rate: str) -> float:
    """``tc``'s rate (``25mbit``, ``1gbit``, ``500kbit``) in bits per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.strip().lower())
    if m is None:
        raise ValueError(f"rate {rate!r}: give NUMBER kbit|mbit|gbit, e.g. 25mbit")
    return float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2]]


def burst_bytes(rate: str) -> int:
    """The token bucket: 10 ms at the rate, at least 32 KiB (tbf needs rate / HZ). A larger
    bucket would let a whole step's gradients through at the veth's own speed."""
    return max(32 * 1024, int(rate_bits(rate) / 8 / 100))


def available() -> str | None:
    """Why a slow link cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "mpirun"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


class SlowLink:
    """``with SlowLink("100mbit") as link:`` then ``link.env`` and ``link.hosts`` for mpirun
    (run it through ``link.head(argv)``), ``link.tx_bytes()`` for what each node sent."""

    def __init__(self, rate: str = "100mbit", prefix: str | None = None) -> None:
        self.rate = rate
        self.p = prefix or f"hl{os.getpid() % 100000}"
        self.ns = {"h": f"{self.p}h", "a": f"{self.p}a", "b": f"{self.p}b"}
        self.hosts = {f"{MGMT_NET}.2": self.ns["a"], f"{MGMT_NET}.3": self.ns["b"]}
        self.dir = Path(tempfile.mkdtemp(prefix="slowlink-"))
        self.agent = self.dir / "rsh-netns"

    # --- building and removing ---
    def __enter__(self) -> "SlowLink":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        p, ns = self.p, self.ns
        for name in ns.values():
            _ip("ip", "netns", "add", name)
        for name in ns.values():
            _ip("ip", "link", "set", "lo", "up", ns=name)
        # no STP, no forwarding delay: a port forwards as soon as it is up
        _ip("ip", "link", "add", f"{p}br", "type", "bridge", "stp_state", "0", "forward_delay",
            "0", ns=ns["h"])
        _ip("ip", "addr", "add", f"{MGMT_NET}.1/24", "dev", f"{p}br", ns=ns["h"])
        _ip("ip", "link", "set", f"{p}br", "up", ns=ns["h"])
        for node, addr in (("a", 2), ("b", 3)):
            inner, outer = f"{p}m{node}", f"{p}m{node}h"
            _ip("ip", "link", "add", inner, "netns", ns[node], "type", "veth", "peer", "name",
                outer, "netns", ns["h"])
            _ip("ip", "link", "set", outer, "master", f"{p}br", ns=ns["h"])
            _ip("ip", "link", "set", outer, "up", ns=ns["h"])
            _ip("ip", "addr", "add", f"{MGMT_NET}.{addr}/24", "dev", inner, ns=ns[node])
            _ip("ip", "link", "set", inner, "up", ns=ns[node])
        _ip("ip", "link", "add", f"{p}da", "netns", ns["a"], "type", "veth", "peer", "name",
            f"{p}db", "netns", ns["b"])
        for node, addr in (("a", 1), ("b", 2)):
            dev = f"{p}d{node}"
            _ip("ip", "addr", "add", f"{DATA_NET}.{addr}/24", "dev", dev, ns=ns[node])
            _ip("ip", "link", "set", dev, "up", ns=ns[node])
            _ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate, "burst",
                str(burst_bytes(self.rate)), "latency", "100ms", ns=ns[node])
        self._wait_until_up()
        cases = []
        for host, name in self.hosts.items():
            (self.dir / name).mkdir()
            cases.append(f"  {host}) ns={name};;")
        # Each node gets its own host name (a UTS namespace) and its own Open MPI session
        # folder: sharing the machine's, one node's daemon cleaning up after a job raced the
        # other's start of the next ("orte_session_dir failed").
        self.agent.write_text(
            "#!/bin/sh\n# Open MPI's rsh agent: the command runs in the node's namespaces\n"
            "host=$1; shift\ncase \"$host\" in\n" + "\n".join(cases) + "\n"
            '  *) echo "slowlink: unknown host $host" >&2; exit 1;;\nesac\n'
            f'exec ip netns exec "$ns" unshare --uts env OMPI_MCA_orte_tmpdir_base={self.dir}/$ns '
            'sh -c "hostname $ns && $*"\n')
        self.agent.chmod(self.agent.stat().st_mode | stat.S_IXUSR)

    def _wait_until_up(self, timeout: float = 10.0) -> None:
        """Until the head reaches each node's management address (a TCP connect to a closed
        port answers at once with a reset once the path is up)."""
        code = ("import socket,sys,time\nend=time.time()+%f\nfor h in sys.argv[1:]:\n"
                " while True:\n  s=socket.socket(); s.settimeout(0.5)\n"
                "  try: s.connect((h, 9)); break\n  except ConnectionRefusedError: break\n"
                "  except OSError:\n   if time.time()>end: sys.exit('no route to '+h)\n"
                "   time.sleep(0.1)\n  finally: s.close()\n" % timeout)
        subprocess.run(["ip", "netns", "exec", self.ns["h"], sys.executable, "-c", code,
                        *self.hosts], check=True, capture_output=True, text=True)

    def close(self) -> None:
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- using it ---
    @property
    def env(self) -> dict[str, str]:
        """Open MPI settings for mpirun in the head namespace."""
        return {"OMPI_MCA_plm_rsh_agent": str(self.agent),
                "OMPI_MCA_btl": "self,tcp",
                "OMPI_MCA_btl_tcp_if_include": f"{DATA_NET}.0/24",
                "OMPI_MCA_oob_tcp_if_include": f"{MGMT_NET}.0/24",
                # each daemon talks to mpirun only (no routes between the nodes' daemons)
                "OMPI_MCA_routed": "direct"}

    @property
    def host_list(self) -> str:
        """``--hosts`` for ``harness launch``: one slot per node."""
        return ",".join(f"{h}:1" for h in self.hosts)

    def head(self, argv: list[str]) -> list[str]:
        """``argv`` run in the head namespace (where mpirun reaches the nodes)."""
        return ["ip", "netns", "exec", self.ns["h"], *argv]

    def tx_bytes(self) -> dict[str, int]:
        """Bytes each node has sent on the data link so far (its interface counter)."""
        out = {}
        for node in ("a", "b"):
            p = subprocess.run(["ip", "netns", "exec", self.ns[node], "cat",
                                f"/sys/class/net/{self.p}d{node}/statistics/tx_bytes"],
                               check=True, capture_output=True, text=True)
            out[node] = int(p.stdout.strip())
        return out

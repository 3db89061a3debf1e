"""A real two-node SLURM cluster on this machine, for the tests (and for trying the scripts).

munge, slurmctld and two slurmd daemons posing as ``node1`` and ``node2`` (Debian's slurm-wlm
is built with MULTIPLE_SLURMD). Each slurmd runs in its own mount namespace with a private
/tmp and /dev/shm, because PMIx keeps per-node state in /tmp/spmix_appdir_* and Open MPI names
its shared-memory segments by host and local rank: two slurmd on one host would collide there.
Job files therefore live outside /tmp (``/var/tmp/harness-slurm-*``).

    python tests/slurm_cluster.py start     # prints the SLURM_CONF to export
    python tests/slurm_cluster.py stop DIR

Needs root, slurm-wlm and munge (scripts/bootstrap.sh --with-slurm installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey", "unshare")
NODES = ("node1", "node2")
CPUS_PER_NODE = 2


def available() -> str | None:
    """None if a cluster can be started here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (slurmd and munged run as root here)"
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        return f"missing {', '.join(missing)}: run scripts/bootstrap.sh --with-slurm"
    return None


def _conf(d: Path, host: str, ctld_port: int, node_ports: list[int]) -> str:
    nodes = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} "
        "RealMemory=8000 State=UNKNOWN" for n, p in zip(NODES, node_ports))
    return f"""ClusterName=harnesstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=3600
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path | None = None) -> None:
        self.dir = Path(root or tempfile.mkdtemp(prefix="harness-slurm-", dir="/var/tmp"))
        self.conf = self.dir / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60,
                              **kw)

    def start(self) -> "Cluster":
        d = self.dir
        for sub in ("state", "munge", *(f"spool/{n}" for n in NODES),
                    *(f"tmp/{n}" for n in NODES)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        for sub in NODES:
            os.chmod(d / "tmp" / sub, 0o1777)
        key = d / "munge" / "munge.key"
        self._run(["mungekey", "--create", f"--keyfile={key}", "--force"], check=True)
        self._run(["munged", "--force", f"--key-file={key}", f"--socket={d}/munge/munge.socket",
                   f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                   f"--seed-file={d}/munge/munged.seed"], check=True)
        ports = [_free_port() for _ in range(3)]
        self.conf.write_text(_conf(d, socket.gethostname(), ports[0], ports[1:]))
        self._run(["slurmctld"], check=True)
        # a checkout under /tmp (e.g. a clone made with mktemp -d) stays visible to the jobs
        repo = Path(__file__).resolve().parents[1]
        keep = repo.relative_to("/tmp").parts[0] if repo.is_relative_to("/tmp") else None
        for node in NODES:
            tmp = d / "tmp" / node
            # private /tmp (PMIx) and /dev/shm (Open MPI's shared-memory segments are named by
            # host and local rank, so two "nodes" on one host would share them)
            carry = ""
            if keep:
                (tmp / keep).mkdir(exist_ok=True)
                carry = f'mount --bind "/tmp/{keep}" "{tmp}/{keep}" && '
            self._run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f'{carry}mount --rbind "{tmp}" /tmp && '
                       f'mount -t tmpfs -o size=2g tmpfs /dev/shm && exec slurmd -N {node}'],
                      check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self._run(["sinfo", "-h", "-o", "%T %D"]).stdout.split()
            if out[:2] == ["idle", str(len(NODES))]:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster did not come up: sinfo says {out}; logs in {d}")

    def sbatch(self, *args: str, cwd: Path | None = None, env: dict | None = None) -> int:
        full = dict(self.env, **(env or {}))
        p = subprocess.run(["sbatch", "--parsable", *args], env=full, capture_output=True,
                           text=True, timeout=60, cwd=cwd)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch failed: {p.stderr}")
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = self._run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        fields = {}
        for part in out.split():
            if "=" in part:
                k, v = part.split("=", 1)
                fields[k] = v
        return fields

    def wait(self, job_id: int, timeout: float = 300, release_requeued: bool = True) -> dict:
        """Wait until the job ends; requeued jobs are released at once (Slurm delays them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
                return info
            if release_requeued and state == "PENDING" and info.get("Reason") == "BeginTime":
                # Slurm holds a requeued job for ~2 minutes; release it once the old step is
                # surely cleaned up
                time.sleep(3)
                self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
            time.sleep(0.5)
        self._run(["scancel", str(job_id)])
        raise TimeoutError(f"job {job_id} did not finish in {timeout}s: {self.job(job_id)}")

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        self._run(["scancel", f"--signal={sig}", "--batch", str(job_id)], check=True)

    def stop(self) -> None:
        for pid_file in [*self.dir.glob("slurmd-*.pid"), self.dir / "slurmctld.pid",
                         self.dir / "munge" / "munged.pid"]:
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "start":
        reason = available()
        if reason:
            sys.exit(f"cannot start the test cluster: {reason}")
        c = Cluster().start()
        print(f"export SLURM_CONF={c.conf}   # stop with: python {sys.argv[0]} stop {c.dir}")
    elif len(sys.argv) == 3 and sys.argv[1] == "stop":
        Cluster(Path(sys.argv[2])).stop()
    else:
        sys.exit(__doc__)

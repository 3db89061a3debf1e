"""A worker that joins a running parameter-server job (``ps_join = true``).

The job's servers and workers are one MPI job; a joiner is another (``harness join RUN_DIR``
starts it with ``mpirun -np 1``), and MPI connects the two through the ``ompi-server`` that
both mpiruns were given (``harness launch --launcher mpirun`` starts one for a ``ps_join`` run).

How it joins, in ``RUN_DIR/ps-join/``:

1. Server 0 writes ``job.json`` (the run's config and world) and ``ompi-server.uri`` when the
   job starts.
2. The joiner opens one MPI port per server, writes them in ``request-<n>.json`` and rewrites
   ``alive-<n>`` every second from then on (its heartbeat).
3. Each training worker looks for requests every :data:`POLL_S` seconds and flags, in its next
   push, the first one whose heartbeat it has seen change (a joiner that died before it was
   answered is never flagged). Server 0 orders every other server to connect to the joiner's
   port for it, then connects itself: all servers take joiners in server 0's order, and the
   joiner accepts them in server order, so two joiners cannot deadlock.
4. Server 0 chooses the slot: the lowest one whose worker failed (``ps_on_worker_failure =
   continue``). The joiner takes that worker's data shard and continues from its clock, so the
   planned work of the run is done in full. With no failed slot, it is refused (exit 2).
5. The joiner tells every server its slot and id, then trains like any worker. MPI does not
   tell the job when a process of another job dies, so a server that sees the joiner's
   heartbeat stand still for ``ps_join_lost_after_s`` seconds counts it as lost, goes on
   without it and frees its slot again.

A joiner that dies in the second or so between a worker seeing its heartbeat and the servers'
connection stalls them until ``stall_timeout_s`` (MPI cannot cancel a connect); the watchdog's
report names the request.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import ConfigError

JOIN_DIR = "ps-join"
POLL_S = 0.5          # how often a training worker looks for requests


def join_dir(run_dir: Path) -> Path:
    return Path(run_dir) / JOIN_DIR


def ompi_server_uri() -> str | None:
    """The ompi-server this process's mpirun was given (``--ompi-server``), as its URI text."""
    given = os.environ.get("OMPI_MCA_pmix_server_uri")
    if not given:
        return None
    if given.startswith("file:"):
        try:
            return Path(given[5:]).read_text().strip() or None
        except OSError:
            return None
    return given


def write_job(run_dir: Path, cfg_dict: dict, world_size: int, servers: int, params: int,
              own_task: str | None, in_process_task: bool, uri: str) -> None:
    """Server 0, at the start of a ps_join run: what a joiner needs to find and join it."""
    from harness.driver import write_json_atomic

    d = join_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("request-*.json"):          # a resumed run: earlier requests are moot
        old.unlink(missing_ok=True)
    tmp = d / "ompi-server.uri.tmp"
    tmp.write_text(uri + "\n")
    os.replace(tmp, d / "ompi-server.uri")
    write_json_atomic(d / "job.json", {"config": cfg_dict, "world_size": world_size,
                                       "servers": servers, "params": params,
                                       "own_task": own_task,
                                       "in_process_task": in_process_task,
                                       "host": socket.gethostname(), "pid": os.getpid()})


def read_job(run_dir: Path) -> dict:
    path = join_dir(run_dir) / "job.json"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"run folder {str(run_dir)!r} does not exist: give the folder of a "
                          "running parameter-server job (its out_dir/run_name)")
    try:
        job = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{str(run_dir)!r} has no {JOIN_DIR}/job.json: workers can join "
                          "only a parameter-server run started with ps_join = true") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}): is {str(run_dir)!r} a ps_join run "
                          "folder?") from None
    if finished(run_dir):
        raise ConfigError(f"the run in {str(run_dir)!r} has finished (summary.json is written): "
                          "there is no job to join")
    return job


@dataclass(frozen=True)
class Request:
    id: int
    ports: list[str]
    host: str
    pid: int
    deadline: float       # time.time() after which the joiner has given up


def request_path(run_dir: Path, n: int) -> Path:
    return join_dir(run_dir) / f"request-{n}.json"


def open_request(run_dir: Path, ports: list[str], timeout: float) -> Request:
    """Write a new request (numbered 1, 2, ...: the first free number, taken atomically)."""
    d = join_dir(run_dir)
    for n in range(1, 1_000_000):
        req = Request(n, ports, socket.gethostname(), os.getpid(), time.time() + timeout)
        try:
            fd = os.open(request_path(run_dir, n).with_suffix(".claim"),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.close(fd)
        tmp = d / f"request-{n}.tmp"
        tmp.write_text(json.dumps(req.__dict__))
        os.replace(tmp, request_path(run_dir, n))
        return req
    raise ConfigError(f"{d} holds a million join requests: clear it")


def withdraw(run_dir: Path, n: int) -> None:
    request_path(run_dir, n).unlink(missing_ok=True)


def read_request(run_dir: Path, n: int) -> Request | None:
    """Request ``n``, or None when it is gone (withdrawn)."""
    try:
        return Request(**json.loads(request_path(run_dir, n).read_text()))
    except (OSError, ValueError, TypeError):
        return None


class Relay:
    """A training worker's look at the join requests: every :data:`POLL_S` seconds, the first
    request it has not flagged yet whose heartbeat it has seen change (its number), else 0.
    Liveness is judged by this worker's own clock, never by another host's time stamps."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.dir = run_dir, join_dir(run_dir)
        self.flagged: set[int] = set()
        self.beats: dict[int, str | None] = {}
        self.next = 0.0

    def poll(self) -> int:
        now = time.monotonic()
        if now < self.next:
            return 0
        self.next = now + POLL_S
        try:
            names = [p.name for p in os.scandir(self.dir) if p.name.endswith(".json")]
        except OSError:
            return 0
        for name in sorted(names):
            stem = name[len("request-"):-len(".json")]
            if not name.startswith("request-") or not stem.isdigit():
                continue
            n = int(stem)
            if n in self.flagged:
                continue
            beat, before = read_heartbeat(self.run_dir, n), self.beats.get(n)
            self.beats[n] = beat
            if beat is not None and before is not None and beat != before:
                self.flagged.add(n)
                return n
        return 0


def heartbeat_path(run_dir: Path, n: int) -> Path:
    return join_dir(run_dir) / f"alive-{n}"


def read_heartbeat(run_dir: Path, n: int) -> str | None:
    """The heartbeat count of request ``n``'s joiner (it changes every second), or None."""
    try:
        return heartbeat_path(run_dir, n).read_text()
    except OSError:
        return None


class Heartbeat:
    """A joiner's heartbeat: a counter rewritten every second (read by content, not by time
    stamp: clocks and attribute caches of a shared file system may disagree)."""

    def __init__(self, run_dir: Path, n: int) -> None:
        import threading

        self.path, self.count = heartbeat_path(run_dir, n), 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="harness-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._beat()
        self.thread.start()
        return self

    def _beat(self) -> None:
        self.count += 1
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(str(self.count))
            os.replace(tmp, self.path)
        except OSError:
            pass                     # a missed beat; ps_join_lost_after_s (>= 5 s) allows some

    def _run(self) -> None:
        while not self.done.wait(1.0):
            self._beat()

    def stop(self) -> None:
        self.done.set()
        self.path.unlink(missing_ok=True)


def main(run_dir: Path, timeout: float) -> int:
    """The joining process: under ``mpirun -np 1 --ompi-server ...`` (``harness join``)."""
    from harness.backends.base import create
    from harness.backends.common import apply_mpi_environment
    from harness.backends.mpi_comm import mpi
    from harness.config import RunConfig
    from harness.data import Sharder
    from harness.driver import load_task_data
    from harness.env import World
    from harness.logging import get_logger
    from harness.preemption import EXIT_PREEMPTED, StopFlag, Watchdog
    from harness.ps import protocol as P
    from harness.ps.plan import PSContext, PSPlan
    from harness.ps.worker import Worker

    job = read_job(run_dir)
    if job.get("in_process_task"):
        raise ConfigError(f"the run in {str(run_dir)!r} trains a task given in Python "
                          "(harness.api): a joiner cannot load it; give the task as "
                          "task = 'PATH.py:NAME' to let workers join")
    cfg = RunConfig.from_dict(job["config"], f"{run_dir}/{JOIN_DIR}/job.json")
    log = get_logger(0)
    task, data = load_task_data(cfg)
    world_size, params, S = int(job["world_size"]), int(job["params"]), int(job["servers"])
    # everything that can fail here fails before the job hears of this worker
    plan = PSPlan.of(cfg, data, params, world_size, run_dir)
    backend = create(cfg, World(world_size, world_size, 0, 1, "join"), "local")
    backend.setup(task, *data.train.batch(slice(0, plan.per_rank)), cfg.lr)
    if backend.layout.total != params:
        raise ConfigError(f"the task's model has {backend.layout.total:,} parameters, the "
                          f"running job's has {params:,}: join with the job's own code")
    apply_mpi_environment(cfg)
    MPI = mpi()
    if ompi_server_uri() is None:
        raise ConfigError("harness join must run under mpirun --ompi-server (the job's): run "
                          f"`harness join {run_dir}`, which starts it")
    ports = [MPI.Open_port() for _ in range(S)]
    req = open_request(run_dir, ports, timeout)
    heartbeat = Heartbeat(run_dir, req.id).start()     # a worker passes on a live request only
    watchdog = Watchdog(world_size, cfg.stall_timeout_s, log)
    links: list[tuple] = []
    stop = None
    try:
        # the servers connect once a training worker has passed the request on
        t0 = time.monotonic()
        log.info(f"asking to join the run in {run_dir} (request {req.id}); waiting for its "
                 f"servers (at most {timeout:g}s)")
        admit = np.empty(P.ADMIT_LEN, np.float64)
        for k, port in enumerate(ports):
            # once server 0 has connected, every other server has been ordered to: no timeout
            links.append((_accept(MPI, port, t0 + timeout if k == 0 else None, run_dir, req.id,
                                  k), 0))
            if k == 0:
                links[0][0].Recv(admit, source=0, tag=P.ADMIT)
            links[k][0].Send(admit, dest=0, tag=P.ADMIT)
        withdraw(run_dir, req.id)
        slot, wid = int(admit[P.A_SLOT]), int(admit[P.A_ID])
        if slot < 0:
            raise ConfigError(f"no worker slot of the run in {run_dir} is free: a worker can "
                              "join in the place of one that failed (ps_on_worker_failure = "
                              "'continue')")
        stop = StopFlag().install()          # a stop signal from now on preempts the job
        watchdog.rank = wid
        watchdog.start()
        log = get_logger(wid, verbose_all_ranks=True)       # its lines name its id
        log.info(f"joined as worker {wid}: it continues worker slot {slot}")
        ctx = PSContext(cfg, data, stop, {},
                        metric="acc" if "acc" in task.metrics else next(iter(task.metrics), None),
                        tokens_per_sample=task.tokens_per_sample)
        index = slot - cfg.ps_servers
        sharder = Sharder(len(data.train), plan.per_rank, index, plan.workers, cfg.seed,
                          cfg.shuffle)
        worker = Worker(MPI.COMM_SELF, MPI, ctx, plan, backend, sharder, index, log, watchdog,
                        links=links, rank=wid, relay=Relay(run_dir))
        outcome = worker.run()
        log.info(f"worker {wid}: {outcome} at clock {worker.clock} of {plan.total_steps}")
        return EXIT_PREEMPTED if outcome in ("stopped", "preempted") else 0
    finally:
        withdraw(run_dir, req.id)
        watchdog.tick(phase="disconnecting from the servers")
        for comm, _ in links:
            comm.Disconnect()
        heartbeat.stop()
        for port in ports:
            MPI.Close_port(port)
        watchdog.stop()
        if stop is not None:
            stop.uninstall()


def finished(run_dir: Path) -> bool:
    """The job has written its summary since it wrote job.json: it has ended."""
    summary, job = Path(run_dir) / "summary.json", join_dir(run_dir) / "job.json"
    try:
        return summary.stat().st_mtime >= job.stat().st_mtime
    except FileNotFoundError:
        return False


def _accept(MPI, port: str, deadline: float | None, run_dir: Path, n: int, k: int):
    """Server ``k``'s connection; after ``deadline`` (None: none), or once the job has
    finished, the request is withdrawn and the joiner ends (a server already connecting still
    gets through: the accept waits)."""
    import threading

    if deadline is None:
        return MPI.COMM_SELF.Accept(port)

    def give_up(why: str, code: int) -> None:
        withdraw(run_dir, n)
        time.sleep(2.0)             # a server that read the request just before still connects
        if not done.is_set():
            print(f"harness join: {why}", flush=True)
            os._exit(code)

    def watch() -> None:
        while not done.wait(0.5):
            if finished(run_dir):
                give_up(f"the run in {run_dir} finished while this worker waited to join: "
                        "there is no job to join", 2)
            elif time.monotonic() >= deadline:
                give_up(f"no answer from server {k} of the run in {run_dir} within the "
                        "timeout: is the job running with ps_join = true, and is a worker "
                        "still training to pass the request on?", 1)

    done = threading.Event()
    watcher = threading.Thread(target=watch, name="harness-join-wait", daemon=True)
    watcher.start()
    try:
        return MPI.COMM_SELF.Accept(port)
    finally:
        done.set()

"""Peer comparison: ``harness train``'s default sync path against what users run without it.

The peers, each a bare script in the shape its framework documents:

* ``horovod``: Horovod's own example shape (bench/bare_loop.py, ``hvd.DistributedOptimizer``),
  launched by ``mpirun`` like the harness, with the harness's Open MPI wait policy
  (``OMPI_MCA_mpi_yield_when_idle=1``) and Horovod's own defaults otherwise
  (``horovod_environment`` says why);
* ``ddp``: PyTorch ``DistributedDataParallel`` on gloo, launched by ``torchrun --standalone``
  (bench/ddp_peer.py);
* ``mwms``: TensorFlow ``MultiWorkerMirroredStrategy``, one process per worker started here with
  its ``TF_CONFIG`` (workers on localhost, free ports picked at run time), the custom training
  loop (``strategy.run`` in a ``tf.function``; bench/mwms_peer.py says why not ``model.fit``).
  At np=1 it is the same script with a one-worker cluster, what a user of the strategy runs.

Each peer is compared with the harness in its own framework: ``horovod`` and ``ddp`` with
``harness train --framework torch``, ``mwms`` with ``harness train --framework tensorflow``
(bench/bare_loop.py is launched with ``torch``), so a ratio measures the tool, not the
framework.

**Same work.** Every tool trains the project's own model (``models.load_impl``) from the same
initial weights (``spec.init_weights(seed)``) on the same synthetic array (``dataset =
"synthetic"``, same samples and seed), in the harness's batch order without shuffling (rank r of
step s takes rows ``s*G + r*B ..``, G = B x ranks), batch B = 32 per rank, the harness's per-rank
threads (cores / local ranks), SGD with the harness's default lr (x ranks) and momentum, and
cross-entropy. ``harness train`` runs with its defaults for the sync path (no ``--grad-exchange``
or ``--allreduce``), launched by ``mpirun --bind-to none``; nobody binds.

**What is timed.** Wall clock over the same steps W+1..N on rank 0, everything included, as
global samples / seconds = (N - W) x G / (t_N - t_W). The harness's t_s is the ``wall_s`` of
step s's record in metrics.jsonl, read in ``record_step`` right after step s returned and before
its own bookkeeping (harness/loop.py): t_N - t_W holds steps W+1..N whole (batch slicing, the
step, the loss and metric read, the bookkeeping that follows steps W..N-1), less step N's own
bookkeeping, which is after its mark (a few µs; bench/overhead.py measures it). The peers read
``time.perf_counter()`` at the same point of each step: bench/bare_loop.py after the optimizer
step (it does not read the loss, like Horovod's synthetic benchmarks), bench/ddp_peer.py after
``loss.item()``, bench/mwms_peer.py after reading the loss on the host. One epoch holds all N
steps, so no epoch end, evaluation or checkpoint falls inside the interval.

**Launches.** For each model (resnet20: compute-bound, 40 steps, 5 warm-up; cnn: the main job's
model, 2-4 ms steps, communication-bound, 300 steps, 30 warm-up; with ``--models gpt`` the
default gpt on random tokens, 80 steps, 10 warm-up) and ranks (1, 2), ``launches``
rounds of: harness (torch), horovod, ddp, harness (tensorflow), mwms. A ``peer_pair`` record per
round and peer holds both samples/s and the ratio harness / peer; a ``peers`` row per (model,
ranks, peer) holds the ratios' spread and both sides' median samples/s.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (REPO, emit, json_lines, median, mpirun, python, run_json_lines,
                          spread)
from harness.errors import ConfigError

#: peer -> the framework it is compared in
PEERS: dict[str, str] = {"horovod": "torch", "ddp": "torch", "mwms": "tensorflow"}
#: model -> (steps N, warm-up steps W)
STEPS: dict[str, tuple[int, int]] = {"resnet20": (40, 5), "cnn": (300, 30), "gpt": (80, 10)}
#: the models ``run`` times unless told (the gpt: ``--models gpt``)
DEFAULT_MODELS = ("resnet20", "cnn")
BATCH = 32


def samples_for(steps: int, batch: int, max_ranks: int) -> int:
    """Synthetic training samples: one epoch holds every step at the largest world size."""
    return steps * batch * max_ranks


def harness_run(framework: str, model: str, np_: int, batch: int, steps: int, warmup: int,
                samples: int) -> dict[str, Any]:
    """``harness train`` with its sync defaults; samples/s from step W's record to step N's."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        argv = mpirun(np_, bind="none") + [
            python(), "-m", "harness", "train", "--framework", framework, "--model", model,
            "--dataset", "synthetic", "--synthetic-samples", str(samples), "--no-shuffle",
            "--batch-size", str(batch), "--max-steps", str(steps), "--eval-every", "0",
            "--log-every", "100000", "--out-dir", d, "--run-name", "p"]
        run_json_lines(argv)
        run_dir = Path(d) / "p"
        records = [json.loads(line) for line in
                   (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    wall = {r["step"]: r["wall_s"] for r in records if r.get("kind") == "step"}
    epochs = [r["step"] for r in records if r.get("kind") == "epoch"]
    if any(warmup < s < steps for s in epochs):
        raise RuntimeError(f"an epoch ended inside the timed steps ({epochs}): raise samples")
    start = next(r for r in records if r.get("kind") == "run")
    seconds = wall[steps] - wall[warmup]
    return {"samples_per_s": (steps - warmup) * batch * np_ / seconds, "seconds": seconds,
            "grad_exchange": start["backend"].get("settings", {}).get("grad_exchange"),
            "gradient_path": start["backend"].get("gradient_path")}


def horovod_environment() -> dict[str, str]:
    """The bare loop's process settings: the Open MPI wait policy that ``harness train`` sets
    (``OMPI_MCA_mpi_yield_when_idle``, harness/backends/common.py), which any MPI program on
    this machine needs, and Horovod's own defaults for everything else. Not the harness's
    ``HOROVOD_*`` variables (unlike bench/overhead.py, which isolates the harness's code): its
    long idle cycle with wake-on-enqueue suits one enqueue per step, not the per-tensor
    enqueues of ``hvd.DistributedOptimizer`` (cnn np=2, *one-off*: ~6.2k samples/s with them,
    ~12.1k without)."""
    from harness.config import RunConfig

    return {"OMPI_MCA_mpi_yield_when_idle": "1"} if RunConfig().mpi_yield_when_idle else {}


def horovod_run(model: str, np_: int, batch: int, steps: int, warmup: int,
                samples: int) -> dict[str, Any]:
    """bench/bare_loop.py (torch): its ``wall_s`` is steps W+1..N, marked like the harness's."""
    env = horovod_environment()
    argv = mpirun(np_, bind="none") + [python(), "-m", "bench.bare_loop", "torch", model,
                                       str(batch), str(steps), str(samples), str(warmup)]
    rec = [r for r in run_json_lines(argv, env=env) if r.get("kind") == "bare_loop"][0]
    if "wall_s" not in rec:
        raise RuntimeError("bench/bare_loop.py reports no wall_s (steps W+1..N)")
    return {"samples_per_s": (steps - warmup) * batch * np_ / rec["wall_s"],
            "seconds": rec["wall_s"], "env": env}


def ddp_run(model: str, np_: int, batch: int, steps: int, warmup: int,
            samples: int) -> dict[str, Any]:
    torchrun = str(Path(python()).with_name("torchrun"))
    argv = [torchrun, "--standalone", f"--nproc_per_node={np_}", "bench/ddp_peer.py", model,
            str(batch), str(steps), str(samples), str(warmup)]
    return _peer_result(run_json_lines(argv), "ddp")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on localhost now (held open together while they are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("localhost", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def mwms_run(model: str, np_: int, batch: int, steps: int, warmup: int, samples: int,
             timeout: float = 1800) -> dict[str, Any]:
    """``np_`` bench/mwms_peer.py workers on localhost; worker 0 reports.

    The workers are watched together (not with ``run_json_lines``, one process at a time): a
    worker that fails leaves the others waiting for it in the strategy's collectives forever,
    so the first failure kills the rest (SIGKILL: a waiting worker ignores SIGTERM) and raises
    with its output, as ``run_json_lines`` does for one process."""
    workers = [f"localhost:{p}" for p in free_ports(np_)]
    args = [python(), "bench/mwms_peer.py", model, str(batch), str(steps), str(samples),
            str(warmup)]
    procs: list[tuple[subprocess.Popen, Any]] = []
    try:
        for i in range(np_):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
            env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
                       TF_CONFIG=json.dumps(tf_config))
            log = tempfile.TemporaryFile(mode="w+")
            procs.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                           text=True, env=env, cwd=REPO), log))
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p, _ in procs]             # every worker, each time
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            late = None in codes and time.monotonic() > deadline
            if bad or late:
                i = bad[0] if bad else 0
                procs[i][1].seek(0)
                why = f"failed ({codes[i]})" if bad else f"timed out after {timeout} s"
                raise RuntimeError(f"mwms worker {i} of {np_} {why}: {args}\n"
                                   f"{procs[i][1].read()[-5000:]}")
            if None not in codes:
                break
            time.sleep(0.1)
        log = procs[0][1]
        log.seek(0)
        return _peer_result(json_lines(log.read()), "mwms")
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def _peer_result(records: list[dict], tool: str) -> dict[str, Any]:
    rec = [r for r in records if r.get("kind") == "peer_result" and r.get("tool") == tool]
    if not rec:
        raise RuntimeError(f"{tool}: no peer_result line in its output")
    return {"samples_per_s": rec[0]["samples_per_s"], "seconds": rec[0]["seconds"]}


def run(quick: bool = False, out=None, launches: int = 3,
        models: tuple[str, ...] | None = None,
        ranks: tuple[int, ...] | None = None) -> list[dict]:
    """Interleaved rounds per (model, ranks); returns the ``peers`` rows."""
    batch = 8 if quick else BATCH
    launches = 1 if quick else launches
    models = models or (("cnn",) if quick else DEFAULT_MODELS)
    unknown = [m for m in models if m not in STEPS]
    if unknown:
        raise ConfigError(f"peers: no step plan for model {unknown[0]!r}: give "
                          f"{', '.join(STEPS)}")
    ranks = ranks or ((2,) if quick else (1, 2))
    peer_runs = {"horovod": horovod_run, "ddp": ddp_run, "mwms": mwms_run}
    rows = []
    for model in models:
        steps, warmup = (6, 2) if quick else STEPS[model]
        samples = samples_for(steps, batch, max(ranks))
        for np_ in ranks:
            pairs: dict[str, list[tuple[dict, dict]]] = {p: [] for p in PEERS}
            for launch in range(launches):
                harness: dict[str, dict] = {}
                for peer, framework in PEERS.items():     # harness first in each framework
                    if framework not in harness:
                        harness[framework] = harness_run(framework, model, np_, batch, steps,
                                                         warmup, samples)
                    h = harness[framework]
                    p = peer_runs[peer](model, np_, batch, steps, warmup, samples)
                    pairs[peer].append((h, p))
                    emit({"kind": "peer_pair", "model": model, "ranks": np_, "peer": peer,
                          "framework": framework, "launch": launch, "batch_per_rank": batch,
                          "steps": steps, "warmup": warmup,
                          "harness_samples_per_s": h["samples_per_s"],
                          "peer_samples_per_s": p["samples_per_s"],
                          "ratio": h["samples_per_s"] / p["samples_per_s"],
                          "harness_seconds": h["seconds"], "peer_seconds": p["seconds"],
                          "harness_grad_exchange": h["grad_exchange"],
                          "harness_gradient_path": h["gradient_path"],
                          **({"peer_env": p["env"]} if "env" in p else {})}, out)
            for peer, framework in PEERS.items():
                done = pairs[peer]
                row = {"kind": "peers", "model": model, "ranks": np_, "peer": peer,
                       "framework": framework, "batch_per_rank": batch, "steps": steps,
                       "warmup": warmup, "samples": samples, "launches": len(done),
                       "harness_grad_exchange": done[0][0]["grad_exchange"],
                       "harness_samples_per_s": median([h["samples_per_s"] for h, _ in done]),
                       "peer_samples_per_s": median([p["samples_per_s"] for _, p in done]),
                       "ratio": spread([h["samples_per_s"] / p["samples_per_s"]
                                        for h, p in done])}
                rows.append(row)
                emit(row, out)
    return rows

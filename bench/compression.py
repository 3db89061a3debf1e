"""Gradient compression on a slow link: what each method buys where the network is the limit.

Two virtual nodes (bench/slowlink.py: network namespaces, a veth pair shaped with ``tc tbf``
to ``rate`` each way), one rank each, MPI between them on TCP over that link only, started by
``harness launch --launcher mpirun`` as a user starts a two-node job. Each run is the README's
main job (configs/compare_digits.toml: the digits cnn, 8 epochs, batch 32 per rank), whose
~150 KB of gradients per step take ~49 ms at 25 Mbit/s against ~3 ms of computation: a
communication-bound configuration (as a 7.5 MB model on 1 Gbit/s would be).

Per launch round, for each framework: the dense run (compression = none) first, then every
method (and local SGD, post-local SGD), interleaved. Per run (``compression_run``): samples/s
(global batch over the median step), training wall time, final test accuracy, the bytes rank 0
reports sending per step, the bytes its node's interface actually sent per step (``tx_bytes``
over the run / steps: headers, Horovod's negotiation and the harness's small agreements
included), and the time to the dense run's accuracy: the first epoch end whose test accuracy
is within 1 point of the dense run's final accuracy (the dense run of the same round and
framework), on the run's own wall clock.
Per (framework, method) a ``compression_row`` holds the medians over rounds and the ratios to
dense.

    harness bench compression --launches 2 --out docs/bench-data/compression.jsonl

``--quick`` (the test's smoke run): PyTorch, dense and top-k, one epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, emit, median
from bench.slowlink import SlowLink, available
from harness.errors import EnvironmentMismatch

#: (method, its setting flags): random-k needs a large share (docs/compression.md); local SGD
#: averages weights every 8 steps, post-local SGD every 16 after 2 dense epochs (of 8)
METHODS = [("none", []), ("fp16", []), ("bf16", []), ("int8", []), ("sign", []),
           ("topk", ["--compression-ratio", "0.01"]), ("randomk", ["--compression-ratio", "0.25"]),
           ("powersgd", ["--powersgd-rank", "4"]),
           ("local-sgd", ["--local-sgd-period", "8"]),
           ("post-local-sgd", ["--local-sgd-period", "16", "--local-sgd-start-epoch", "2"])]
LOCAL = ("local-sgd", "post-local-sgd")
FRAMEWORKS = ("torch", "tensorflow")
RATE = "25mbit"


def time_to(records: list[dict[str, Any]], accuracy: float) -> float | None:
    """Wall seconds at the first epoch end with test accuracy >= ``accuracy``."""
    for r in records:
        if r.get("kind") == "epoch" and r.get("eval_acc") is not None \
                and r["eval_acc"] >= accuracy:
            return float(r["wall_s"])
    return None


def one_run(link: SlowLink, fw: str, method: str, flags: list[str], out_dir: Path,
            name: str, quick: bool) -> dict[str, Any]:
    train = ["--config", str(REPO / "configs" / "compare_digits.toml"), "--framework", fw,
             *(["--compression", method] if method not in LOCAL else []), *flags,
             "--out-dir", str(out_dir), "--run-name", name,
             "--resume", "never", "--no-tensorboard", "--allreduce", "horovod"]
    if quick:
        train += ["--epochs", "1"]
    argv = link.head([sys.executable, "-m", "harness", "launch", "--launcher", "mpirun",
                      "-np", "2", "--hosts", link.host_list, "--", *train])
    before = link.tx_bytes()
    p = subprocess.run(argv, env=dict(os.environ, **link.env), capture_output=True, text=True,
                       timeout=900, cwd=REPO)
    after = link.tx_bytes()
    if p.returncode != 0:
        raise RuntimeError(f"{fw} {method} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    run_dir = out_dir / name
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    steps = summary["steps"]
    return {"framework": fw, "method": method, "flags": flags,
            "samples_per_s": summary["samples_per_s_total"],
            "train_wall_s": summary["train_wall_s"], "final_acc": summary["final_eval_acc"],
            "sent_bytes_per_step": summary["sent_bytes_per_step"],
            "nic_tx_bytes_per_step": (after["a"] - before["a"]) / steps,
            "steps": steps, "records": records}


def run(quick: bool = False, out: str | None = None, launches: int = 1,
        rate: str = RATE) -> None:
    why = available()
    if why:
        raise EnvironmentMismatch(f"bench compression builds a slow link between network "
                                  f"namespaces, but {why}: run it as root on Linux with "
                                  "iproute2 (ip, tc) and Open MPI")
    methods = [m for m in METHODS if m[0] in ("none", "topk")] if quick else METHODS
    frameworks = ("torch",) if quick else FRAMEWORKS
    runs: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-compression-"))
    try:
        with SlowLink(rate) as link:
            for rnd in range(launches):
                for fw in frameworks:
                    dense_acc = None
                    for method, flags in methods:
                        r = one_run(link, fw, method, flags, work, f"{fw}-{method}-{rnd}", quick)
                        if method == "none":
                            dense_acc = r["final_acc"]
                        r["time_to_dense_acc_s"] = time_to(r.pop("records"), dense_acc - 0.01)
                        r.update(kind="compression_run", round=rnd, rate=rate,
                                 dense_final_acc=dense_acc)
                        emit(r, out)
                        runs.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for fw in frameworks:
        dense = [r for r in runs if r["framework"] == fw and r["method"] == "none"]
        for method, _ in methods:
            mine = [r for r in runs if r["framework"] == fw and r["method"] == method]
            row = {"kind": "compression_row", "framework": fw, "method": method, "rate": rate,
                   "launches": len(mine)}
            for key in ("samples_per_s", "train_wall_s", "final_acc", "sent_bytes_per_step",
                        "nic_tx_bytes_per_step"):
                row[key] = median([r[key] for r in mine])
            times = [r["time_to_dense_acc_s"] for r in mine]
            row["time_to_dense_acc_s"] = median(times) if None not in times else None
            d = {k: median([r[k] for r in dense]) for k in
                 ("samples_per_s", "sent_bytes_per_step", "final_acc")}
            dense_times = [r["time_to_dense_acc_s"] for r in dense]
            row["speed_vs_dense"] = row["samples_per_s"] / d["samples_per_s"]
            row["bytes_vs_dense"] = row["sent_bytes_per_step"] / d["sent_bytes_per_step"]
            row["acc_points_vs_dense"] = 100 * (row["final_acc"] - d["final_acc"])
            row["time_to_acc_vs_dense"] = (
                row["time_to_dense_acc_s"] / median(dense_times)
                if row["time_to_dense_acc_s"] is not None and None not in dense_times else None)
            emit(row, out)

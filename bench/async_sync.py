"""Asynchronous parameter server against synchronous allreduce, 2 workers, with and without one
straggler at 2x step time: samples/s and the samples needed to reach the sync run's accuracy.

Sync: ``mpirun -np 2 harness train`` (its default path: Horovod until the default became
``allreduce = "auto"``, mpi4py for PyTorch since). Async: ``mpirun -np 3 harness train --mode
async`` (1 server, 2 workers). Same model, data, seed and hyperparameters (cnn on digits)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import emit, mpirun, python, run_json_lines
from harness.metrics import read_records

COMMON = ["--framework", "torch", "--model", "cnn", "--dataset", "digits", "--lr", "0.1",
          "--momentum", "0.5", "--log-every", "100000", "--threads-per-rank", "1"]


def _run(mode: str, straggler: bool, epochs: int) -> dict:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        if mode == "sync":
            argv = mpirun(2, bind="none") + [python(), "-m", "harness", "train", *COMMON]
            slow = ["--straggler-rank", "1"]
        else:
            argv = mpirun(3, bind="none") + [python(), "-m", "harness", "train", *COMMON,
                                             "--mode", "async"]
            slow = ["--straggler-rank", "2"]
        argv += ["--epochs", str(epochs), "--out-dir", d, "--run-name", "r"]
        if straggler:
            argv += [*slow, "--straggler-factor", "2"]
        run_json_lines(argv)
        records = read_records(Path(d) / "r" / "metrics.jsonl")
        summary = [r for r in records if r["kind"] == "summary"][-1]
        evals = [(r["samples"], r["eval_acc"]) for r in records
                 if r["kind"] == "epoch" and r.get("eval_acc") is not None]
        return {"samples_per_s": summary["samples_per_s_total"],
                "final_acc": summary["final_eval_acc"], "evals": sorted(evals)}


def samples_to(evals: list[tuple[int, float]], acc: float) -> int | None:
    for samples, a in evals:
        if a >= acc:
            return samples
    return None


def run(quick: bool = False, out=None, epochs: int = 10) -> list[dict]:
    epochs = 1 if quick else epochs
    rows = []
    for straggler in ((True,) if quick else (False, True)):
        s = _run("sync", straggler, epochs)
        a = _run("async", straggler, epochs)
        target = s["final_acc"]
        s_need, a_need = samples_to(s["evals"], target), samples_to(a["evals"], target)
        row = {"kind": "async_vs_sync", "straggler_factor": 2 if straggler else 1,
               "workers": 2, "epochs": epochs,
               "sync_samples_per_s": s["samples_per_s"], "async_samples_per_s": a["samples_per_s"],
               "throughput_ratio": a["samples_per_s"] / s["samples_per_s"],
               "sync_final_acc": target, "async_final_acc": a["final_acc"],
               "sync_samples_to_acc": s_need, "async_samples_to_acc": a_need,
               "samples_ratio": (a_need / s_need) if a_need and s_need else None}
        rows.append(row)
        emit(row, out)
    return rows

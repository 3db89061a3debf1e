"""Preempt and resume across the factors that touch resume, in an all-pairs design.

Factors: framework x gradient path (Horovod's optimizer wrapper or TF's tape, the flat buffer
(the default), mpi4py, Keras model.fit) x optimizer x gradient accumulation x warm-up x where
the signal lands x world size. The full product is hundreds of jobs; every *pair* of factor
values occurs in at least one cell here. A cell is one configuration run once uninterrupted and
once as a chain of launches, each stopped by a signal at one of the configuration's signal
positions and resumed by the next launch (exit 75 each time, 0 at the end), so one chain covers
several positions. Every cell must end with the weights, learning rates, epoch losses and counts
of the uninterrupted run.

Combinations that do not exist are skipped by construction, with the reason:
``fit`` is Keras' ``model.fit`` (TensorFlow only).
"""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from conftest import checkpoint_weights, harness, latest_checkpoint, launch, needs_horovod, \
    needs_mpi, read_jsonl, run

pytestmark = [needs_horovod, needs_mpi]
#: a cell of 2 ranks is a multi-rank job; a cell of 1 rank is one process, which the test run
#: runs beside another (make test's first part)
JOB = [pytest.mark.mpi, pytest.mark.slow]
ONE_PROCESS = [pytest.mark.framework]

FACTORS = {
    "framework": ["torch", "tensorflow"],
    "path": ["optimizer", "flat", "mpi", "fit"],
    "optimizer": ["sgd", "adam"],
    "accumulation": [1, 2],
    "warmup": [False, True],
    "world": [1, 2],
}
SIGNALS = ["mid_epoch", "epoch_end", "accumulation_boundary", "checkpoint_step", "run_end"]
INVALID = {
    ("torch", "fit"): "model.fit is Keras' training loop (TensorFlow only)",
}

BATCH = 16               # per rank and micro-batch
SPE = 5                  # steps per epoch: odd, so an epoch can end inside an accumulation
EPOCHS = 2
CHECKPOINT_EVERY = 4
LR = {"sgd": 0.05, "adam": 0.02}
# the step after which the signal stops the run (1-based global steps)
SIGNAL_STEP = {"mid_epoch": 3, "checkpoint_step": 4, "epoch_end": SPE,
               "accumulation_boundary": 6, "run_end": SPE * EPOCHS}


def valid(cfg: dict) -> bool:
    return (cfg["framework"], cfg["path"]) not in INVALID


def launch_cost(c: dict) -> float:
    """Relative wall time of one launch here (TensorFlow starts slower; np=2 starts a launcher)."""
    return (2.0 if c["framework"] == "tensorflow" else 1.0) * (1.7 if c["world"] == 2 else 1.0)


def all_pairs(factors: dict[str, list], first: list[dict], seed: int) -> list[dict]:
    """Valid configurations in which every valid pair of values occurs: the ``first`` ones,
    then greedily the candidate that covers the most pairs not yet covered (cheaper launches
    and a seeded shuffle break ties)."""
    names = list(factors)
    candidates = [dict(zip(names, values)) for values in itertools.product(*factors.values())]
    candidates = [c for c in candidates if valid(c)]
    random.Random(seed).shuffle(candidates)

    def pairs(c: dict) -> set:
        return {((a, c[a]), (b, c[b])) for a, b in itertools.combinations(names, 2)}

    needed = set().union(*(pairs(c) for c in candidates))
    chosen = list(first)
    for c in first:
        needed -= pairs(c)
    while needed:
        best = max(candidates, key=lambda c: (len(pairs(c) & needed), -launch_cost(c)))
        chosen.append(best)
        needed -= pairs(best)
    return chosen


def assign_signals(configs: list[dict], first: list[dict]) -> list[dict]:
    """A chain of signal positions per configuration, so that every signal position meets
    every value of every other factor (the ``first`` configurations keep their own signals)."""
    chains: list[list[str]] = [list(c["signals"]) for c in first] + \
        [[] for _ in configs[len(first):]]
    needed = {(s, (f, c[f])) for c in configs for f in FACTORS for s in SIGNALS}
    for c, chain in zip(configs, chains):
        needed -= {(s, (f, c[f])) for f in FACTORS for s in chain}

    def gain(i: int, s: str) -> int:
        return len({(s, (f, configs[i][f])) for f in FACTORS} & needed)

    def add(i: int, s: str) -> None:
        chains[i].append(s)
        needed.difference_update({(s, (f, configs[i][f])) for f in FACTORS})

    for i in range(len(configs)):          # every configuration runs: at least one signal
        if not chains[i]:
            add(i, max(SIGNALS, key=lambda s: gain(i, s)))
    while needed:
        add(*max(((i, s) for i in range(len(configs)) for s in SIGNALS if s not in chains[i]),
                 key=lambda t: (gain(*t), -launch_cost(configs[t[0]]))))
    return [dict(c, signals=sorted(chain, key=SIGNAL_STEP.get))
            for c, chain in zip(configs, chains)]


def plan_cells(first: list[dict], tries: int = 40) -> list[dict]:
    """The cheapest of ``tries`` seeded designs (launches weighted by launch_cost)."""
    def cost(cells: list[dict]) -> float:
        return sum((len(c["signals"]) + 2) * launch_cost(c) for c in cells)

    base = [{k: c[k] for k in FACTORS} for c in first]
    designs = (assign_signals(all_pairs(FACTORS, base, seed), first) for seed in range(tries))
    return min(designs, key=cost)


# The regression cell comes first: model.fit accumulating over 2 ranks, with a signal in the
# warm-up and inside an accumulation (issue 12, items 6 and 7); the design is built around it.
FIRST = [dict(framework="tensorflow", path="fit", optimizer="adam", accumulation=2, warmup=True,
              world=2, signals=["mid_epoch", "epoch_end"])]
CELLS = plan_cells(FIRST)


def cell_id(c: dict) -> str:
    return (f"{c['framework']}-{c['path']}-{c['optimizer']}-k{c['accumulation']}-"
            f"{'warm' if c['warmup'] else 'nowarm'}-np{c['world']}-" + "+".join(c["signals"]))


def test_the_design_covers_every_pair():
    """The cells cover every valid pair of factor values, the signal position included."""
    full = dict(FACTORS, signal=SIGNALS)
    names = list(full)
    got = set()
    for c in CELLS:
        for s in c["signals"]:
            cell = dict(c, signal=s)
            got |= {((a, cell[a]), (b, cell[b])) for a, b in itertools.combinations(names, 2)}
    for values in itertools.product(*full.values()):
        cell = dict(zip(names, values))
        if valid(cell):
            for a, b in itertools.combinations(names, 2):
                assert ((a, cell[a]), (b, cell[b])) in got
    runs = sum(len(c["signals"]) + 2 for c in CELLS)
    assert len(CELLS) <= 12 and runs <= 48, (len(CELLS), runs)   # a few minutes, not hours


def train_args(c: dict, out, name: str) -> list:
    k = c["accumulation"]
    micro_global = BATCH * c["world"] * (1 if c["path"] == "fit" else k)
    samples = SPE * micro_global + 3          # a partial last batch, dropped every epoch
    args = ["--framework", c["framework"], "--model", "mlp", "--dataset", "synthetic",
            "--synthetic-samples", samples, "--batch-size", BATCH, "--epochs", EPOCHS,
            "--optimizer", c["optimizer"], "--lr", LR[c["optimizer"]],
            "--backward-passes-per-step", k, "--warmup-epochs", 1 if c["warmup"] else 0,
            "--checkpoint-every", CHECKPOINT_EVERY, "--agree-every", 1, "--log-every", 1000,
            "--out-dir", out, "--run-name", name]
    if c["path"] == "mpi":
        args += ["--allreduce", "mpi"]
    else:
        args += ["--allreduce", "horovod"]
    if c["path"] in ("flat", "optimizer"):
        args += ["--grad-exchange", c["path"]]
    if c["path"] == "fit":
        args += ["--tf-loop", "fit"]
    return args


def start(c: dict, args: list, env: dict | None = None):
    """np=2 through mpirun for every path (Horovod runs under it as under horovodrun, which
    starts twice as slowly here; horovodrun itself is covered by the other test files)."""
    argv = harness("train", *args) if c["world"] == 1 else launch("mpirun", 2, *args)
    return run(argv, env=env, timeout=240)


def step_records(run_dir) -> dict[int, dict]:
    """The last record of every step (a resumed run repeats none here, but be exact)."""
    out = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if r["kind"] == "step":
            out[r["step"]] = r
    return out


def epoch_records(run_dir) -> dict[int, dict]:
    return {r["epoch"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"}


@pytest.mark.parametrize("cell", [pytest.param(c, id=cell_id(c),
                                              marks=JOB if c["world"] == 2 else ONE_PROCESS)
                                  for c in CELLS])
def test_preempted_and_resumed_run_equals_the_uninterrupted_one(cell, results):
    ref = start(cell, train_args(cell, results, "ref"))
    assert ref.returncode == 0, ref.stderr[-4000:]
    signalled = cell["world"] - 1                  # the last rank: rank 0 learns it by agreement
    k = cell["accumulation"] if cell["path"] == "fit" else 1
    for where in cell["signals"]:
        p = start(cell, train_args(cell, results, "cut"),
                  env={"HARNESS_FAULT": f"sigusr1@{signalled}:{SIGNAL_STEP[where]}"})
        out = p.stdout + p.stderr
        assert p.returncode == 75, f"{where}: exit {p.returncode}\n{out[-4000:]}"
        # model.fit with accumulation stops at the next update boundary
        expected = -(-SIGNAL_STEP[where] // k) * k
        assert f"checkpointing at step {expected} " in out, out[-3000:]
    p = start(cell, train_args(cell, results, "cut"))
    assert p.returncode == 0, p.stderr[-4000:]

    a = checkpoint_weights(latest_checkpoint(results / "cut"))
    b = checkpoint_weights(latest_checkpoint(results / "ref"))
    assert a.keys() == b.keys()
    for key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    sa, sb = (json.loads((results / n / "summary.json").read_text()) for n in ("cut", "ref"))
    for key in ("steps", "epochs", "samples", "skipped_steps", "global_batch", "world_size"):
        assert sa[key] == sb[key], key
    assert sa["steps"] == SPE * EPOCHS and sa["ranks_consistent"]
    assert sa["steps_timed"] + sa["warmup_steps_excluded"] == sa["steps"]
    assert sa["samples_per_s_total"] is not None
    ra, rb = step_records(results / "cut"), step_records(results / "ref")
    assert sorted(ra) == sorted(rb) == list(range(1, SPE * EPOCHS + 1))
    # every loop (model.fit included) follows the one schedule: linear warm-up over the first
    # epoch from lr to lr x ranks, step s trained at the rate for s - 1 steps done
    lr = LR[cell["optimizer"]]
    peak, warm = lr * cell["world"], SPE if cell["warmup"] else 0
    for step in rb:
        done = step - 1
        want = peak if done >= warm else lr + (peak - lr) * done / warm
        assert rb[step]["lr"] == pytest.approx(want, rel=1e-6), step
        assert ra[step]["lr"] == pytest.approx(rb[step]["lr"], rel=1e-6), step
        assert ra[step]["loss"] == pytest.approx(rb[step]["loss"], rel=1e-5, abs=1e-6), step
    ea, eb = epoch_records(results / "cut"), epoch_records(results / "ref")
    assert sorted(ea) == sorted(eb) == list(range(1, EPOCHS + 1))
    for epoch in eb:
        assert ea[epoch]["train_loss"] is not None
        assert ea[epoch]["train_loss"] == pytest.approx(eb[epoch]["train_loss"], rel=1e-5)
        assert ea[epoch]["eval_loss"] == pytest.approx(eb[epoch]["eval_loss"], rel=1e-5)

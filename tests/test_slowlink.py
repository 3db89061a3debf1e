"""Two virtual nodes on a slow link (bench/slowlink.py), as the compression benchmark uses
them: ranks on different nodes talk over TCP on the shaped link only, and the bytes a run
reports sending per step are what the node's interface sends (plus headers and the small
control messages)."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench.slowlink import SlowLink, available
from conftest import PY, REPO, needs_horovod, needs_mpi, summary

pytestmark = [needs_horovod, needs_mpi, pytest.mark.mpi, pytest.mark.slow,
              pytest.mark.skipif(available() is not None, reason=str(available()))]


def train_over(link: SlowLink, out, name: str, *flags) -> tuple[dict, int]:
    """A 2-node run of the mlp over the link: (its summary, bytes node a sent meanwhile)."""
    argv = link.head([PY, "-m", "harness", "launch", "--launcher", "mpirun", "-np", "2",
                      "--hosts", link.host_list, "--", "--framework", "torch", "--model", "cnn",
                      "--dataset", "synthetic", "--synthetic-samples", 64 * 30, "--epochs", 1,
                      "--allreduce", "horovod", "--out-dir", out, "--run-name", name,
                      "--no-tensorboard", *flags])
    before = link.tx_bytes()["a"]
    p = subprocess.run([str(a) for a in argv], env=dict(os.environ, **link.env), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return summary(out / name), link.tx_bytes()["a"] - before


def test_a_run_between_two_nodes_sends_what_it_reports_over_the_shaped_link(results):
    with SlowLink("1gbit") as link:
        dense, dense_tx = train_over(link, results, "dense")
        topk, topk_tx = train_over(link, results, "topk", "--compression", "topk")
    assert dense["world_size"] == 2 and dense["ranks_consistent"]
    steps = dense["steps"]
    # the exchange's bytes are most of what crossed the link, and no more than ~1.3x of it
    # (TCP/IP headers, Horovod's negotiation, the evaluation's and agreement's reductions)
    assert dense["sent_bytes_per_step"] * steps <= dense_tx <= 1.3 * dense["sent_bytes_per_step"] \
        * steps + 2e6, (dense_tx, dense["sent_bytes_per_step"] * steps)
    # top-k at 1% sends ~1/50 of the values' bytes; on the wire that is still far below dense
    assert topk["sent_bytes_per_step"] <= dense["sent_bytes_per_step"] / 20
    assert topk_tx < dense_tx / 4, (topk_tx, dense_tx)


def test_the_link_is_removed_on_exit():
    with SlowLink("1gbit") as link:
        names = set(link.ns.values())
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert names <= {line.split()[0] for line in listed.splitlines()}
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not names & {line.split()[0] for line in listed.splitlines()}
    assert not link.dir.exists()

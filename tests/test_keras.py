"""Horovod on Keras 3 (our patch 0006) and the harness's model.fit path, under horovodrun -np 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import PY, REPO, launch, needs_horovod, read_jsonl, run, summary
from harness import checkpoint as ck
from harness.config import RunConfig
from harness.data import load_dataset
from models import get_spec

pytestmark = [needs_horovod, pytest.mark.mpi]


CHECKS = ("fit", "accumulation", "compression", "tapes", "syncbn", "schedule")


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    """All checks in one horovodrun job per Keras flavour (tf_keras: the fit check)."""
    out = {}
    for flavour, names, env in (("keras3", CHECKS, {}),
                                ("tf_keras", ("fit",), {"TF_USE_LEGACY_KERAS": "1"})):
        path = tmp_path_factory.mktemp("keras") / f"{flavour}.json"
        run(["horovodrun", "-np", "2", PY, REPO / "tests" / "keras_checks.py", ",".join(names),
             path], env=env, timeout=400, check=True)
        data = json.loads(path.read_text())
        out[flavour] = {name: {"keras": data["keras"], **res}
                        for name, res in data["checks"].items()}
    return out


def same_on_all_ranks(per_rank: list[list[float]], rtol: float = 0.0) -> bool:
    return all(np.allclose(per_rank[0], r, rtol=rtol, atol=0) for r in per_rank[1:])


@pytest.mark.parametrize("legacy", [False, True], ids=["keras3", "tf_keras"])
def test_fit_averages_broadcasts_and_warms_up(legacy, checks):
    out = checks["tf_keras" if legacy else "keras3"]["fit"]
    assert out["keras"].startswith("2." if legacy else "3.")
    # the ranks started from different weights and saw different data
    assert same_on_all_ranks(out["weights"])
    assert same_on_all_ranks(out["loss"]) and same_on_all_ranks(out["accuracy"])
    lrs, size, base = out["lrs"], out["size"], out["base_lr"]
    # warm-up from base_lr toward base_lr * size over 2 epochs of 4 steps, then constant
    assert lrs[0] == pytest.approx(base * (1 + (size - 1) / 8), rel=1e-5)
    assert all(a <= b + 1e-9 for a, b in zip(lrs, lrs[1:8]))
    assert lrs[-1] == pytest.approx(base * size, rel=1e-5)


def test_gradient_accumulation_equals_the_bigger_batch(checks):
    out = checks["keras3"]["accumulation"]
    assert out["unchanged_after_first_pass"]
    np.testing.assert_allclose(out["k2"], out["k1"], rtol=1e-5, atol=1e-6)
    assert same_on_all_ranks(out["k2_all_ranks"])


def test_fp16_compression_keeps_ranks_in_sync(checks):
    assert same_on_all_ranks(checks["keras3"]["compression"]["weights"])


def test_tapes_accept_keras_variables_and_partial_tape_keeps_local_gradients(checks):
    out = checks["keras3"]["tapes"]
    assert same_on_all_ranks(out["weights"])                 # broadcast of Keras variables
    dist, local, partial = (np.array(out[k]) for k in ("dist", "local", "partial"))
    assert same_on_all_ranks(out["dist"])
    np.testing.assert_allclose(dist[0], local.mean(axis=0), rtol=1e-5, atol=1e-7)
    n = out["n_local"]
    # local layer: each rank's own gradient scaled by 1/size; the rest averaged
    np.testing.assert_allclose(partial[:, :n], local[:, :n] / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(partial[:, n:], dist[:, n:], rtol=1e-5, atol=1e-7)
    assert not np.allclose(partial[0, :n], partial[1, :n])


def test_sync_batch_norm_uses_statistics_of_all_ranks(checks):
    out = checks["keras3"]["syncbn"]
    assert max(m[0] for m in out["max_diff"]) < 1e-4
    assert same_on_all_ranks(out["moving_mean"], rtol=1e-6)
    assert same_on_all_ranks(out["moving_var"], rtol=1e-6)
    np.testing.assert_allclose(out["moving_mean"][0], out["ref_moving_mean"], rtol=1e-5)


def test_learning_rate_schedule_callback(checks):
    out = checks["keras3"]["schedule"]
    np.testing.assert_allclose(out["lr"], [0.1, 0.1, 0.1, 0.05], rtol=1e-6)
    assert same_on_all_ranks(out["weights"])


@pytest.mark.parametrize("keras_flavour", ["keras3", "legacy"])
def test_harness_fit_loop_trains_digits(keras_flavour, results):
    ranks, epochs, lr = 2, 4, 0.05
    # mpirun starts Horovod as horovodrun does (the checks above run under horovodrun), faster
    run(launch("mpirun", ranks, "--framework", "tensorflow", "--tf-loop", "fit", "--keras",
               keras_flavour, "--model", "cnn", "--epochs", epochs, "--warmup-epochs", "1",
               "--lr", lr, "--out-dir", results, "--run-name", "fit"), timeout=300, check=True)
    s = summary(results / "fit")
    assert s["final_eval_acc"] >= 0.90
    assert s["ranks_consistent"] is True
    records = read_jsonl(results / "fit" / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    batch = RunConfig().batch_size
    spe = len(load_dataset("digits", (8, 8, 1), 10).x_train) // (ranks * batch)
    assert len(steps) == epochs * spe and all(np.isfinite(r["loss"]) for r in steps)
    assert [r["kind"] for r in records].count("epoch") == epochs
    lrs = [r["lr"] for r in records if r["kind"] == "step"]
    assert lrs[0] < lrs[-1] == pytest.approx(lr * ranks, rel=1e-5)      # warm-up ran
    # the checkpoint written at the end of training: the last step, the weights it ended with
    last = ck.load_latest(results / "fit" / "checkpoints")
    assert last is not None and last.step == epochs * spe
    assert last.meta["config"]["tf_loop"] == "fit"
    init = get_spec("cnn").init_weights(0)
    # by Keras' own variable paths ("conv1/kernel"), one per canonical parameter
    assert "conv1/kernel" in last.weights and len(last.weights) == len(init)
    assert sorted(w.size for w in last.weights.values()) == sorted(w.size for w in init.values())
    assert all(np.isfinite(w).all() for w in last.weights.values())
    assert sum(float(np.sum(w, dtype=np.float64)) for w in init.values()) != \
        pytest.approx(sum(float(np.sum(w, dtype=np.float64)) for w in last.weights.values()))
    # ... the weights the run ended with (the summary's checksum of them)
    total = sum(float(np.sum(w, dtype=np.float64)) for w in last.weights.values())
    assert total == pytest.approx(s["weights_checksum"], rel=1e-9, abs=1e-9)


def test_harness_custom_loop_on_tf_keras(results):
    run(launch("mpirun", 2, "--framework", "tensorflow", "--keras", "legacy", "--model",
               "mlp", "--epochs", "2", "--out-dir", results, "--run-name", "legacy"),
        timeout=300, check=True)
    s = summary(results / "legacy")
    rec = read_jsonl(results / "legacy" / "metrics.jsonl")[0]
    assert rec["backend"]["versions"]["keras"].startswith("2.")
    assert s["final_eval_acc"] > 0.8 and s["ranks_consistent"] is True

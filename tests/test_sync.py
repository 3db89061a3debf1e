"""Synchronous data-parallel training under real launchers (horovodrun -np 2, mpirun -np 2)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from conftest import (FRAMEWORKS, PY, REPO, checkpoint_weights, json_line,
                      latest_checkpoint, launch, needs_horovod, needs_mpi, read_jsonl, run,
                      summary)
from harness.config import RunConfig
from harness.data import load_dataset
from launchers.builders import mpirun_argv
from models import get_spec
from launchers.spec import LaunchSpec

pytestmark = [needs_horovod, pytest.mark.mpi]

RANKS, BATCH, EPOCHS = 2, 32, 4          # the digits runs below
DIGITS = ["--model", "cnn", "--dataset", "digits", "--epochs", EPOCHS, "--batch-size", BATCH,
          "--lr", "0.05", "--target-accuracy", "0.9"]


def digits_train_samples() -> int:
    return len(load_dataset("digits", (8, 8, 1), 10).x_train)


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """One -np 2 digits run per framework, shared by the tests below: PyTorch under
    horovodrun, TensorFlow under mpirun (Horovod starts the same way, in half the time)."""
    out = tmp_path_factory.mktemp("digits")
    runs = {}
    for fw in FRAMEWORKS:
        run(launch("horovodrun" if fw == "torch" else "mpirun", RANKS, "--framework", fw,
                   *DIGITS, "--out-dir", out, "--run-name", fw), timeout=300, check=True)
        runs[fw] = out / fw
    return runs


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_horovod_allreduce_two_ranks(fw):
    p = run(["horovodrun", "-np", "2", PY, REPO / "tests" / "fw_checks.py", fw, "horovod"],
            timeout=180, check=True)
    out = json_line(p.stdout, "allreduce_sum")
    assert out["size"] == 2
    assert out["allreduce_sum"] == [3.0] * 5
    assert out["allreduce_avg"] == [1.5] * 5
    assert out["broadcast"] == [1.0] * 5
    assert out["mpi_built"] and out["gloo_built"]
    if fw == "torch":
        assert out["zero_grad_set_to_none"]


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("path", ["horovod", "mpi"])
def test_broadcast_state_gives_every_rank_rank_0s_weights_and_optimizer_state(fw, path):
    spec = LaunchSpec(launcher="mpirun", np=2, allow_run_as_root=os.geteuid() == 0)
    argv = mpirun_argv(spec, [PY, REPO / "tests" / "fw_checks.py", fw, "broadcast_state", path])
    p = run(argv, timeout=180, check=True)
    rank1 = json_line(p.stdout, "differ_after")         # rank 1's alone
    before = rank1["differed_before"]
    assert rank1["rank"] == 1
    assert rank1["size"] == 2 and len(before) > 10, rank1     # weights and Adam's moments
    assert any(n.startswith("weights/") for n in before), before
    counter = "iteration" if fw == "tensorflow" else "/step"     # Adam's bias correction
    assert any(n.startswith("optimizer/") and counter in n for n in before), before
    assert rank1["differ_after"] == []


def test_tensorflow_flat_exchange_reduces_a_large_gradient_apart_and_exactly():
    """A gradient of 1 MiB or more gets an allreduce of its own (in place, no copy into the
    flat buffer and out); with the flat buffer's, every gradient is the exact sum of both
    ranks' (times gradient_predivide_factor), in its own place. Fusion is off, or Horovod would
    copy them together again."""
    spec = LaunchSpec(launcher="mpirun", np=2, allow_run_as_root=os.geteuid() == 0)
    argv = mpirun_argv(spec, [PY, REPO / "tests" / "fw_checks.py", "tensorflow", "tf_exchange"])
    out = json_line(run(argv, timeout=180, check=True).stdout, "own")
    if out["gpu"]:
        pytest.skip("on a GPU every gradient stays in the flat buffer")
    assert out["own"] == ["fc1/kernel"]
    assert out["allreduces"] == ["harness_grads", "harness_grads.0"]      # in the step's graph
    assert out["exact"] == [True] * 6
    # a float64 layer among float32 ones: a flat buffer per dtype (it failed in the concat)
    assert out["mixed_allreduces"] == ["harness_grads.0", "harness_grads.float32",
                                       "harness_grads.float64"]
    assert out["mixed_exact"] == [True] * 6
    assert out["mixed_dtypes"] == ["float32", "float64"] + ["float32"] * 4
    assert out["fusion_threshold"] == "0"


MIXED_TASK = """
import numpy as np
import harness

def model():
    import keras
    inp = keras.Input(shape=(8,))
    h = keras.layers.Dense(16, activation="relu", name="wide", dtype="float64")(inp)
    return keras.Model(inp, keras.layers.Dense(1, name="out")(h))

def mse(out, y):
    import tensorflow as tf
    return tf.reduce_mean((tf.cast(out, tf.float32)[:, 0] - y) ** 2)

rng = np.random.default_rng(0)
x = rng.random((256, 8), dtype=np.float32)
data = harness.Data(train=(x, x.sum(1)), test=(x[:64], x[:64].sum(1)))
task = harness.Task(framework="tensorflow", model=model, loss=mse, loss_name="mse", data=data)
"""


@pytest.mark.parametrize("path", ["horovod", "mpi"])
def test_a_keras_model_with_a_float64_layer_trains_on_two_ranks(tmp_path, path):
    """Found by a new-user hunt: the flat buffer's concat failed on a float64 layer among
    float32 ones (the Horovod path reduces one buffer per dtype, the mpi path in float32)."""
    (tmp_path / "mixed.py").write_text(MIXED_TASK)
    run(launch("mpirun", 2, "--task", "mixed.py:task", "--allreduce", path, "--max-steps", "8",
               "--out-dir", tmp_path / "out", "--run-name", "r"), cwd=tmp_path, timeout=180,
        check=True)
    assert summary(tmp_path / "out" / "r")["steps"] == 8


def test_a_tensor_waiting_on_a_late_rank_does_not_sleep_out_a_cycle():
    """Patch 0007: with an enqueue waking Horovod's thread and a 50 ms cycle, rank 0's thread
    negotiates again at once while its tensor waits on rank 1, instead of sleeping 50 ms after
    the negotiation that rank 1's idle wake-up joined (that made 25-27 ms steps at 20 ms)."""
    env = {"HOROVOD_WAKE_ON_ENQUEUE": "1", "HOROVOD_CYCLE_TIME": "50"}
    p = run(["horovodrun", "-np", "2", PY, REPO / "tests" / "fw_checks.py", "torch",
             "late_rank"], timeout=180, check=True, env=env)
    waits = json_line(p.stdout, "late_rank_waits_s")["late_rank_waits_s"]
    assert sorted(waits)[len(waits) // 2] < 0.010, waits


@needs_mpi
def test_mpi4py_runs_on_the_same_mpi_as_horovod():
    # that both load one libmpi is harness doctor's (test_doctor.py); here: they run on it.
    # Every rank's sum is gathered and printed by rank 0 alone: mpirun forwards each rank's
    # stdout in chunks, so two ranks printing at once may interleave mid-line.
    code = ("from mpi4py import MPI; import numpy as np; c = MPI.COMM_WORLD;"
            " a = np.array([c.rank + 1.]); c.Allreduce(MPI.IN_PLACE, a);"
            " sums = c.gather(float(a[0])); c.rank == 0 and print('sums', sums)")
    spec = LaunchSpec(launcher="mpirun", np=2, allow_run_as_root=os.geteuid() == 0)
    p = run(mpirun_argv(spec, [PY, "-c", code]), timeout=60, check=True)
    assert "sums [3.0, 3.0]" in p.stdout, p.stdout


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_digits_two_ranks_reaches_90_percent(fw, digits_runs):
    d = digits_runs[fw]
    s = summary(d)
    assert s["final_eval_acc"] >= 0.90
    assert s["world_size"] == RANKS and s["global_batch"] == RANKS * BATCH
    assert s["time_to_target_s"] is not None
    records = read_jsonl(d / "metrics.jsonl")
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "run" and kinds[-1] == "summary" and kinds.count("epoch") == EPOCHS
    run_rec = records[0]
    # allreduce = auto: PyTorch on CPU under horovodrun's MPI takes the mpi4py path (faster
    # here), TensorFlow Horovod's (docs/benchmarks.md section 1)
    path = "mpi" if fw == "torch" else "horovod"
    assert run_rec["backend"]["gradient_path"] == path
    assert run_rec["world"]["size"] == RANKS
    assert run_rec["backend"]["versions"]["horovod" if path == "horovod" else "mpi4py"]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == EPOCHS * (digits_train_samples() // (RANKS * BATCH))
    # rates from the config's batches and each step's own time: the total counts every rank's
    # samples, the per-rank rate one rank's
    for r in steps:
        assert r["samples_per_s_total"] == pytest.approx(RANKS * BATCH / r["step_time_s"])
        assert r["samples_per_s_rank"] == pytest.approx(BATCH / r["step_time_s"])
    # the summary's rate is the global batch over the median time of the timed steps
    timed = [r["step_time_s"] for r in steps][s["warmup_steps_excluded"]:]
    assert s["steps_timed"] == len(timed)
    assert s["step_time_p50_s"] == pytest.approx(float(np.median(timed)))
    assert s["samples_per_s_total"] == pytest.approx(RANKS * BATCH / float(np.median(timed)))
    assert s["samples_per_s_per_device"] == pytest.approx(s["samples_per_s_total"] / RANKS)
    assert s["samples"] == len(steps) * RANKS * BATCH
    assert json.loads((d / "config.json").read_text())["config"]["framework"] == fw


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_step_records_say_where_the_time_went_and_tensorboard_mirrors_them(fw, digits_runs):
    """Each step's data/compute/exchange/harness parts (the default flat exchange can tell the
    exchange from the backward pass in both frameworks); the summary's medians and the ranks'
    range; rank 0's TensorBoard events hold the metrics.jsonl values at the same steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = digits_runs[fw]
    records = read_jsonl(d / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    for r in steps:
        parts = [r[f"t_{p}_s"] for p in ("data", "compute", "exchange", "harness")]
        assert all(v is not None and v >= 0 for v in parts), r
        # the step time is the batch, the lr/fault checks (microseconds) and the backend's step
        assert 0 <= r["step_time_s"] - sum(parts[:3]) < 0.002, r
    later = steps[5:]
    assert float(np.median([r["t_exchange_s"] for r in later])) > 0     # 2 ranks really wait
    assert float(np.median([r["t_compute_s"] for r in later])) > 0
    b = summary(d)["time_breakdown"]
    for part in ("data", "compute", "exchange", "harness"):
        low, high = b["ranks_s"][part]
        assert 0 <= low <= high, (part, b)
        assert low <= b[f"{part}_s"] <= high, (part, b)
    assert summary(d)["startup_s"] > 0 and summary(d)["first_step_s"] > 0

    ea = EventAccumulator(str(d / "tb"))
    ea.Reload()
    loss = {e.step: e.value for e in ea.Scalars("train/loss")}
    logged = [r for r in steps if r["step"] == 1 or r["step"] % 10 == 0]   # log_every = 10
    assert sorted(loss) == [r["step"] for r in logged]
    for r in logged:
        assert loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    exchange = {e.step: e.value for e in ea.Scalars("step_time/exchange_s")}
    assert all(exchange[r["step"]] == pytest.approx(r["t_exchange_s"], rel=1e-6) for r in logged)
    epochs = [r for r in records if r["kind"] == "epoch"]
    acc = {e.step: e.value for e in ea.Scalars("eval/acc")}
    assert acc == {r["step"]: pytest.approx(r["eval_acc"], rel=1e-6) for r in epochs}
    assert "config" in ea.Tags()["tensors"]


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_allreduce_equals_single_rank_with_double_batch(fw, results):
    """np=2 with batch B == np=1 with batch 2B, through Horovod's default exchange (the flat
    buffer), through Horovod's own wrapper (grad_exchange = optimizer: DistributedOptimizer or
    DistributedGradientTape) and through mpi4py (allreduce = mpi: PyTorch's default on CPU
    under an MPI launcher, and what runs without Horovod; the results say which path ran). The
    flat exchange scales the loss by 1/size, which must give Horovod's average bit for bit at
    this power-of-two world size."""
    common = ["--framework", fw, "--model", "mlp", "--momentum", "0", "--lr-scaling", "none",
              "--lr", "0.1", "--max-steps", "15", "--eval-every", "0", "--out-dir", results]
    # mpirun starts Horovod as horovodrun does, in half the time (horovodrun: the tests above)
    run(launch("mpirun", 2, *common, "--batch-size", "16", "--allreduce", "horovod",
               "--run-name", "flat"), timeout=240, check=True)
    run(launch("mpirun", 2, *common, "--batch-size", "16", "--grad-exchange", "optimizer",
               "--run-name", "optimizer"), timeout=240, check=True)
    # PyTorch's default under an MPI launcher on CPU is the mpi4py path (allreduce = auto)
    mpi = [] if fw == "torch" else ["--allreduce", "mpi"]
    run(launch("mpirun", 2, *common, "--batch-size", "16", *mpi, "--run-name", "mpi"),
        timeout=240, check=True)
    run(launch("local", 1, *common, "--batch-size", "32", "--run-name", "np1"),
        timeout=240, check=True)
    assert read_jsonl(results / "mpi" / "metrics.jsonl")[0]["backend"]["gradient_path"] == "mpi"
    b = checkpoint_weights(latest_checkpoint(results / "np1"))
    for name in ("flat", "optimizer", "mpi"):
        a = checkpoint_weights(latest_checkpoint(results / name))
        for k in b:
            rel = np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-12)
            assert rel <= 1e-5, f"{name} {k}: relative difference {rel:.2e}"
    for name in ("flat", "optimizer"):
        rec = read_jsonl(results / name / "metrics.jsonl")[0]["backend"]
        assert rec["gradient_path"] == "horovod" and rec["settings"]["grad_exchange"] == name
        assert rec["settings"]["HOROVOD_WAKE_ON_ENQUEUE"] == "1"     # no idle cycle, any path
        # what Horovod fuses with: TensorFlow's flat exchange hands it large gradients apart
        fused = "0" if (fw, name) == ("tensorflow", "flat") else str(128 << 20)  # Horovod's
        assert rec["settings"]["HOROVOD_FUSION_THRESHOLD"] == fused
    flat = checkpoint_weights(latest_checkpoint(results / "flat"))
    avg = checkpoint_weights(latest_checkpoint(results / "optimizer"))
    for k in avg:
        assert np.array_equal(flat[k], avg[k]), f"flat {k}: not bit for bit"
    # it did train: the weights' sum moved from the initial weights' (the run record's)
    init = read_jsonl(results / "np1" / "metrics.jsonl")[0]["model"]["initial_weights_checksum"]
    assert init == pytest.approx(float(sum(np.sum(v, dtype=np.float64) for v in
                                           get_spec("mlp").init_weights(0).values())))
    assert abs(sum(np.sum(v, dtype=np.float64) for v in b.values()) - init) > 1e-3


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_horovod_knobs_are_applied(fw, results):
    """The harness sets the knobs itself (HOROVOD_* before hvd.init), whichever launcher."""
    timeline = results / "timeline.json"
    run(launch("mpirun", 2, "--framework", fw, "--model", "mlp", "--max-steps", "12",
               "--compression", "fp16", "--backward-passes-per-step", "2",
               "--gradient-predivide-factor", "2", "--fusion-threshold-mb", "8",
               "--cycle-time-ms", "2", "--horovod-timeline", timeline, "--out-dir", results,
               "--run-name", "knobs"), timeout=240, check=True)
    rec = read_jsonl(results / "knobs" / "metrics.jsonl")[0]
    settings = rec["backend"]["settings"]
    assert settings["HOROVOD_FUSION_THRESHOLD"] == str(8 * 1024 * 1024)
    assert settings["HOROVOD_CYCLE_TIME"] == "2.0"
    assert settings["compression"] == "fp16" and settings["backward_passes_per_step"] == 2
    # two ranks of two accumulated micro-batches of the default batch each
    assert summary(results / "knobs")["global_batch"] == 2 * 2 * RunConfig().batch_size
    assert timeline.exists() and "allreduce" in timeline.read_text().lower()


def test_adasum_on_gloo_is_refused_at_start(results):
    p = run(launch("horovodrun", 2, "--framework", "torch", "--model", "mlp", "--reduction",
                   "adasum", "--out-dir", results, extra=("--controller", "gloo")),
            timeout=120)
    # every rank refuses it as bad input (exit 2); horovodrun's Gloo runner reports the first
    # failed rank's code and exits 1 itself (with its own traceback)
    assert p.returncode == 1, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    assert re.search(r"Exit code: 2\n", p.stderr), p.stderr[-3000:]
    assert "needs Horovod's MPI controller" in p.stderr


def test_adasum_with_mpi_controller_trains(results):
    run(launch("horovodrun", 2, "--framework", "torch", "--model", "mlp", "--reduction",
               "adasum", "--max-steps", "20", "--out-dir", results, "--run-name", "adasum",
               extra=("--controller", "mpi")), timeout=180, check=True)
    assert summary(results / "adasum")["steps"] == 20

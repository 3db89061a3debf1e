"""Gradient compression in both frameworks: the same numbers and bytes as the NumPy
reference, training to dense accuracy at 2 ranks, and exact resumes with error feedback."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import PY, REPO, checkpoint_weights, fw_check, json_line, latest_checkpoint, \
    launch, needs_horovod, needs_mpi, read_jsonl, run
from harness import checkpoint as ckpt_io
from harness import compress as C
from launchers.builders import mpirun_argv
from launchers.spec import LaunchSpec


def reference(fw: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """What harness/compress.py's NumPy operations give for tests/fw_checks.py's inputs."""
    import fw_checks

    shapes = fw_checks.COMPRESS_SHAPES[fw]
    n = sum(int(np.prod(s)) for s in shapes)
    arrays, sent = {}, {}
    for method in C.CLASSES:
        c = C.make(method, C.NumpyOps(), n, shapes=shapes, ratio=0.05, rank=3, seed=7,
                   channels_last=fw == "tensorflow")
        for t, v in enumerate(fw_checks.compress_inputs(fw, method)):
            arrays[f"{method}/{t}"] = c.exchange(v)
        sent[method] = c.payload_bytes
    return arrays, sent


def torch_layout(fw: str, method: str, flat: np.ndarray) -> np.ndarray:
    """A flat vector in tests/fw_checks.py's Keras layout back in PyTorch's."""
    import fw_checks

    if fw == "torch" or method != "powersgd":
        return flat
    parts, off = [], 0
    for shape in fw_checks.COMPRESS_SHAPES["tensorflow"]:
        size = int(np.prod(shape))
        a = flat[off:off + size].reshape(shape)
        parts.append((a.T if a.ndim == 2 else a).ravel())
        off += size
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = {}
    for fw in ("torch", "tensorflow"):
        path = tmp_path_factory.mktemp(fw) / "compress.npz"
        answer = fw_check(fw, "compress", str(path))
        with np.load(path) as z:
            out[fw] = ({k: z[k] for k in z.files}, answer["payload_bytes"])
    return out


@pytest.mark.framework
@pytest.mark.parametrize("method", list(C.CLASSES))
def test_both_frameworks_compress_alike_and_send_the_same_bytes(method, outputs):
    """The same gradient vector, compressed by PyTorch's and TensorFlow's operations over
    three steps (error feedback, PowerSGD's warm start and random-k's cursor carried along),
    gives the NumPy reference's result and bytes. For PowerSGD TensorFlow's matrices arrive
    transposed (Keras's layout) and give the same factors."""
    results = {}
    for fw in ("torch", "tensorflow"):
        arrays, sent = outputs[fw]
        ref, ref_sent = reference(fw)
        assert sent[method] == ref_sent[method]
        for t in range(3):
            got, want = arrays[f"{method}/{t}"], ref[f"{method}/{t}"]
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{fw} {method} step {t}")
        results[fw] = [torch_layout(fw, method, arrays[f"{method}/{t}"]) for t in range(3)]
    assert outputs["torch"][1][method] == outputs["tensorflow"][1][method]
    for t in range(3):
        np.testing.assert_allclose(results["torch"][t], results["tensorflow"][t], rtol=1e-4,
                                   atol=1e-5, err_msg=f"torch vs tensorflow, {method} step {t}")


# --- real runs: 2 ranks ---------------------------------------------------------------------

#: every method over real mpi4py (the mpi gradient path's collectives) at 2 ranks that hold the
#: same gradient: the total is twice one rank's share, and a checkpoint's state round-trips
MPI_METHODS = """
import json, numpy as np
from mpi4py import MPI
from harness import compress as C
n, shapes, out = 3000, ((50, 40), (1000,)), {}
v = np.random.default_rng(1).standard_normal(n).astype(np.float32)
for method in C.CLASSES:
    one = C.make(method, C.NumpyOps(), n, shapes=shapes, ratio=0.1, rank=2)
    two = C.make(method, C.NumpyOps(MPI.COMM_WORLD), n, shapes=shapes, ratio=0.1, rank=2)
    total = two.exchange(v)
    mine = one.exchange(v)
    two.restore(two.state_arrays(), MPI.COMM_WORLD.rank)
    # PowerSGD reduces its factors before it forms the product: not twice one rank's
    out[method] = float(np.abs(total - 2 * mine).max()) if method != "powersgd" else \
        float(not (np.isfinite(total).all() and np.abs(total).max() > 0))
if MPI.COMM_WORLD.rank == 0:
    print(json.dumps({"mpi_methods": out}))
"""


@needs_mpi
@pytest.mark.mpi
def test_every_method_runs_over_mpi4py():
    """fp16 gathers float16, which mpi4py maps to no MPI datatype: it failed on the mpi path
    (allreduce = mpi, PyTorch's default under mpirun) until the gathers moved bytes. The
    single-process tests' fake communicator (tests/test_compress.py) cannot see that."""
    spec = LaunchSpec(launcher="mpirun", np=2, allow_run_as_root=os.geteuid() == 0)
    p = run(mpirun_argv(spec, [PY, "-c", MPI_METHODS]), timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json_line(p.stdout, "mpi_methods")["mpi_methods"]
    assert sorted(got) == sorted(C.CLASSES)
    assert all(err <= 1e-5 for err in got.values()), got

#: "a>b": stopped on path a, resumed on path b (the reference runs on b): allreduce = auto
#: moves a run between them (Horovod at 1 rank before, horovodrun on Gloo or MPI, a GPU run
#: resumed on CPU), and both keep the residuals at one scale
RESUME_CELLS = [("torch", "horovod", "randomk"), ("tensorflow", "horovod", "powersgd"),
                ("torch", "horovod>mpi", "topk"), ("tensorflow", "mpi>horovod", "sign"),
                # local SGD: each rank's optimizer state (SGD momentum, Adam's moments)
                ("torch", "horovod", "local-sgd"), ("tensorflow", "mpi", "local-adam")]
#: local SGD every 3 steps: averages at steps 3, 5 (the epoch's end), 8 and 10; the learning
#: rate warms up over the whole run, so a resume must not keep the saved step's rate
LOCAL = {"local-sgd": ["--local-sgd-period", 3, "--warmup-epochs", 2],
         "local-adam": ["--local-sgd-period", 3, "--optimizer", "adam", "--lr", 0.01,
                        "--warmup-epochs", 2]}


def resume_args(fw: str, path: str, method: str, out, name: str) -> list:
    settings = ["--compression", method, "--compression-ratio", 0.05, "--powersgd-rank", 2] \
        if method not in LOCAL else LOCAL[method]
    return ["--framework", fw, "--model", "mlp", "--dataset", "synthetic",
            "--synthetic-samples", 5 * 32 + 3, "--batch-size", 16, "--epochs", 2,
            "--lr", 0.05, "--allreduce", path, *settings, "--agree-every", 1,
            "--log-every", 1000, "--out-dir", out, "--run-name", name]


@needs_horovod
@needs_mpi
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("fw, path, method", RESUME_CELLS,
                         ids=["-".join(c).replace(">", "-to-") for c in RESUME_CELLS])
def test_a_resume_with_error_feedback_is_exact(fw, path, method, results):
    """Stopped by a signal at step 7 of 10 and resumed, a compressed run ends with the
    uninterrupted run's weights and losses: every rank's residual (and PowerSGD's Q, random-k's
    cursor) travels through the checkpoint. Under local SGD the stop waits for the average at
    step 8, and each rank's own optimizer state travels."""
    first, _, then = path.partition(">")
    then = then or first
    ref = run(launch("mpirun", 2, *resume_args(fw, then, method, results, "ref")), timeout=240)
    assert ref.returncode == 0, ref.stderr[-4000:]
    cut = run(launch("mpirun", 2, *resume_args(fw, first, method, results, "cut")), timeout=240,
              env={"HARNESS_FAULT": "sigusr1@1:7"})
    assert cut.returncode == 75, (cut.stdout + cut.stderr)[-4000:]
    stopped = latest_checkpoint(results / "cut")
    with np.load(stopped) as z:
        rows = [z[k] for k in z.files if k.startswith("e/opt/")] if method in LOCAL else \
            [z["e/residual"]]
    assert stopped.name == f"ckpt-{8 if method in LOCAL else 7:09d}.npz"
    # its residuals' scale is one on every path (harness.train.presum_exchange)
    assert ckpt_io.load(stopped).meta["gradient_scale"] == "before_sum"
    assert rows and all(r.shape[0] == 2 for r in rows)
    assert max(np.abs(r[0] - r[1]).max() for r in rows) > 0         # one per rank
    again = run(launch("mpirun", 2, *resume_args(fw, then, method, results, "cut")),
                timeout=240)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "not exact" not in again.stderr
    a = checkpoint_weights(latest_checkpoint(results / "cut"))
    b = checkpoint_weights(latest_checkpoint(results / "ref"))
    for key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    la = {r["step"]: r["loss"] for r in read_jsonl(results / "cut" / "metrics.jsonl")
          if r["kind"] == "step"}
    lb = {r["step"]: r["loss"] for r in read_jsonl(results / "ref" / "metrics.jsonl")
          if r["kind"] == "step"}
    assert sorted(la) == sorted(lb) == list(range(1, 11))
    for step in lb:
        assert la[step] == pytest.approx(lb[step], rel=1e-5, abs=1e-6), step


@needs_horovod
@needs_mpi
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("fw", ["torch", "tensorflow"])
def test_every_method_trains_the_digits_cnn_to_dense_accuracy(fw, results):
    """At 2 ranks every method ends within 2 points of the dense run's test accuracy (random-k
    at 25%, the others at their defaults: top-k 1%, PowerSGD rank 4; local SGD every 8 steps,
    post-local SGD every 16 after 2 dense epochs) and sends the bytes its method implies."""
    methods = [*C.METHODS, "local-sgd", "post-local-sgd"]
    p = run(["horovodrun", "-np", "2", PY, REPO / "tests" / "fw_checks.py", fw,
             "compressed_training", results, ",".join(methods)], timeout=540)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    got = json_line(p.stdout, "compressed_training")["compressed_training"]
    dense = got["none"]
    assert dense["acc"] > 0.95 and dense["sent_bytes"] == dense["dense_bytes"]
    for method in methods[1:]:
        assert got[method]["acc"] >= dense["acc"] - 0.02, (method, got[method], dense)
        assert 0 < got[method]["sent_bytes"] < dense["sent_bytes"], (method, got[method])
        assert got[method]["consistent"], method          # local SGD: averaged at the end
    # 22 steps an epoch: local SGD averages at steps 8, 16 and 22 of each (3 of 22 steps);
    # post-local SGD sends dense for 2 epochs, then averages at 16 and 22 (2 of 22)
    assert got["local-sgd"]["sent_bytes"] == pytest.approx(dense["sent_bytes"] * 3 / 22)
    assert got["post-local-sgd"]["sent_bytes"] == pytest.approx(
        dense["sent_bytes"] * (2 * 22 + 6 * 2) / (8 * 22))
    assert got["fp16"]["sent_bytes"] == got["bf16"]["sent_bytes"] == dense["sent_bytes"] // 2
    assert got["topk"]["sent_bytes"] <= dense["sent_bytes"] / 20
    assert got["sign"]["sent_bytes"] < dense["sent_bytes"] / 25


@needs_mpi
@pytest.mark.mpi
@pytest.mark.slow
def test_a_checkpoint_while_a_rank_has_no_optimizer_state_yet_does_not_hang(results):
    """Local SGD with nan_policy = skip: rank 1's first step is skipped, so PyTorch has made no
    optimizer state on it when the average after that step checkpoints. The checkpoint's
    gathers still match on both ranks (it holds rank 0's state for every rank, and says so)."""
    args = [*resume_args("torch", "mpi", "local-sgd", results, "skip"), "--local-sgd-period", 1,
            "--nan-policy", "skip", "--checkpoint-every", 1, "--max-steps", 4]
    p = run(launch("mpirun", 2, *args), timeout=240, env={"HARNESS_FAULT": "nan@1:1"})
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stderr.count("a rank has no optimizer state yet") == 1        # step 1's only
    with np.load(latest_checkpoint(results / "skip")) as z:       # both ranks have state now
        assert [k for k in z.files if k.startswith("e/opt/")]

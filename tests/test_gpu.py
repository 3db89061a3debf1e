"""What can run on one NVIDIA GPU: device pinning by local rank, PyTorch training on CUDA through
each gradient path that exists on the machine, host staging on the mpi4py path, and
``harness doctor`` reporting the GPU.

Marked ``gpu`` and skipped without CUDA: the CPU check is a file test (no framework import in the
test process), and only where a GPU device node exists does one subprocess ask torch. Each path
skips on its own when its runtime is missing (mpirun/mpi4py, Horovod), so ``scripts/gpu_check.sh``
shows what ran and what did not. Clusters put one rank on each GPU (``--gpus-per-task 1``): the
two-rank runs here share the one GPU, which exercises the same code with local ranks 0 and 1.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PY, checkpoint_weights, harness, have, latest_checkpoint, launch, \
    read_jsonl, run, summary


@functools.lru_cache(maxsize=1)
def cuda_devices() -> int:
    """GPUs torch can use here (0 without an NVIDIA device node: no torch import then)."""
    if not (Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi")):
        return 0
    p = subprocess.run([PY, "-c", "import torch; print(torch.cuda.device_count() "
                        "if torch.cuda.is_available() else 0)"],
                       capture_output=True, text=True, timeout=120)
    return int(p.stdout.strip() or 0) if p.returncode == 0 else 0


needs_cuda = pytest.mark.skipif("not cuda_devices()", reason="no CUDA GPU visible to torch")
needs_mpirun = pytest.mark.skipif(not have("mpi4py") or not shutil.which("mpirun"),
                                  reason="mpi4py or mpirun missing")
needs_horovod = pytest.mark.skipif(not have("horovod"), reason="Horovod is not installed")

pytestmark = [pytest.mark.gpu, needs_cuda]

MLP = ["--framework", "torch", "--model", "mlp", "--momentum", "0", "--lr-scaling", "none",
       "--lr", "0.1", "--max-steps", "15", "--eval-every", "0"]
DIGITS = ["--framework", "torch", "--model", "cnn", "--dataset", "digits", "--epochs", "4",
          "--lr", "0.05"]

PINNING = r"""
import json, sys
import torch
from harness.backends.horovod_torch import LocalTorchBackend
from harness.config import RunConfig
from harness.driver import load_task_data
from harness.env import World

cfg = RunConfig(framework="torch", model="mlp")
task, data = load_task_data(cfg)
out = {}
for local_rank in (0, 1, 3):
    b = LocalTorchBackend(cfg, World(0, 1, local_rank, 4, "test"), threads=1)
    x, y = data.train.batch(list(range(8)))
    b.setup(task, x, y, 0.1)
    params = {str(p.device) for p in b.model.parameters()}
    result = b.train_step(x, y)
    out[local_rank] = {"device": str(b.device), "params": sorted(params),
                       "current": torch.cuda.current_device(), "loss": result.loss,
                       "info": b.info().settings["device"]}
print(json.dumps({"count": torch.cuda.device_count(), "ranks": out}))
"""


def test_each_local_rank_is_pinned_to_its_gpu():
    p = run([PY, "-c", PINNING], timeout=300, check=True)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for local_rank, r in got["ranks"].items():
        want = f"cuda:{int(local_rank) % got['count']}"
        assert r["device"] == want and r["params"] == [want] and r["info"] == want, r
        assert r["current"] == int(local_rank) % got["count"]
        assert np.isfinite(r["loss"])


def _path_args(path: str) -> tuple[str, int, list[str]]:
    """(launcher, ranks, extra train flags) of one gradient path."""
    return {"local": ("local", 1, ["--allreduce", "local"]),
            "mpi": ("mpirun", 2, ["--allreduce", "mpi"]),
            "horovod-flat": ("mpirun", 2, ["--allreduce", "horovod", "--grad-exchange", "flat"]),
            "horovod-optimizer": ("mpirun", 2, ["--allreduce", "horovod",
                                                "--grad-exchange", "optimizer"])}[path]


@pytest.mark.parametrize("path", [
    "local",
    pytest.param("mpi", marks=needs_mpirun),
    pytest.param("horovod-flat", marks=[needs_mpirun, needs_horovod]),
    pytest.param("horovod-optimizer", marks=[needs_mpirun, needs_horovod]),
])
def test_torch_trains_digits_on_cuda(path, results):
    launcher, ranks, extra = _path_args(path)
    run(launch(launcher, ranks, *DIGITS, *extra, "--out-dir", results, "--run-name", "r"),
        timeout=600, check=True)
    rec = read_jsonl(results / "r" / "metrics.jsonl")[0]["backend"]
    assert rec["gradient_path"] == path.split("-")[0]
    assert rec["settings"]["device"].startswith("cuda"), rec
    s = summary(results / "r")
    assert s["final_eval_acc"] >= 0.9, s
    assert s.get("ranks_consistent", True), s


@needs_mpirun
def test_mpi_path_stages_gradients_through_the_host_exactly(results):
    """The mpi4py path copies the CUDA gradient buffer to the host, reduces it there and copies
    it back: np=2 with batch B must equal np=1 with batch 2B (cuBLAS picks kernels by shape,
    so the sums differ in order: 1e-4 relative, against 1e-5 on CPU)."""
    run(launch("mpirun", 2, *MLP, "--batch-size", "16", "--allreduce", "mpi",
               "--out-dir", results, "--run-name", "mpi"), timeout=300, check=True)
    run(launch("local", 1, *MLP, "--batch-size", "32", "--allreduce", "local",
               "--out-dir", results, "--run-name", "np1"), timeout=300, check=True)
    for name in ("mpi", "np1"):
        device = read_jsonl(results / name / "metrics.jsonl")[0]["backend"]["settings"]["device"]
        assert device.startswith("cuda"), (name, device)
    a = checkpoint_weights(latest_checkpoint(results / "mpi"))
    b = checkpoint_weights(latest_checkpoint(results / "np1"))
    init = read_jsonl(results / "np1" / "metrics.jsonl")[0]["model"]["initial_weights_checksum"]
    assert abs(sum(float(v.sum()) for v in b.values()) - init) > 1e-3      # it did train
    for k in b:
        rel = np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-12)
        assert rel <= 1e-4, f"{k}: relative difference {rel:.2e}"


def test_doctor_reports_the_gpu():
    p = run(harness("doctor", "--require", "torch,gpu", "--json"), timeout=300)
    facts = json.loads(p.stdout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert facts["facts"]["torch"]["cuda"] is True and facts["facts"]["torch"]["gpus"] >= 1
    gpu = [f for f in facts["findings"] if f["component"] == "gpu"][0]
    assert gpu["status"] == "ok" and "GPU(s)" in gpu["detail"], gpu


def test_every_compression_method_on_cuda_gives_the_reference_numbers(tmp_path):
    """PyTorch's compression operations on the GPU (three steps with their state: residuals,
    PowerSGD's Q, random-k's cursor) give the NumPy reference's results and bytes."""
    from conftest import fw_check
    from test_compression import reference

    answer = fw_check("torch", "compress", str(tmp_path / "c.npz"), "cuda")
    ref, ref_sent = reference("torch")
    assert answer["payload_bytes"] == ref_sent
    with np.load(tmp_path / "c.npz") as z:
        for key, want in ref.items():
            np.testing.assert_allclose(z[key], want, rtol=1e-4, atol=1e-5, err_msg=key)


@needs_mpirun
@pytest.mark.parametrize("path", ["mpi", pytest.param("horovod-flat", marks=needs_horovod)])
def test_local_sgd_averages_cuda_weights(path, results):
    """Local SGD on the GPU: local steps on CUDA, the weights averaged through the host (mpi4py)
    or on the device (Horovod) every 4 steps; the ranks end with one model."""
    launcher, ranks, extra = _path_args(path)
    run(launch(launcher, ranks, *DIGITS, *extra, "--local-sgd-period", "4",
               "--out-dir", results, "--run-name", "r"), timeout=600, check=True)
    s = summary(results / "r")
    assert s["final_eval_acc"] >= 0.9 and s["ranks_consistent"], s
    assert s["local_sgd_period"] == 4 and 0 < s["sent_bytes_per_step"] < s["dense_bytes_per_step"]

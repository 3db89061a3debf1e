"""harness doctor: real environment report, and problem detection."""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest

from conftest import PY, harness, needs_horovod, needs_mpi, run
from harness.doctor import FAIL, OK, WARN, diagnose, failed_requirements

GOOD = {
    "python": "3.11.7",
    "torch": {"version": "2.13.0", "gpus": 0, "cuda": False, "horovod_version": "0.28.1",
              "horovod": {"mpi": True, "gloo": True, "nccl": False}},
    "tensorflow": {"version": "2.21.0", "keras": "3.15.1", "gpus": 0, "cuda": False,
                   "horovod_version": "0.28.1", "horovod": {"mpi": True, "gloo": True}},
    "mpi4py": {"version": "4.1.2", "library": "Open MPI v4.1.4"},
    "mpi4py_libmpi": "/usr/lib/libmpi.so.40", "horovod_libmpi": "/usr/lib/libmpi.so.40",
    "mpirun": "mpirun (Open MPI) 4.1.4", "slurm": None, "nvidia_smi": None,
}


def by_component(findings):
    return {f.component: f for f in findings}


def test_healthy_facts_have_no_failed_requirement():
    findings = diagnose(GOOD)
    assert not failed_requirements(findings, ["torch", "tensorflow", "horovod", "mpi4py"])


def test_horovod_without_pytorch_is_flagged_with_the_fix():
    facts = json.loads(json.dumps(GOOD))
    facts["torch"].pop("horovod")
    facts["torch"]["horovod_error"] = "ImportError: extension horovod.torch has not been built"
    f = by_component(diagnose(facts))["horovod-torch"]
    assert f.status == FAIL and "built without PyTorch" in f.detail
    assert "HOROVOD_WITH_PYTORCH=1" in f.fix
    bad = failed_requirements(diagnose(facts), ["torch", "horovod"])
    assert [b.component for b in bad] == ["horovod-torch"]


def test_missing_framework_and_mismatched_mpi():
    facts = json.loads(json.dumps(GOOD))
    facts["tensorflow"] = {"error": "ModuleNotFoundError: No module named 'tensorflow'"}
    facts["horovod_libmpi"] = "/opt/mpich/lib/libmpi.so.12"
    found = diagnose(facts)
    comp = {(f.component, f.status) for f in found}
    assert ("tensorflow", FAIL) in comp and ("horovod-tensorflow", FAIL) in comp
    mpi = [f for f in found if f.component == "mpi4py" and f.status == FAIL]
    assert mpi and "another MPI than Horovod" in mpi[0].detail
    assert by_component(diagnose(GOOD))["torch"].status == OK


def test_every_horovod_path_wakes_on_enqueue(monkeypatch):
    from harness.backends.common import horovod_environment
    from harness.config import RunConfig

    for var in ("HOROVOD_WAKE_ON_ENQUEUE", "HOROVOD_CYCLE_TIME"):
        monkeypatch.delenv(var, raising=False)
    for cfg in (RunConfig(), RunConfig(grad_exchange="optimizer"),
                RunConfig(framework="tensorflow", tf_loop="fit")):
        env = horovod_environment(cfg)
        assert env["HOROVOD_WAKE_ON_ENQUEUE"] == "1", cfg.exchange
        assert "HOROVOD_CYCLE_TIME" not in env              # Horovod's own 1 ms
    assert horovod_environment(RunConfig(cycle_time_ms=2))["HOROVOD_CYCLE_TIME"] == "2.0"
    monkeypatch.setenv("HOROVOD_WAKE_ON_ENQUEUE", "0")     # the user's choice stays
    assert "HOROVOD_WAKE_ON_ENQUEUE" not in horovod_environment(RunConfig())


def test_tensorflows_flat_exchange_turns_fusion_off_unless_set(monkeypatch):
    """It hands Horovod its large gradients apart, to reduce in place: fusion would copy them."""
    from harness.backends.common import horovod_environment
    from harness.config import RunConfig

    for var in ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_AUTOTUNE"):
        monkeypatch.delenv(var, raising=False)
    def fusion(**kw):
        return horovod_environment(RunConfig(**kw)).get("HOROVOD_FUSION_THRESHOLD")

    assert fusion(framework="tensorflow") == "0"
    assert fusion(framework="tensorflow", grad_exchange="optimizer") is None
    assert fusion(framework="tensorflow", compression="topk") is None   # one vector, compressed
    assert fusion() is None                             # PyTorch's flat buffer is one tensor
    assert fusion(framework="tensorflow", fusion_threshold_mb=8) == str(8 << 20)
    for var in ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_AUTOTUNE"):    # the user's choice stays
        monkeypatch.setenv(var, "1")
        assert fusion(framework="tensorflow") is None
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOROVOD_AUTOTUNE", "0")          # off, as Horovod reads it
    assert fusion(framework="tensorflow") == "0"


@pytest.mark.framework
@needs_horovod
def test_real_doctor_reports_the_build():
    p = run(harness("doctor"), timeout=300, check=True)
    assert "Horovod 0.28.1 with PyTorch: controllers MPI, GLOO" in p.stdout
    assert "Horovod 0.28.1 with TensorFlow: controllers MPI, GLOO" in p.stdout
    assert "all required components usable" in p.stdout
    assert "mpi4py and Horovod share /" in p.stdout       # one libmpi, resolved on both sides


def test_doctor_detects_a_missing_framework(tmp_path):
    """Simulate a machine without TensorFlow: a shadowing package that fails to import."""
    fake = tmp_path / "shadow" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: no tensorflow here')\n")
    p = run([PY, "-m", "harness", "doctor", "--require", "tensorflow"], timeout=300,
            env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert p.returncode == 1
    assert "simulated: no tensorflow here" in p.stdout
    assert "problem(s) with required components (tensorflow)" in p.stdout
    p = run(harness("doctor", "--require", "torch,nonsense"))
    assert p.returncode == 2 and "unknown component(s) nonsense" in p.stderr


# --- MPI that cannot start, HOROVOD_* variables (issue 12, item 20) ----------------------------

OPEN_MPI_NO_SSH = """--------------------------------------------------------------------------
The value of the MCA parameter "plm_rsh_agent" was set to a path
that could not be found:

  plm_rsh_agent: ssh : rsh

Please either unset the parameter, or check that the path is correct
--------------------------------------------------------------------------
[vm:28997] [[INVALID],INVALID] ORTE_ERROR_LOG: Unable to start a daemon on the local node \
in file ess_singleton_module.c at line 716
  ompi_mpi_init: ompi_rte_init failed
  --> Returned "Unable to start a daemon on the local node" (-127) instead of "Success" (0)
*** An error occurred in MPI_Init
[vm:28997] Local abort before MPI_INIT completed completed successfully, but am not able to \
aggregate error messages, and not able to guarantee that all other processes were killed!
"""


def test_the_cause_of_an_mpi_start_failure_is_picked_out():
    from harness.doctor import mpi_start_failure

    assert "neither ssh nor rsh on PATH" in mpi_start_failure(OPEN_MPI_NO_SSH)
    no_daemon = OPEN_MPI_NO_SSH.split("[vm:28997] [[INVALID]")[1]
    assert mpi_start_failure(no_daemon) == "Unable to start a daemon on the local node"


def test_mpi4py_that_imports_but_cannot_start_mpi_says_so():
    facts = json.loads(json.dumps(GOOD))
    facts["mpi4py"]["init_error"] = "Open MPI found neither ssh nor rsh on PATH (...)"
    facts["mpirun"] = None
    found = [f for f in diagnose(facts) if f.component == "mpi4py"]
    assert [f.status for f in found] == [FAIL]
    assert "mpi4py 4.1.2 imports (Open MPI v4.1.4), but MPI cannot start" in found[0].detail
    assert "neither ssh nor rsh" in found[0].detail and "mpirun is not on PATH" in found[0].detail
    assert "ssh" in found[0].fix and "does not import" not in found[0].detail


def env_findings(env, **facts_changes):
    facts = json.loads(json.dumps(GOOD))
    facts.update(horovod_env=env, **facts_changes)
    return [f for f in diagnose(facts) if f.component == "horovod-env"]


def test_horovod_variables_are_checked():
    (f,) = env_findings({"HOROVOD_CONTROLLER": "bogus"})
    assert f.status == FAIL and "HOROVOD_CONTROLLER='bogus' is not one of mpi, gloo" in f.detail
    assert failed_requirements([f], ["horovod"]) == [f]
    (f,) = env_findings({"HOROVOD_FUSION_THRESHOLD": "64MB"})
    assert f.status == FAIL and "would read it as 64" in f.detail
    (f,) = env_findings({"HOROVOD_CONTROLLER": "gloo"},
                        torch={**GOOD["torch"], "horovod": {"mpi": True, "gloo": False}},
                        tensorflow={**GOOD["tensorflow"], "horovod": {"mpi": True}})
    assert f.status == FAIL and "built without GLOO" in f.detail
    (f,) = env_findings({"HOROVOD_STALL_CHECK_TIME_SECONDS": "5"})
    assert f.status == WARN and "--stall-timeout-s" in f.fix
    (f,) = env_findings({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"})
    assert f.status == WARN and "HOROVOD_RANK, HOROVOD_SIZE" in f.detail
    (f,) = env_findings({"HOROVOD_CONTROLLER": "MPI", "HOROVOD_CYCLE_TIME": "2.5"})
    assert f.status == OK and "HOROVOD_CONTROLLER=MPI" in f.detail


def test_a_timeline_horovod_cannot_write_is_refused_before_horovod_starts(monkeypatch,
                                                                          tmp_path):
    """Found by a new-user hunt: Horovod said so in one C++ line and trained on without it.
    Rank 0 writes it, and makes its folder (inside a run folder that does not exist yet)."""
    from harness.backends.common import apply_horovod_environment
    from harness.config import RunConfig
    from harness.errors import ConfigError

    monkeypatch.delenv("HOROVOD_TIMELINE", raising=False)
    (tmp_path / "file").write_text("")
    bad = str(tmp_path / "file" / "t.json")
    with pytest.raises(ConfigError, match=rf"the Horovod timeline '{bad}' cannot be written: "
                       rf"'{tmp_path / 'file'}' is not a folder"):
        apply_horovod_environment(RunConfig(horovod_timeline=bad))
    (f,) = env_findings({"HOROVOD_TIMELINE": bad})
    assert f.status == FAIL and "cannot be written" in f.detail
    with mock.patch.dict(os.environ):
        apply_horovod_environment(RunConfig(horovod_timeline=bad), rank=1)   # not its file
    new = tmp_path / "runs" / "r" / "t.json"
    for fine in (str(new), "DYNAMIC"):
        assert env_findings({"HOROVOD_TIMELINE": fine})[0].status == OK
        with mock.patch.dict(os.environ):
            apply_horovod_environment(RunConfig(horovod_timeline=fine))
    assert new.parent.is_dir()


def test_a_bad_horovod_variable_is_refused_before_horovod_starts(monkeypatch):
    from harness.backends.common import apply_horovod_environment
    from harness.config import RunConfig
    from harness.errors import ConfigError

    monkeypatch.setenv("HOROVOD_CONTROLLER", "bogus")
    monkeypatch.delenv("HOROVOD_STALL_CHECK_TIME_SECONDS", raising=False)
    with pytest.raises(ConfigError, match="HOROVOD_CONTROLLER='bogus' is not one of mpi, gloo"):
        apply_horovod_environment(RunConfig())
    assert "HOROVOD_STALL_CHECK_TIME_SECONDS" not in os.environ       # nothing exported
    monkeypatch.setenv("HOROVOD_CONTROLLER", "gloo")
    monkeypatch.setenv("HOROVOD_STALL_CHECK_TIME_SECONDS", "soon")    # the harness sets it
    # what it exports must not outlive this test: the processes later tests start inherit it
    with mock.patch.dict(os.environ):
        env = apply_horovod_environment(RunConfig())
        assert os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] == \
            env["HOROVOD_STALL_CHECK_TIME_SECONDS"]
    assert os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "soon"


@pytest.mark.framework
@needs_horovod
def test_training_with_a_bad_controller_stops_with_one_line(tmp_path):
    """Before: Horovod's background thread threw and the process aborted (exit 134)."""
    p = run(harness("train", "--allreduce", "horovod", "--model", "mlp", "--epochs", "1",
                    "--out-dir", tmp_path / "out"), env={"HOROVOD_CONTROLLER": "bogus"},
            timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == [
        "harness: error (rank 0): HOROVOD_CONTROLLER='bogus' is not one of mpi, gloo (Horovod "
        "would abort at start): set one of them, or unset it (horovodrun sets it for its ranks)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.framework
@needs_mpi
def test_real_doctor_without_mpi_on_path_and_a_bad_controller(tmp_path):
    """No mpirun (nor ssh) on PATH: mpi4py imports, MPI cannot start, and the doctor says why;
    HOROVOD_CONTROLLER=bogus is a problem, not "all usable"."""
    empty = tmp_path / "bin"
    empty.mkdir()
    p = run([PY, "-m", "harness", "doctor", "--require", "horovod,mpi4py"], timeout=300,
            env={"PATH": str(empty), "HOROVOD_CONTROLLER": "bogus"})
    assert p.returncode == 1, p.stdout + p.stderr
    lines = {ln.split()[1]: ln for ln in p.stdout.splitlines() if ln.startswith("[")}
    assert "HOROVOD_CONTROLLER='bogus' is not one of mpi, gloo" in p.stdout
    assert "does not import" not in p.stdout
    assert "imports (Open MPI" in lines["mpi4py"] and "neither ssh nor rsh" in lines["mpi4py"]
    assert "no mpirun on PATH" in lines["mpirun"]


@pytest.mark.framework
def test_gpu_check_script_runs_cleanly_without_a_gpu():
    """scripts/gpu_check.sh on a machine without a GPU: exit 0, every gpu test listed as
    skipped with the reason (on a GPU machine the same table shows what ran: docs/gpu.md)."""
    import shutil

    from conftest import REPO

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA GPU: the check runs for real there")
    p = run([REPO / "scripts" / "gpu_check.sh"], timeout=300, env={"PYTHON": PY})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| test_")]
    assert len(rows) >= 7 and all("| skipped |" in r and "no CUDA GPU" in r for r in rows), rows
    assert any("test_torch_trains_digits_on_cuda[mpi]" in r for r in rows)
    assert "GPUs visible to torch: 0" in p.stdout

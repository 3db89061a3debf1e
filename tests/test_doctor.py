"""harness doctor: real environment report, and problem detection."""

from __future__ import annotations

import json

import pytest

from conftest import PY, harness, needs_horovod, run
from harness.doctor import FAIL, OK, diagnose, failed_requirements

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
    assert mpi and "different MPIs" in mpi[0].detail
    assert by_component(diagnose(GOOD))["torch"].status == OK


@pytest.mark.framework
@needs_horovod
def test_real_doctor_reports_the_build():
    p = run(harness("doctor"), timeout=300, check=True)
    assert "Horovod 0.28.1 with PyTorch: controllers MPI, GLOO" in p.stdout
    assert "Horovod 0.28.1 with TensorFlow: controllers MPI, GLOO" in p.stdout
    assert "all required components usable" in p.stdout


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

"""Importing the harness must not drag in a framework or MPI."""

from conftest import PY, run

HEAVY = ("torch", "tensorflow", "keras", "horovod", "mpi4py", "tf_keras")


def test_core_packages_import_no_framework():
    code = ("import sys, harness, harness.cli, harness.config, harness.loop, harness.train, "
            "harness.report, launchers.compare, harness.doctor, harness.backends.base, launchers, "
            "launchers.cli, models, models.base\n"
            "from models import get_spec\n"
            "[get_spec(m) for m in ('mlp', 'cnn', 'resnet20', 'resnet50')]\n"
            f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
            "print(heavy)\nsys.exit(1 if heavy else 0)")
    p = run([PY, "-c", code])
    assert p.returncode == 0, f"framework modules imported: {p.stdout} {p.stderr[-2000:]}"


def test_cli_parser_builds_without_frameworks():
    code = ("import sys\nfrom harness.cli import build_parser\nbuild_parser()\n"
            f"sys.exit(1 if [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}] else 0)")
    assert run([PY, "-c", code]).returncode == 0

"""The type checker passes over the project's packages (configured in pyproject.toml)."""

from __future__ import annotations

import pytest

from conftest import PY, have, run


@pytest.mark.skipif(not have("mypy"), reason="mypy is not installed (scripts/bootstrap.sh "
                    "installs requirements-dev.txt)")
def test_mypy_finds_no_errors():
    p = run([PY, "-m", "mypy"], timeout=300)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]

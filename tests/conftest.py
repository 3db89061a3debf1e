"""Shared helpers. The test process itself imports neither torch nor TensorFlow: everything that
needs a framework runs in a subprocess (one framework per process), as the harness does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# Checkouts share the cached virtualenv, whose editable install points at the checkout that was
# bootstrapped last: every process the tests start imports this checkout's code first.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
FRAMEWORKS = ("torch", "tensorflow")

# the venv's horovodrun/mpirun wrappers must be found by our launchers
os.environ["PATH"] = f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["PYTHONUNBUFFERED"] = "1"
os.environ.pop("HARNESS_FAULT", None)


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_horovod = pytest.mark.skipif(not have("horovod") or not shutil.which("horovodrun"),
                                   reason="Horovod is not installed (run scripts/bootstrap.sh)")
needs_mpi = pytest.mark.skipif(not have("mpi4py") or not shutil.which("mpirun"),
                               reason="mpi4py/mpirun missing (run scripts/bootstrap.sh)")


def run(argv: list[str], timeout: float = 300, env: dict | None = None, cwd: Path | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.update(env or {})
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       env=full, cwd=cwd or REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\n"
                             f"stderr:\n{p.stderr[-6000:]}")
    return p


def harness(*args) -> list[str]:
    return [PY, "-m", "harness", *map(str, args)]


def launch(launcher: str, np_: int, *train_args, extra: tuple = ()) -> list[str]:
    """A run through our own launcher CLI, as a user would start it."""
    return harness("launch", "--launcher", launcher, "-np", np_, *extra, "--", *train_args)


def json_line(output: str, key: str) -> dict:
    """The JSON object on the first output line mentioning ``key`` (launcher prefixes dropped)."""
    decoder = json.JSONDecoder()
    for line in output.splitlines():
        if f'"{key}"' not in line:
            continue
        # mpirun may join two ranks' lines into one ('{"rank": 1}[1,0]<stdout>:{"key": ...}'):
        # the object that holds the key, wherever it starts
        for start in (i for i, c in enumerate(line) if c == "{"):
            try:
                obj, _ = decoder.raw_decode(line[start:])
            except ValueError:
                continue
            if isinstance(obj, dict) and key in obj:
                return obj
    raise AssertionError(f"no JSON line with {key!r} in:\n{output[-3000:]}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def latest_checkpoint(run_dir: Path, prefix: str = "ckpt") -> Path:
    paths = sorted((run_dir / "checkpoints").glob(f"{prefix}-*.npz"))
    assert paths, f"no {prefix} checkpoint in {run_dir}"
    return paths[-1]


def checkpoint_weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k[2:]: z[k] for k in z.files if k.startswith("w/")}


def fw_check(framework: str, check: str, *args, timeout: float = 300) -> dict:
    """Run tests/fw_checks.py in its own process and return its JSON answer."""
    p = run([PY, REPO / "tests" / "fw_checks.py", framework, check, *args], timeout=timeout)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        raise AssertionError(f"fw_checks {framework} {check} failed ({p.returncode}):\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return json.loads(lines[-1])


@pytest.fixture
def results(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    return d

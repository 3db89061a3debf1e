"""``harness doctor``: what is installed, what Horovod was built with, and what to fix.

Facts are gathered in subprocesses, one per framework (torch and TensorFlow never share a
process); :func:`diagnose` turns facts into findings and is a pure function, so problem
detection is tested with made-up facts as well as on the real machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from harness.backends.common import HARNESS_SETS_ALWAYS, horovod_variable_problems

OK, WARN, FAIL = "ok", "warn", "FAIL"
BOOTSTRAP = "rerun `scripts/bootstrap.sh`"
COMPONENTS = ("torch", "tensorflow", "horovod", "mpi4py", "gloo", "mpi", "nccl", "slurm", "gpu")


@dataclass
class Finding:
    component: str
    status: str
    detail: str
    fix: str = ""


_PROBE_FRAMEWORK = r"""
import json, os, sys
fw = sys.argv[1]
out = {}
try:
    if fw == "torch":
        import torch
        out["version"] = torch.__version__
        out["cuda"] = torch.cuda.is_available()
        out["gpus"] = torch.cuda.device_count()
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf, keras
        out["version"] = tf.__version__
        out["keras"] = keras.__version__
        out["gpus"] = len(tf.config.list_physical_devices("GPU"))
        out["cuda"] = out["gpus"] > 0
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out)); sys.exit(0)
try:
    import horovod
    out["horovod_version"] = horovod.__version__
    if fw == "torch":
        import horovod.torch as hvd
    else:
        import horovod.tensorflow as hvd
    import glob
    libs = glob.glob(os.path.join(os.path.dirname(hvd.__file__), "mpi_lib*.so"))
    out["horovod"] = {"mpi": hvd.mpi_built(), "gloo": hvd.gloo_built(),
                      "nccl": bool(hvd.nccl_built()), "cuda": hvd.cuda_built(),
                      "rocm": hvd.rocm_built(), "ddl": hvd.ddl_built(), "ccl": hvd.ccl_built()}
    out["horovod_lib"] = libs[0] if libs else None
except Exception as e:
    out["horovod_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""

# Two steps, each announced on stdout before the next: importing mpi4py (no MPI start), then
# MPI_Init, which Open MPI may abort from C with a page of text; the cause is picked out of it.
_PROBE_MPI4PY = r"""
import json, sys
out = {}
try:
    import mpi4py
    mpi4py.rc.initialize = False
    from mpi4py import MPI
    out["version"] = mpi4py.__version__
    out["library"] = MPI.Get_library_version().strip().splitlines()[0].rstrip("\x00")
    out["lib"] = MPI.__file__
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out), flush=True)
if "error" not in out:
    MPI.Init()
    print(json.dumps({"init": True, "size": MPI.COMM_WORLD.Get_size()}), flush=True)
    MPI.Finalize()
"""


def mpi_start_failure(output: str) -> str:
    """The one line that says why MPI_Init failed, out of Open MPI's (or another MPI's) text."""
    if "plm_rsh_agent" in output and "could not be found" in output:
        return ("Open MPI found neither ssh nor rsh on PATH (it looks for one at start, even "
                "for one process on one machine)")
    m = re.search(r'Returned "([^"]+)"', output) or \
        re.search(r"Returned value (.+?) instead of", output)
    if m:
        return m.group(1).strip()
    lines = [ln.strip() for ln in output.splitlines()
             if ln.strip() and not ln.lstrip().startswith(("*", "-", "{"))]
    named = [ln for ln in lines if re.search(r"error|fail|not found|cannot", ln, re.I)]
    return (named or lines or ["no output"])[0][:200]


def _run(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return 127, ""
    except subprocess.TimeoutExpired:
        return 124, ""
    return p.returncode, (p.stdout or "") + (p.stderr or "")


def _probe_json(code: str, *args: str) -> dict[str, Any]:
    rc, out = _run([sys.executable, "-c", code, *args])
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {"error": f"probe failed (exit {rc}): {out.strip()[-300:]}"}


def linked_mpi(path: str | None) -> str | None:
    """The libmpi a shared object loads, resolved to a real path (via ldd)."""
    if not path or not shutil.which("ldd"):
        return None
    rc, out = _run(["ldd", path], timeout=30)
    m = re.search(r"libmpi\.so[.\d]*\s*=>\s*(\S+)", out)
    return os.path.realpath(m.group(1)) if m else None


def probe_mpi4py() -> dict[str, Any]:
    """mpi4py's version and MPI library, and whether MPI starts in a process of its own
    (``init_error``: why not, in one line)."""
    rc, out = _run([sys.executable, "-c", _PROBE_MPI4PY])
    found = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    if not found:
        return {"error": f"the mpi4py probe printed nothing (exit {rc}): "
                         f"{mpi_start_failure(out)}"}
    facts = found[0]
    if "error" not in facts and len(found) < 2:
        facts["init_error"] = mpi_start_failure(out) if rc != 124 else "MPI_Init hung for 120 s"
    return facts


def horovod_variables(env: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if env is None else env
    return {k: v for k, v in sorted(env.items()) if k.startswith("HOROVOD_")}


def gather() -> dict[str, Any]:
    facts: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable}
    facts["horovod_env"] = horovod_variables()
    facts["torch"] = _probe_json(_PROBE_FRAMEWORK, "torch")
    facts["tensorflow"] = _probe_json(_PROBE_FRAMEWORK, "tensorflow")
    facts["mpi4py"] = probe_mpi4py()
    rc, out = _run(["mpirun", "--version"], timeout=30)
    facts["mpirun"] = out.strip().splitlines()[0] if rc == 0 and out.strip() else None
    facts["mpi4py_libmpi"] = linked_mpi(facts["mpi4py"].get("lib"))
    facts["horovod_libmpi"] = linked_mpi(facts["torch"].get("horovod_lib")
                                         or facts["tensorflow"].get("horovod_lib"))
    facts["slurm"] = None
    if shutil.which("srun"):
        rc, out = _run(["srun", "--version"], timeout=30)
        facts["slurm"] = {"version": out.strip() if rc == 0 else None,
                          "error": None if rc == 0 else out.strip().splitlines()[-1]}
        if rc == 0:
            rc, out = _run(["srun", "--mpi=list"], timeout=30)
            facts["slurm"]["mpi_plugins"] = out.strip()
    rc, out = _run(["nvidia-smi", "-L"], timeout=30)
    facts["nvidia_smi"] = out.strip() if rc == 0 else None
    return facts


def diagnose(facts: dict[str, Any]) -> list[Finding]:
    """Findings, each with a fix when it is a problem. Pure: depends on ``facts`` only."""
    out: list[Finding] = [Finding("python", OK, f"Python {facts.get('python')}")]
    if not str(facts.get("python", "")).startswith("3.11"):
        out[-1] = Finding("python", WARN, f"Python {facts.get('python')}; the tested version "
                          "is 3.11", "create the environment with scripts/bootstrap.sh")
    hvd_versions = set()
    for fw, label in (("torch", "PyTorch"), ("tensorflow", "TensorFlow")):
        f = facts.get(fw, {})
        if "error" in f:
            out.append(Finding(fw, FAIL, f"{label} does not import: {f['error']}",
                               f"{BOOTSTRAP} (it installs the pinned {label})"))
            out.append(Finding(f"horovod-{fw}", FAIL, f"Horovod cannot be used with {label}: "
                               f"{label} is missing", BOOTSTRAP))
            continue
        extra = f", Keras {f['keras']}" if f.get("keras") else ""
        out.append(Finding(fw, OK, f"{label} {f['version']}{extra}, "
                           f"{f.get('gpus', 0)} GPU(s) visible"))
        if "horovod_error" in f:
            out.append(Finding(f"horovod-{fw}", FAIL, f"Horovod was built without {label} "
                               f"({f['horovod_error']})", f"{BOOTSTRAP} to rebuild Horovod with "
                               f"HOROVOD_WITH_{'PYTORCH' if fw == 'torch' else 'TENSORFLOW'}=1"))
            continue
        h = f["horovod"]
        hvd_versions.add(f["horovod_version"])
        ops = [k.upper() for k in ("mpi", "gloo", "nccl", "ddl", "ccl") if h.get(k)]
        out.append(Finding(f"horovod-{fw}", OK, f"Horovod {f['horovod_version']} with {label}: "
                           f"controllers {', '.join(c for c in ('MPI', 'GLOO') if c in ops)}; "
                           f"tensor operations {', '.join(ops)}"))
        if f.get("cuda") and not h.get("nccl"):
            out.append(Finding(f"nccl-{fw}", WARN, f"GPUs are visible to {label} but Horovod has "
                               "no NCCL: GPU tensors go through host memory",
                               f"HOROVOD_GPU_OPERATIONS=NCCL {BOOTSTRAP}"))
    built = {k: any(facts.get(fw, {}).get("horovod", {}).get(k)
                    for fw in ("torch", "tensorflow")) for k in ("mpi", "gloo", "nccl")}
    if hvd_versions:
        out.append(Finding("horovod", OK, f"Horovod {', '.join(sorted(hvd_versions))}"))
    else:
        out.append(Finding("horovod", FAIL, "Horovod is not usable with any framework",
                           BOOTSTRAP))
    out.append(Finding("mpi", OK if built["mpi"] else FAIL,
                       "Horovod MPI controller and operations " +
                       ("built" if built["mpi"] else "missing"),
                       "" if built["mpi"] else f"install Open MPI, then {BOOTSTRAP}"))
    out.append(Finding("gloo", OK if built["gloo"] else FAIL,
                       "Horovod Gloo controller " + ("built" if built["gloo"] else "missing"),
                       "" if built["gloo"] else f"HOROVOD_WITH_GLOO=1 {BOOTSTRAP}"))
    out.append(Finding("nccl", OK if built["nccl"] else WARN,
                       "Horovod NCCL operations " + ("built" if built["nccl"] else
                                                     "not built (CPU build)"),
                       "" if built["nccl"] else
                       f"on GPU clusters: HOROVOD_GPU_OPERATIONS=NCCL {BOOTSTRAP}"))
    out += _horovod_variable_findings(facts.get("horovod_env") or {}, built)
    m = facts.get("mpi4py", {})
    if "error" in m:
        out.append(Finding("mpi4py", FAIL, f"mpi4py does not import: {m['error']}", BOOTSTRAP))
    elif m.get("init_error"):
        also = "; mpirun is not on PATH either" if not facts.get("mpirun") else ""
        rsh = "ssh nor rsh" in m["init_error"]
        library = m["library"].split(",")[0]
        out.append(Finding("mpi4py", FAIL, f"mpi4py {m['version']} imports ({library}), but MPI "
                           f"cannot start in a process: {m['init_error']}{also}",
                           "install openssh-client or put ssh on PATH (for runs on this machine "
                           "only, OMPI_MCA_plm_rsh_agent=false also works)" if rsh else
                           "put the MPI installation's bin folder (mpirun, orted) on PATH, e.g. "
                           "`module load openmpi`, and check its lib folder is found"))
    else:
        out.append(Finding("mpi4py", OK, f"mpi4py {m['version']} on {m['library']}"))
        a, b = facts.get("mpi4py_libmpi"), facts.get("horovod_libmpi")
        if a and b and a != b:
            out.append(Finding("mpi4py", FAIL, f"mpi4py loads {a} but Horovod loads {b}: the "
                               "parameter server and the mpi4py gradient path (PyTorch's "
                               "default on CPU) would use another MPI than Horovod",
                               f"load one MPI module, then {BOOTSTRAP} (it rebuilds both)"))
        elif a and b:
            out.append(Finding("mpi4py", OK, f"mpi4py and Horovod share {a}"))
    if facts.get("mpirun"):
        out.append(Finding("mpirun", OK, facts["mpirun"]))
    else:
        out.append(Finding("mpirun", FAIL, "no mpirun on PATH",
                           "`apt-get install openmpi-bin libopenmpi-dev` or `module load openmpi`"))
    slurm = facts.get("slurm")
    if slurm and slurm.get("version"):
        plugins = slurm.get("mpi_plugins", "")
        ok = "pmix" in plugins
        out.append(Finding("slurm", OK if ok else WARN, f"{slurm['version']}; srun MPI plugins: "
                           f"{' '.join(plugins.split()) or 'unknown'}",
                           "" if ok else "ask the admins for Slurm's PMIx plugin "
                           "(srun --mpi=pmix); without it launch with mpirun inside sbatch"))
    elif slurm:
        out.append(Finding("slurm", WARN, f"SLURM commands present but no cluster answers "
                           f"({slurm.get('error')})", "run on a cluster login node, or start the "
                           "test cluster (tests/slurm_cluster.py)"))
    else:
        out.append(Finding("slurm", WARN, "SLURM not found (srun/sbatch launchers unavailable)",
                           "only needed on clusters; `apt-get install slurm-wlm munge` for the "
                           "test cluster"))
    gpus = facts.get("nvidia_smi")
    out.append(Finding("gpu", OK if gpus else WARN,
                       f"{len(gpus.splitlines())} GPU(s): {gpus.splitlines()[0]}" if gpus else
                       "no NVIDIA GPU (CPU training)", "" if gpus else
                       "GPU runs need a CUDA build of torch/TF and HOROVOD_GPU_OPERATIONS=NCCL"))
    return out


def _horovod_variable_findings(env: dict[str, str], built: dict[str, bool]) -> list[Finding]:
    """The HOROVOD_* variables of this shell, as `harness train` and Horovod would read them."""
    out = []
    for name, problem, fix in horovod_variable_problems(env):
        if name not in HARNESS_SETS_ALWAYS:
            out.append(Finding("horovod-env", FAIL, problem, fix))
    for name, field in HARNESS_SETS_ALWAYS.items():
        if name in env:
            out.append(Finding("horovod-env", WARN, f"{name}={env[name]!r} is replaced by "
                               f"harness train, which sets it from {field}",
                               f"unset it and use --{field.replace('_', '-')}"))
    controller = env.get("HOROVOD_CONTROLLER", "").lower()
    if controller in ("mpi", "gloo") and built and not built.get(controller) and \
            any(built.values()):
        out.append(Finding("horovod-env", FAIL, f"HOROVOD_CONTROLLER={env['HOROVOD_CONTROLLER']!r}"
                           f" but Horovod was built without {controller.upper()}",
                           "unset HOROVOD_CONTROLLER, or rebuild Horovod with it"))
    launched = [k for k in ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK",
                            "HOROVOD_LOCAL_SIZE") if k in env]
    if launched:
        out.append(Finding("horovod-env", WARN, f"{', '.join(launched)} set in this shell: "
                           "harness train would take its rank and world size from them",
                           f"unset {' '.join(launched)} (horovodrun sets them for each rank)"))
    if not any(f.status != OK for f in out):
        shown = ", ".join(f"{k}={v}" for k, v in env.items()) or "none set"
        out.append(Finding("horovod-env", OK, f"HOROVOD_* variables: {shown}"))
    return out


def failed_requirements(findings: list[Finding], require: list[str]) -> list[Finding]:
    """Findings that make a required component unusable (a warning counts for slurm/gpu/nccl)."""
    bad = []
    for f in findings:
        comp = f.component.split("-")[0]
        if comp in require and (f.status == FAIL or (f.status == WARN and comp in
                                                     ("slurm", "gpu", "nccl"))):
            bad.append(f)
    return bad


def main(require: str = "torch,tensorflow,horovod,mpi4py", as_json: bool = False) -> int:
    wanted = [r.strip() for r in require.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in COMPONENTS]
    if unknown:
        from harness.errors import ConfigError
        raise ConfigError(f"--require: unknown component(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(COMPONENTS)}")
    facts = gather()
    findings = diagnose(facts)
    bad = failed_requirements(findings, wanted)
    if as_json:
        print(json.dumps({"facts": facts, "findings": [asdict(f) for f in findings],
                          "failed_requirements": [asdict(f) for f in bad]}, indent=2))
    else:
        width = max(len(f.component) for f in findings)
        for f in findings:
            print(f"[{f.status:>4}] {f.component:<{width}}  {f.detail}")
            if f.fix and f.status != OK:
                print(f"{'':>7} {'':<{width}}  fix: {f.fix}")
        print(f"\n{len(bad)} problem(s) with required components ({', '.join(wanted)})" if bad
              else f"\nall required components usable ({', '.join(wanted)})")
    return 1 if bad else 0

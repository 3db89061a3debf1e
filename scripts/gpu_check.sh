#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and a CUDA build of PyTorch, run the tests
# marked `gpu` (tests/test_gpu.py: device pinning by local rank, PyTorch training on CUDA through
# each gradient path the machine has, host staging on the mpi4py path, `harness doctor`) and
# print a table of what ran, passed and was skipped, with the reasons. Paths whose runtime is
# missing (mpirun + mpi4py, Horovod) are skipped, not failed. Under 8 minutes on one GPU.
#
#   scripts/gpu_check.sh                 # the first of $PYTHON, .venv/bin/python, python3
#   PYTHON=/path/to/python scripts/gpu_check.sh
#
# Without a GPU every test is skipped and the script exits 0. The exit code is pytest's: 0 when
# nothing failed. docs/gpu.md holds its output from a real GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."

has_torch() { "$1" -c 'import torch' >/dev/null 2>&1; }
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for c in .venv/bin/python python3; do
        if command -v "$c" >/dev/null && has_torch "$c"; then PY=$c; break; fi
    done
fi
if [ -z "$PY" ] || ! has_torch "$PY"; then
    echo "gpu_check: no Python with PyTorch found: set PYTHON=/path/to/python (a CUDA build of" \
         "torch) or run scripts/bootstrap.sh" >&2
    exit 2
fi

echo "== machine"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
else
    echo "nvidia-smi: not found"
fi
"$PY" - <<'EOF'
import importlib.util, platform, shutil
import torch
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA runtime "
      f"{torch.version.cuda}, GPUs visible to torch: {torch.cuda.device_count() if cuda else 0}")
if cuda:
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
          f"{p.major}.{p.minor}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
for m in ("mpi4py", "horovod", "tensorflow"):
    print(f"{m}: {'present' if importlib.util.find_spec(m) else 'absent'}")
print(f"mpirun: {shutil.which('mpirun') or 'absent'}")
EOF

echo "== tests marked gpu"
xml=$(mktemp --suffix=.xml)
trap 'rm -f "$xml"' EXIT
start=$(date +%s)
timeout 480 "$PY" -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider -o addopts= \
    -q -rfE --junitxml="$xml"
rc=$?
echo "== summary ($(( $(date +%s) - start )) s, pytest exit $rc)"
"$PY" - "$xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
rows, counts = [], {}
try:
    cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
except (ET.ParseError, FileNotFoundError):
    cases = []
for case in cases:
    outcome, why = "passed", ""
    for tag in ("skipped", "failure", "error"):
        el = case.find(tag)
        if el is not None:
            outcome = {"failure": "FAILED", "error": "ERROR"}.get(tag, tag)
            why = (el.get("message") or "").splitlines()[0][:90] if el.get("message") else ""
            break
    counts[outcome] = counts.get(outcome, 0) + 1
    rows.append((case.get("name"), outcome, f"{float(case.get('time', 0)):.1f}", why))
if not rows:
    print("no test results (pytest did not finish: see above)")
    sys.exit(0)
w = max(len(r[0]) for r in rows)
print(f"| {'test':<{w}} | result  | time (s) | note")
print(f"|{'-' * (w + 2)}|---------|----------|-----")
for name, outcome, t, why in rows:
    print(f"| {name:<{w}} | {outcome:<7} | {t:>8} | {why}")
print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
EOF
exit $rc

#!/usr/bin/env bash
# One-step environment for the harness: system MPI, a pinned virtualenv, mpi4py on the system MPI,
# and Horovod 0.28.1 built from its sdist with the patches in third_party/horovod/patches.
#
#   scripts/bootstrap.sh                 # what `make compare` runs first
#   scripts/bootstrap.sh --with-slurm    # also munge + SLURM, for the test suite's local cluster
#
# Everything built is cached outside the repo in $HARNESS_CACHE (default ~/.cache/hvd-harness),
# keyed by the versions that matter, so a second run with nothing changed takes seconds.
# The repo's .venv is a symlink to the cached virtualenv.
#
# Environment knobs:
#   HARNESS_CACHE           cache folder (virtualenvs, wheels, sources)
#   HARNESS_PYTHON          interpreter for the virtualenv (default python3.11)
#   HOROVOD_GPU_OPERATIONS  e.g. NCCL on GPU clusters; passed to the Horovod build (as are
#                           HOROVOD_GPU_ALLREDUCE, HOROVOD_CUDA_HOME, HOROVOD_NCCL_HOME, ...)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${HARNESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd-harness}
PY=${HARNESS_PYTHON:-python3.11}
HOROVOD_VERSION=0.28.1
MPI4PY_VERSION=4.1.2
TF_KERAS_VERSION=2.21.0
WITH_SLURM=0

for arg in "$@"; do
  case "$arg" in
    --with-slurm) WITH_SLURM=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "bootstrap: unknown option '$arg' (valid: --with-slurm)" >&2; exit 2 ;;
  esac
done

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }
hash_of() { sha256sum | cut -c1-12; }

start=$(date +%s)
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 3600 9 || die "another bootstrap holds $CACHE/.lock for over an hour; remove it if that one is gone"

# --- 1. system packages ---------------------------------------------------------------------
missing=()
command -v mpicc >/dev/null && command -v mpirun >/dev/null || missing+=(openmpi-bin libopenmpi-dev)
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null && command -v make >/dev/null || missing+=(g++ make)
if [ "$WITH_SLURM" = 1 ]; then
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    die "missing system packages: ${missing[*]}. On a cluster load them (e.g. 'module load openmpi cmake gcc'); on Debian/Ubuntu run 'sudo apt-get install ${missing[*]}', then rerun this script."
  fi
fi
command -v "$PY" >/dev/null || die "no '$PY' on PATH: install Python 3.11 (e.g. 'apt-get install python3.11-venv') or set HARNESS_PYTHON=/path/to/python3.11"
"$PY" -c 'import sys, venv; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || die "'$PY' is not a Python 3.11 with venv: set HARNESS_PYTHON to one"
MPI_VERSION=$(mpirun --version 2>/dev/null | head -n1)
MPI_KEY=$(printf '%s\n%s\n' "$MPI_VERSION" "$(mpicc --showme 2>/dev/null || mpicc -show)" | hash_of)

# --- 2. virtualenv with the pinned requirements -----------------------------------------------
PY_VERSION=$("$PY" -c 'import sys; print(sys.version.split()[0])')
VENV_KEY=$(cat "$ROOT/requirements.txt" <(echo "$PY_VERSION tf-keras==$TF_KERAS_VERSION") | hash_of)
VENV="$CACHE/venv-py$PY_VERSION-$VENV_KEY"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [ ! -f "$VENV/.complete" ]; then
  log "creating virtualenv $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "${PIP[@]}" install --upgrade pip setuptools wheel 2>&1 | grep -v 'is ignored' || true
  "${PIP[@]}" install -r "$ROOT/requirements.txt" 2>&1 | grep -v 'is ignored' || true
  TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/python" -c 'import torch, tensorflow, numpy, sklearn, matplotlib, rich, pytest' \
    2>/dev/null || die "the pinned requirements did not install (see pip's output above)"
  # tf-keras (the Keras 2 route, TF_USE_LEGACY_KERAS=1) would drag in the full tensorflow package.
  "${PIP[@]}" install --no-deps "tf-keras==$TF_KERAS_VERSION" 2>&1 | grep -v 'is ignored' || true
  touch "$VENV/.complete"
fi
ln -sfn "$VENV" "$ROOT/.venv"

# --- 2b. development tools (the type checker the tests run), pinned in requirements-dev.txt ---
DEV_KEY=$(hash_of < "$ROOT/requirements-dev.txt")
if [ ! -f "$VENV/.dev-$DEV_KEY" ]; then
  log "installing development tools (requirements-dev.txt)"
  "${PIP[@]}" install -r "$ROOT/requirements-dev.txt" 2>&1 | grep -v 'is ignored' || true
  "$VENV/bin/python" -m mypy --version >/dev/null 2>&1 || die "requirements-dev.txt did not install"
  rm -f "$VENV"/.dev-* && touch "$VENV/.dev-$DEV_KEY"
fi

# --- 3. mpi4py compiled against this MPI ------------------------------------------------------
if [ ! -f "$VENV/.mpi4py-$MPI_KEY" ]; then
  wheels="$CACHE/wheels/mpi4py-$MPI4PY_VERSION-$MPI_KEY"
  if ! ls "$wheels"/mpi4py-*.whl >/dev/null 2>&1; then
    log "building mpi4py $MPI4PY_VERSION against $MPI_VERSION"
    rm -rf "$wheels.tmp"
    MPICC=$(command -v mpicc) "${PIP[@]}" wheel --no-deps --no-binary mpi4py \
      "mpi4py==$MPI4PY_VERSION" -w "$wheels.tmp" 2>&1 | grep -v 'is ignored' || true
    ls "$wheels.tmp"/mpi4py-*.whl >/dev/null 2>&1 || die "mpi4py failed to build (see above)"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  fi
  "${PIP[@]}" install --no-deps --force-reinstall "$wheels"/mpi4py-*.whl
  rm -f "$VENV"/.mpi4py-* && touch "$VENV/.mpi4py-$MPI_KEY"
fi

# --- 4. Horovod from source with our patches --------------------------------------------------
FW_VERSIONS=$("$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
def version(*names):
    for n in names:
        try:
            return f"{n}=={md.version(n)}"
        except md.PackageNotFoundError:
            pass
    return "none"
print(version("torch"), version("tensorflow-cpu", "tensorflow", "tensorflow-gpu"))
EOF
)
GPU_ENV=$(env | grep -E '^HOROVOD_(GPU|CUDA|NCCL|ROCM|WITHOUT_|WITH_)' | sort || true)
HVD_KEY=$( { echo "$HOROVOD_VERSION $PY_VERSION $FW_VERSIONS $MPI_KEY"; echo "$GPU_ENV";
             cat "$ROOT"/third_party/horovod/patches/*.patch; } | hash_of)
if [ ! -f "$VENV/.horovod-$HVD_KEY" ]; then
  wheels="$CACHE/wheels/horovod-$HOROVOD_VERSION-$HVD_KEY"
  if ! ls "$wheels"/horovod-*.whl >/dev/null 2>&1; then
    sdist="$CACHE/src/horovod-$HOROVOD_VERSION.tar.gz"
    if [ ! -f "$sdist" ]; then
      log "downloading the Horovod $HOROVOD_VERSION sdist"
      mkdir -p "$CACHE/src"
      "${PIP[@]}" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$CACHE/src" \
        2>&1 | grep -v 'is ignored' || true
      [ -f "$sdist" ] || die "could not download horovod==$HOROVOD_VERSION from the package index"
    fi
    build=$(mktemp -d "$CACHE/build.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    tar -xzf "$sdist" -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    for p in "$ROOT"/third_party/horovod/patches/*.patch; do
      patch -d "$src" -p1 -s --forward < "$p" || die "patch $(basename "$p") does not apply to horovod $HOROVOD_VERSION"
    done
    log "building Horovod $HOROVOD_VERSION (torch + tensorflow, MPI + Gloo${HOROVOD_GPU_OPERATIONS:+, GPU ops $HOROVOD_GPU_OPERATIONS}); this takes 6-10 minutes on 2 cores"
    (
      export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
      export HOROVOD_WITHOUT_MXNET=1
      export HOROVOD_BUILD_PARALLELISM=${HOROVOD_BUILD_PARALLELISM:-$(nproc)}
      export CMAKE_POLICY_VERSION_MINIMUM=3.5   # CMake 4 refuses Horovod's old cmake_minimum_required
      export PATH="$VENV/bin:$PATH"
      "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$build/wheel" "$src" > "$build/build.log" 2>&1
    ) || { tail -n 40 "$build/build.log" >&2; die "the Horovod build failed (log above)"; }
    mkdir -p "$CACHE/wheels" && rm -rf "$wheels" && mv "$build/wheel" "$wheels"
  fi
  "${PIP[@]}" install --no-deps --force-reinstall "$wheels"/horovod-*.whl
  rm -f "$VENV"/.horovod-* && touch "$VENV/.horovod-$HVD_KEY"
fi
# horovodrun asks how Horovod was built before every launch; our patch 0011 keeps the answer per
# build (~/.cache/horovod), so ask once here rather than in the first launch (seconds: it imports
# torch). A no-op when the answer is kept.
"$VENV/bin/python" -c "import sys; from horovod.common.util import mpi_built
sys.exit(mpi_built() is None)" \
  || log "warning: could not learn how Horovod was built (no extension imports); horovodrun will ask at every launch"

# --- 5. this project, editable --------------------------------------------------------------
if [ "$(cat "$VENV/.project" 2>/dev/null)" != "$ROOT" ] || [ ! -x "$VENV/bin/harness" ]; then
  "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
  echo "$ROOT" > "$VENV/.project"
fi
# Byte-code for the project's own modules, which every rank imports: where PYTHONDONTWRITEBYTECODE
# is set, Python would compile them again in each process (the installed packages were compiled
# by pip). Only the files that changed are compiled again.
"$VENV/bin/python" -m compileall -q "$ROOT"/harness "$ROOT"/models "$ROOT"/launchers "$ROOT"/bench \
  || log "warning: could not compile every module (above); they are compiled when imported"

log "ready in $(( $(date +%s) - start ))s: $ROOT/.venv -> $VENV"

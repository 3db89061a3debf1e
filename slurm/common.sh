# Shared by the sbatch scripts in this folder: locate the harness and run a launch command so
# that preemption works. Sourced, not executed.
#
#   HARNESS_ROOT    the repository (default: the folder sbatch was called from)
#   HARNESS_PYTHON  the interpreter (default: $HARNESS_ROOT/.venv/bin/python)
#   HARNESS_LAUNCH  srun (default, `srun --mpi=pmix`) or mpirun (Open MPI inside the allocation)
#
# The job runs in the folder it was submitted from (or sbatch --chdir): relative paths in the
# arguments mean what they meant there. PYTHONPATH puts this checkout's harness first.

HARNESS_ROOT=${HARNESS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${HARNESS_PYTHON:-$HARNESS_ROOT/.venv/bin/python}
HARNESS_LAUNCH=${HARNESS_LAUNCH:-srun}
case $HARNESS_LAUNCH in
  srun|mpirun) ;;
  *) echo "error: HARNESS_LAUNCH=$HARNESS_LAUNCH is not a launcher: use srun (the default) or mpirun" >&2
     exit 2 ;;
esac
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: no Python at $PYTHON: run scripts/bootstrap.sh in $HARNESS_ROOT, or set HARNESS_PYTHON" >&2
  exit 2
fi
export PYTHONPATH="$HARNESS_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# GPU nodes: NCCL carries Horovod's GPU allreduce when Horovod was built with
# HOROVOD_GPU_OPERATIONS=NCCL. Leave NCCL's interface choice to NCCL unless told otherwise.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# One rank per task, every task on its own cores; the harness sets thread counts per rank.
launch_ranks() {   # launch_ranks NTASKS -- program...
  local ntasks=$1; shift; [ "$1" = "--" ] && shift
  if [ "$HARNESS_LAUNCH" = mpirun ]; then
    local per_node=${SLURM_NTASKS_PER_NODE:-$(( (ntasks + SLURM_JOB_NUM_NODES - 1) / SLURM_JOB_NUM_NODES ))}
    per_node=${per_node%%(*}
    local root=(); [ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
    mpirun "${root[@]}" -np "$ntasks" --map-by "ppr:${per_node}:node" --bind-to none \
      -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH -x NCCL_DEBUG -x HARNESS_FAULT "$@"
  else
    local extra=()
    # Slurm >= 22.05: srun no longer inherits --cpus-per-task from the allocation
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && extra+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    [ "${SLURM_GPUS_PER_TASK:-0}" != 0 ] && extra+=(--gpus-per-task="$SLURM_GPUS_PER_TASK")
    srun --mpi=pmix --ntasks="$ntasks" --kill-on-bad-exit=1 --distribution=block "${extra[@]}" "$@"
  fi
}

# Run "$@" in the background and turn the scheduler's early warning (--signal=B:USR1@T) into an
# agreed stop: the ranks checkpoint at the next step boundary and exit 75, and the job requeues
# itself; the requeued job (same job id, same run folder) resumes from that checkpoint.
# The warning reaches the job's steps (scancel), and also "$@" itself when that is a program
# rather than a shell function (harness compare runs its steps one after the other: it must
# know not to start the next one).
run_preemptible() {
  local direct=0 trapped
  [ "$(type -t "$1")" = file ] && direct=1
  "$@" &
  local pid=$! rc=0
  trap 'trapped=1
        echo "$(date +%T) preemption warning: asking the ranks to checkpoint and stop"
        [ "$direct" = 1 ] && kill -USR1 "$pid" 2>/dev/null
        scancel --signal=USR1 "$SLURM_JOB_ID"' USR1 TERM
  while true; do
    trapped=0
    wait "$pid" && rc=0 || rc=$?
    # wait returned for a trapped signal: wait again (bash keeps the status of a child that
    # has ended in the meantime)
    [ "$trapped" = 1 ] || break
  done
  trap - USR1 TERM
  if [ "$rc" = 75 ]; then
    echo "$(date +%T) checkpoint written; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  return "$rc"
}

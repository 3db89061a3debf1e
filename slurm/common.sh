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
# The srun/mpirun line comes from the harness's launcher builders (`harness launch
# --print-argv`, which also validates the train arguments), as for `harness launch` itself.
launch_ranks() {   # launch_ranks NTASKS -- harness train arguments...
  local ntasks=$1; shift; [ "$1" = "--" ] && shift
  local opts=(--launcher "$HARNESS_LAUNCH" -np "$ntasks" --python "$PYTHON")
  if [ "$HARNESS_LAUNCH" = mpirun ]; then
    local per_node=${SLURM_NTASKS_PER_NODE:-$(( (ntasks + SLURM_JOB_NUM_NODES - 1) / SLURM_JOB_NUM_NODES ))}
    per_node=${per_node%%(*}
    opts+=(--map-by "ppr:${per_node}:node" --bind-to none
           --export PATH,LD_LIBRARY_PATH,PYTHONPATH,NCCL_DEBUG,HARNESS_FAULT,HARNESS_FAULT_RELEASE)
  else
    opts+=(--distribution block)
    # Slurm >= 22.05: srun no longer inherits --cpus-per-task from the allocation
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && opts+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
    [ "${SLURM_GPUS_PER_TASK:-0}" != 0 ] && opts+=(--gpus-per-task "$SLURM_GPUS_PER_TASK")
  fi
  local argv_file argv rc=0
  argv_file=$(mktemp)
  "$PYTHON" -m harness launch "${opts[@]}" --print-argv -- "$@" > "$argv_file" || rc=$?
  mapfile -d '' -t argv < "$argv_file"
  rm -f "$argv_file"
  [ "$rc" = 0 ] || return "$rc"
  "${argv[@]}"
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

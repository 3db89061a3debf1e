#!/bin/bash
# Weak-scaling sweep: one train.sbatch job per node count, chained with dependencies so they do
# not compete for nodes, then a report job comparing them.
#
#   slurm/scaling_sweep.sh "1 2 4 8" --framework torch --model resnet50 --dataset synthetic
#
# Every job keeps the per-rank batch, so E(n) = X(n) / (n X(1)) is weak-scaling efficiency.
# Run it from anywhere: the jobs run in the current folder (OUT_DIR, default
# results/scaling-<timestamp>, is relative to it). Each job may be preempted and requeued: it
# then resumes its own run folder, so the sweep refuses run folders that exist before it starts.
set -euo pipefail
NODES_LIST=${1:?usage: slurm/scaling_sweep.sh "1 2 4" [harness train arguments]}
shift
HARNESS_ROOT=${HARNESS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export HARNESS_ROOT
PY=${HARNESS_PYTHON:-$HARNESS_ROOT/.venv/bin/python}
OUT=${OUT_DIR:-results/scaling-$(date +%Y%m%d-%H%M%S)}
for n in $NODES_LIST; do
  if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
    echo "error: node count '$n' in '$NODES_LIST' is not a positive integer: give e.g. \"1 2 4\"" >&2
    exit 2
  fi
  if [ -e "$OUT/scaling-n$n" ]; then
    echo "error: $OUT/scaling-n$n already exists: choose a new OUT_DIR (the default is a fresh timestamped folder)" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
export PYTHONPATH="$HARNESS_ROOT${PYTHONPATH:+:$PYTHONPATH}"    # every job imports this harness
dep=()
runs=()
for n in $NODES_LIST; do
  name="scaling-n$n"
  jid=$(sbatch --parsable "${dep[@]}" --nodes="$n" --job-name="$name" \
        --export=ALL,RUN_NAME="$name" "$HARNESS_ROOT/slurm/train.sbatch" --out-dir "$OUT" "$@")
  jid=${jid%%;*}
  echo "submitted $name as job $jid"
  dep=(--dependency=afterany:"$jid")
  runs+=("$OUT/$name")
done
# --wrap takes one /bin/sh command line: every word goes in single quotes (' as '\'')
report=
for word in "$PY" -m harness report --out "$OUT" "${runs[@]}"; do
  report+="'${word//\'/\'\\\'\'}' "
done
jid=$(sbatch --parsable "${dep[@]}" --nodes=1 --ntasks=1 --job-name=scaling-report \
      --output="$OUT/report-%j.out" --wrap "$report")
echo "report job ${jid%%;*} writes $OUT/report.md"

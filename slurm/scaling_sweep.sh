#!/bin/bash
# Weak-scaling sweep: one train.sbatch job per node count, chained with dependencies so they do
# not compete for nodes, then a report job comparing them.
#
#   slurm/scaling_sweep.sh "1 2 4 8" --framework torch --model resnet50 --dataset synthetic
#
# Every job keeps the per-rank batch, so E(n) = X(n) / (n X(1)) is weak-scaling efficiency.
set -euo pipefail
NODES_LIST=${1:?usage: slurm/scaling_sweep.sh "1 2 4" [harness train arguments]}
shift
OUT=${OUT_DIR:-results/scaling-$(date +%Y%m%d-%H%M%S)}
dep=()
runs=()
for n in $NODES_LIST; do
  name="scaling-n$n"
  jid=$(sbatch --parsable "${dep[@]}" --nodes="$n" --job-name="$name" \
        --export=ALL,RUN_NAME="$name" slurm/train.sbatch --out-dir "$OUT" --resume never "$@")
  echo "submitted $name as job $jid"
  dep=(--dependency=afterany:"$jid")
  runs+=("$OUT/$name")
done
PY=${HARNESS_PYTHON:-$PWD/.venv/bin/python}
jid=$(sbatch --parsable "${dep[@]}" --nodes=1 --ntasks=1 --job-name=scaling-report \
      --output="$OUT/report-%j.out" --wrap "$PY -m harness report --out $OUT ${runs[*]}")
echo "report job $jid writes $OUT/report.md"

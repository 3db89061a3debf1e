#!/bin/bash
# The raw record of docs/elastic.md's measured numbers: digits MLP on 3 local elastic ranks,
# 3 epochs, uninterrupted and with rank 1 SIGKILLed at step 20, for both frameworks, with
# Horovod's default Gloo timeout and with HOROVOD_GLOO_TIMEOUT_SECONDS=10. Appends one JSON
# line per run to docs/bench-data/elastic.jsonl. Run from the repository after
# scripts/bootstrap.sh (a few minutes on 2 cores):
#
#   bash scripts/elastic_record.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${HARNESS_PYTHON:-.venv/bin/python}
out=$(mktemp -d)
record=docs/bench-data/elastic.jsonl
commit=$(git rev-parse --short HEAD)

one() {   # one NAME FAULT GLOO_TIMEOUT FRAMEWORK
  local name=$1 fault=$2 timeout=$3 fw=$4
  local argv=("$PY" -m harness launch --launcher horovodrun --elastic -np 3
              --hosts-file "$out/$name/hosts" -- --framework "$fw" --epochs 3
              --threads-per-rank 1 --out-dir "$out" --run-name "$name")
  env ${fault:+HARNESS_FAULT=$fault} ${timeout:+HOROVOD_GLOO_TIMEOUT_SECONDS=$timeout} \
    "${argv[@]}" > "$out/$name.log" 2>&1
  "$PY" - "$out/$name/summary.json" "$name" "$fault" "$timeout" "$commit" "$fw" "${argv[*]}" \
    >> "$record" <<'EOF'
import json, sys, datetime
path, name, fault, timeout, commit, framework, command = sys.argv[1:]
s = json.load(open(path))
e = s["elastic"]
segs = e["segments"]
resets = e["resets"]
# how long the survivors took to go on: from the moment the first segment's training stopped
# on the rank that is rank 0 at the end, to the reset record
stall = resets[0]["wall_s"] - segs[0]["end_wall_s"] if resets else None
print(json.dumps({
    "kind": "elastic", "run": name, "commit": commit, "date": str(datetime.date.today()),
    "machine": "2 cores, 24 GiB, no GPU (this dev machine)",
    "command": (f"HARNESS_FAULT={fault} " if fault else "")
    + (f"HOROVOD_GLOO_TIMEOUT_SECONDS={timeout} " if timeout else "") + command,
    "framework": framework,
    "final_eval_acc": s["final_eval_acc"], "steps": s["steps"], "samples": s["samples"],
    "world_size": s["world_size"], "resets": resets,
    "segments": [{k: g[k] for k in ("world_size", "start_step", "end_step", "start_wall_s",
                                    "end_wall_s", "samples_per_s")} for g in segs],
    "reset_after_s": stall, "train_wall_s": s["train_wall_s"]}))
EOF
  echo "$name: $(tail -1 "$record" | cut -c1-160)"
}

for fw in torch tensorflow; do
  one "$fw-whole" "" "" "$fw"
  one "$fw-kill-default-timeout" "kill@1:20" "" "$fw"
  one "$fw-kill-timeout10" "kill@1:20" "10" "$fw"
done
rm -rf "$out"

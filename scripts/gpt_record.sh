#!/bin/bash
# The raw record of docs/gpt.md's comparison: configs/compare_gpt.toml (TensorFlow vs PyTorch,
# 1 and 2 ranks, sync and the async parameter server) run by `harness compare`, one JSON line
# per run appended to docs/bench-data/gpt_compare.jsonl, and the report kept in OUT (default
# results/compare-gpt). Run from the repository after scripts/bootstrap.sh (about 8 minutes
# on 2 cores):
#
#   bash scripts/gpt_record.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${HARNESS_PYTHON:-.venv/bin/python}
out=${1:-results/compare-gpt}
record=docs/bench-data/gpt_compare.jsonl
commit=$(git rev-parse --short HEAD)
command=("$PY" -m harness compare --config configs/compare_gpt.toml --np 1,2 --modes sync,async
         --out-dir "$out")
"${command[@]}"
"$PY" - "$out" "$commit" "${command[*]}" >> "$record" <<'PYEOF'
import datetime, json, sys
from pathlib import Path
out, commit, command = sys.argv[1:]
for run in sorted(Path(out).iterdir()):
    if not (run / "summary.json").is_file():
        continue
    s = json.loads((run / "summary.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    print(json.dumps({
        "kind": "gpt_compare", "run": run.name, "commit": commit,
        "date": str(datetime.date.today()), "machine": "2 cores, 24 GiB, no GPU (this dev machine)",
        "command": command, "framework": cfg["config"]["framework"], "mode": cfg["config"]["mode"],
        "world_size": s["world_size"], "workers": s.get("workers", s["world_size"]),
        "parameters": cfg["model"]["parameters"], "data": cfg["data"],
        "final_eval_loss": s["final_eval_loss"], "final_eval_perplexity": s["final_eval_perplexity"],
        "final_eval_acc": s["final_eval_acc"], "tokens_per_s_total": s["tokens_per_s_total"],
        "tokens_per_s_per_device": s["tokens_per_s_per_device"],
        "step_time_p50_s": s["step_time_p50_s"], "train_wall_s": s["train_wall_s"],
        "failed_workers": s.get("failed_workers") or None}))
PYEOF
echo "appended $(ls "$out" | wc -l) runs to $record; report: $out/report.md"

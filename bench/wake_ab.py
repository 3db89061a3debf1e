"""A/B on a compute-bound job: resnet20 at 2 ranks, the harness's default (wake on enqueue and
patch 0007) against ``HOROVOD_WAKE_ON_ENQUEUE=0`` (Horovod's stock cycle), both frameworks,
interleaved; one JSON line per launch with the summary's median step, wall and breakdown.

    python bench/wake_ab.py docs/bench-data/wake_ab.jsonl 3     # (3 rounds, at 1ad7a8a)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import mpirun, python  # noqa: E402


def main(out_path: str, rounds: int) -> None:
    with open(out_path, "w") as out:
        for rnd in range(rounds):
            for fw in ("torch", "tensorflow"):
                for wake in ("1", "0"):
                    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
                        argv = mpirun(2, bind="none") + [
                            python(), "-m", "harness", "train", "--framework", fw,
                            "--model", "resnet20", "--dataset", "synthetic",
                            "--synthetic-samples", "4096", "--no-shuffle", "--batch-size", "32",
                            "--max-steps", "60", "--eval-every", "0", "--out-dir", d,
                            "--run-name", "o", "--allreduce", "horovod"]
                        p = subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                                           env={**os.environ, "HOROVOD_WAKE_ON_ENQUEUE": wake})
                        if p.returncode:
                            raise SystemExit(p.stderr[-2000:])
                        s = json.loads((Path(d) / "o" / "summary.json").read_text())
                    rec = {"round": rnd, "framework": fw, "wake": wake,
                           "step_p50_s": s["step_time_p50_s"],
                           "train_wall_s": s["train_wall_s"], "breakdown": s["time_breakdown"]}
                    print(json.dumps(rec), flush=True)
                    out.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

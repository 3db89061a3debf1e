#!/usr/bin/env bash
# A headless-Chromium screenshot of TensorBoard's scalars page for a results folder:
#   scripts/tb_screenshot.sh results/latest docs/tensorboard.png ["regex of tags to show"]
# TensorBoard listens on 127.0.0.1 only, for as long as the screenshot takes. Needs the project's
# virtualenv (tensorboard) and chromium (apt-get install chromium).
set -euo pipefail
logdir=${1:?usage: scripts/tb_screenshot.sh LOGDIR OUT.png [TAG_REGEX]}
out=${2:?usage: scripts/tb_screenshot.sh LOGDIR OUT.png [TAG_REGEX]}
filter=${3:-}
root=$(cd "$(dirname "$0")/.." && pwd)
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "tb_screenshot: no chromium on PATH (apt-get install chromium)" >&2; exit 2; }
[ -d "$logdir" ] || { echo "tb_screenshot: $logdir is not a folder: give a results folder" >&2; exit 2; }
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$root/.venv/bin/tensorboard" --logdir "$logdir" --host 127.0.0.1 --port "$port" \
    > "${TMPDIR:-/tmp}/tb_screenshot.$$.log" 2>&1 &
tb=$!
trap 'kill $tb 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$port/data/runs" >/dev/null 2>&1 && break
  sleep 1
done
# the SCALARS dashboard: it draws every card at once (the TIME SERIES page draws them lazily,
# which a headless screenshot can catch half-drawn)
url="http://127.0.0.1:$port/#scalars&_smoothingWeight=0"
if [ -n "$filter" ]; then
  url="$url&tagFilter=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$filter")"
fi
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,2200 \
    --virtual-time-budget="${TB_WAIT_MS:-30000}" --screenshot="$out" "$url" 2>/dev/null
echo "tb_screenshot: $out ($url)"

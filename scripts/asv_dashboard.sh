#!/usr/bin/env bash
# Benchmark the last N commits of main with asv, publish the dashboard, and screenshot it.
#
#   scripts/asv_dashboard.sh            # N=5, a small subset of the suite (~3 min per commit here)
#   N=10 BENCH_ALL=1 scripts/asv_dashboard.sh   # every benchmark (hours on 2 cores)
#   RANGE=e2ffb89..main STEPS=4 scripts/asv_dashboard.sh   # 4 commits spread over a range
#
# asv builds its own virtualenv (numba, numpy, scipy, torch==2.13.0 CPU) under .asv/env and
# installs each commit with pip; results go to .asv/results and the site to .asv/html
# (all ignored by git).  Screenshots land in ${SHOTS:-docs} (needs `chromium`).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-5}
RANGE=${RANGE:-main~$N..main}
STEPS_ARG=(); [ -n "${STEPS:-}" ] && STEPS_ARG=(--steps "$STEPS")
SHOTS=${SHOTS:-docs}
PORT=${PORT:-8123}

if [ -n "${BENCH_ALL:-}" ]; then
  BENCH=()
else
  # one dense and one depthwise shape of the public suite x every algorithm x both layouts,
  # the dense one's backward, im2col's memory, first call
  BENCH=(-b "resnet_res2_3x3'\\)" -b "mobilenet_dw_s1'\\)" -b "Im2colMemory" -b "timeraw_import_and_first_call\\('auto'")
fi

[ -f "${ASV_MACHINE_FILE:-$HOME/.asv-machine.json}" ] || asv machine --yes
# timing jobs on this shared 2-core machine take turns through one lock
flock /tmp/numbaconv-bench.lock asv run -e -a processes=1 "${STEPS_ARG[@]}" "${BENCH[@]}" "$RANGE"
asv publish

command -v chromium >/dev/null || { echo "chromium not installed: skipping screenshots" >&2; exit 0; }
mkdir -p "$SHOTS"
# asv's page loads its JavaScript from CDNs; without internet serve a copy with local assets
site=.asv/html
if command -v npm >/dev/null; then
  site=$(mktemp -d)/site
  python scripts/asv_offline_site.py .asv/html "$site"
fi
python -m http.server "$PORT" --bind 127.0.0.1 --directory "$site" >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
sleep 1
shot() {  # shot FILE URL
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --user-data-dir="$(mktemp -d)" \
    --virtual-time-budget=15000 --window-size=1400,1000 --screenshot="$1" "$2" 2>/dev/null
  echo "wrote $1"
}
shot "$SHOTS/asv-index.png" "http://127.0.0.1:$PORT/index.html"
shot "$SHOTS/asv-graph.png" \
  "http://127.0.0.1:$PORT/index.html#benchmarks.Throughput.track_gflops?p-layout=%27NCHW%27&p-shape=%27resnet_res2_3x3%27"

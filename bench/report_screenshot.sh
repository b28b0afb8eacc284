#!/usr/bin/env bash
# The README's report screenshot (bench/results/report-screenshot.png): the demo recipe with grids every
# 175 steps (DDIM 25) and validation every 50, its report page, and a headless Chromium screenshot of it.
# About 4 min on 2 idle CPU cores; needs chromium (apt-get install chromium). A finished run is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
RUN=${RUN:-runs/report-demo}
OUT=${OUT:-bench/results/report-screenshot.png}

if [ ! -f "$RUN/weights.safetensors" ]; then
    "$BIN/difftrain" train digits "run_dir=$RUN" train.sample_every=175 train.val_every=50 sample.steps=25 train.progress=false
fi
if [ ! -f "$RUN/run_info.json" ]; then
    # A run without run_info.json: record this machine, the one that trained the run (without a start
    # time, which would be now).
    "$BIN/python" - "$RUN" <<'PY'
import json, sys
from pathlib import Path
from difftrain.report.run_info import collect_run_info
info = collect_run_info("cpu", 1)
del info["started"]
(Path(sys.argv[1]) / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
PY
fi
"$BIN/difftrain" report "$RUN"
CHROMIUM=$(command -v chromium || command -v chromium-browser) || { echo "chromium not installed: apt-get install chromium" >&2; exit 1; }
"$CHROMIUM" --headless --disable-gpu --no-sandbox --hide-scrollbars --window-size=1280,2000 \
    "--screenshot=$(realpath "$OUT")" "file://$(realpath "$RUN/report.html")" 2>/dev/null
echo "wrote $OUT"

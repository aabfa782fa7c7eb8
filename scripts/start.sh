#!/usr/bin/env bash
# Installs what is missing (scripts/install.sh), then starts the app on http://127.0.0.1:7860.
# Arguments go to app.py (see: python app.py --help), e.g.  --tiny (smoke mode, random weights), --port 8000,
# --t2i-model / --multiview-model / --triposr-model /path/to/folder (local model folders instead of hub ids),
# --share --auth USER:PASSWORD (a public link needs a login).
# If the real weights can't be had (offline, no cache, no local folder) the app says which and how to fix it,
# and this script offers the smoke mode.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${T2MV_VENV:-.venv}"
export HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
set +e
"$VENV/bin/python" app.py "$@"
rc=$?
set -e
if [ "$rc" = 3 ]; then
  # app.py exits with 3 when real weights are missing (it has printed which and how to get them).
  if [ -t 0 ]; then
    read -r -p "Start the smoke mode instead (tiny random weights, output is noise)? [y/N] " ans
    if [[ "$ans" =~ ^[Yy] ]]; then exec "$VENV/bin/python" app.py --tiny "$@"; fi
  else
    echo "To try the UI without weights: bash scripts/start.sh --tiny" >&2
  fi
fi
exit "$rc"

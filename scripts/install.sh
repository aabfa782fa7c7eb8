#!/usr/bin/env bash
# Installs what is missing, nothing more: a project venv (.venv), torch, the pinned requirements and,
# with --dev, the test tools and Debian's chromium for the browser test. Safe to re-run (a stamp file
# remembers the requirement files it installed).
#   bash scripts/install.sh          # runtime (the app, the CLIs)
#   bash scripts/install.sh --dev    # + pytest, ruff, onnx, playwright, chromium
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    *) echo "install.sh: unknown option $arg (use --dev)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
VENV="${T2MV_VENV:-.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! command -v "$PY" >/dev/null; then
  echo "install.sh: $PY not found. Install Python 3.10+ (python3 + python3-venv) and re-run." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# torch first and alone: on this kind of machine pip finds the CPU wheel on local disk; on a CUDA Linux box
# PyPI's torch==2.13.0 is the CUDA build. An unpinned torch pulled in by another package could be a multi-GB
# download of the wrong build.
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "==> installing torch==2.13.0"
  "$VPY" -m pip install -q torch==2.13.0
fi

files=(requirements.txt)
[ "$DEV" = 1 ] && files+=(requirements-dev.txt)
stamp="$VENV/.t2mv-installed-$(cat "${files[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  for f in "${files[@]}"; do
    echo "==> installing $f"
    "$VPY" -m pip install -q -r "$f"
  done
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || "$VPY" -m pip install -q --no-deps -e .
  touch "$stamp"
fi

# rembg's first import compiles pymatting's numba kernels (about a minute; minutes on a busy machine) and caches
# them next to pymatting. Do it once here, JIT on, so the first run after install does not; later imports read
# the cache (seconds), so re-running this is cheap.
echo "==> warming numba's cache for rembg (the first time takes a minute or more)"
env -u NUMBA_DISABLE_JIT "$VPY" -c "import rembg" >/dev/null 2>&1 \
  || echo "   importing rembg failed; the first background removal will compile instead" >&2

# xformers only where CUDA works; torch SDPA is the default everywhere, so a failure here is not fatal.
if "$VPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
   && ! "$VPY" -c "import xformers" 2>/dev/null; then
  echo "==> CUDA found: trying the optional xformers"
  "$VPY" -m pip install -q -r requirements-cuda.txt || echo "   xformers did not install; using torch SDPA attention"
fi

if [ "$DEV" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  # The browser test drives Debian's chromium (playwright's own browser download is not reachable here).
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "==> installing Debian chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "   chromium did not install; the browser test will be skipped" >&2
  else
    echo "   no root/apt-get: install chromium yourself for the browser test (it is skipped otherwise)" >&2
  fi
fi
echo "==> environment ready: $VENV"

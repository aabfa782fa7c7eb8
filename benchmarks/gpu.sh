#!/usr/bin/env bash
# The one GPU check, offline: the CUDA tests and the real-size GPU benchmarks (random weights at the real shapes,
# fp16), within 8 minutes, written as JSON under OUT_DIR (gpu-check.json: goals met or not; gpu-fp16.json: the
# benchmark; cuda-tests.xml; gpu.log).
#
#   bash benchmarks/gpu.sh [OUT_DIR]              # on the CUDA box, from anywhere (default OUT_DIR: gpu-results/)
#   bash benchmarks/gpu.sh --fetch-wheels         # where pip reaches PyPI: download the wheels into gpu-wheels/
#   bash benchmarks/gpu.sh --dry-run [OUT_DIR]    # print what would run (any machine; nothing is installed)
#
# The box is expected to have Python 3.12 with a CUDA build of torch but no network (see /work/shared/gpu): the
# packages it lacks come as wheels in the project's git-ignored gpu-wheels/ folder (or $T2MV_WHEELS), installed
# into a temporary folder put first on PYTHONPATH (no index, no dependency resolution). Without wheels, the
# current Python ($PYTHON, else .venv/bin/python, else python3) must already have everything.
# Time limits: $GPU_BUDGET_S (480 s in all), of which $GPU_TESTS_S (150 s) for the tests.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

mode=run
out=gpu-results
for arg in "$@"; do
  case "$arg" in
    --dry-run) mode=dry ;;
    --fetch-wheels) mode=fetch ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "gpu.sh: unknown option $arg (use --dry-run, --fetch-wheels or an output folder)" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
wheels=${T2MV_WHEELS:-gpu-wheels}
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi

# What a CUDA box with torch, numpy, scipy, scikit-image, opencv, numba, onnxruntime, accelerate and safetensors
# preinstalled lacks, pinned as in requirements.txt (cp312, manylinux x86-64 wheels only).
packages=(diffusers==0.19.3 huggingface_hub==0.25.2 transformers==4.48.3 tokenizers==0.21.4 trimesh==5.2.0
  pymcubes==0.1.6 xatlas==0.0.11 fast-simplification==0.2.0 cholespy==2.2.0 gpytoolbox==0.3.8 einops==0.8.2
  omegaconf==2.4.0 rembg==2.0.69 pymatting==1.1.16 pooch==1.9.0 platformdirs jsonschema==4.26.0
  jsonschema-specifications referencing rpds-py filelock==4.3.1 manifold3d==3.5.4)

if [ "$mode" = fetch ]; then
  mkdir -p "$wheels"
  plats=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do plats+=(--platform "$p"); done
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plats[@]}" -d "$wheels" "${packages[@]}" || exit 1
  ls "$wheels"
  exit 0
fi

budget=${GPU_BUDGET_S:-480}
tests_s=${GPU_TESTS_S:-150}
check=("$py" -m benchmarks.gpu_check --out "$out" --budget-s "$budget" --tests-s "$tests_s")
have_wheels=0
if compgen -G "$wheels/*.whl" >/dev/null; then have_wheels=1; fi

if [ "$mode" = dry ]; then
  echo "python:  $py"
  if [ "$have_wheels" = 1 ]; then
    echo "wheels:  $(find "$wheels" -maxdepth 1 -name '*.whl' | wc -l) in $wheels, installed into a temporary folder"
  else
    echo "wheels:  none in $wheels (the current Python must have every package)"
  fi
  echo "env:     USE_FLAX=0 USE_TF=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NUMBA_DISABLE_JIT=1"
  echo "run:     timeout $((budget + 30)) ${check[*]}"
  echo "out:     $out/gpu-check.json $out/gpu-fp16.json $out/cuda-tests.xml $out/gpu.log"
  exit 0
fi

mkdir -p "$out"
log="$out/gpu.log"
# The device first (torch comes with the box): without one, say so before installing anything.
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$log" 2>&1; then
  echo "gpu.sh: torch sees no CUDA device here (see $log); this check needs one" >&2
  exit 1
fi
if [ "$have_wheels" = 1 ]; then
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
      >>"$log" 2>&1; then
    echo "gpu.sh: installing the wheels from $wheels failed (see $log)" >&2
    exit 1
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# USE_FLAX=0: diffusers 0.19.3 crashes on import next to a current JAX. The tests' own settings come from conftest.
export USE_FLAX=0 USE_TF=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  NUMBA_DISABLE_JIT=1 GRADIO_ANALYTICS_ENABLED=False
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$log" 2>&1 || true
timeout "$((budget + 30))" "${check[@]}"
rc=$?
echo "gpu.sh: rc=$rc; results in $out/gpu-check.json" | tee -a "$log"
exit "$rc"

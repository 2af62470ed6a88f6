#!/usr/bin/env bash
# The GPU check (issue: fast trials), prepared to run in one go on a lent GPU machine (~6 minutes):
#   1. benchmarks/trainable.py on CUDA: tutorial loop vs classic loop vs hpsearch, batch 64 and 128;
#   2. the same 16-trial search packed 4 per GPU (gpu: 0.25) and one per GPU (gpu: 1), MLflow off;
# figures into $1 (default: $OUT, else ./gpu_figures). Without network the machine lacks Ray and
# Optuna: first run ../shared/gpu/pack_wheels.sh here, carry .whl, and this script installs them.
# Fashion-MNIST does not fit beside the wheels in the 64 MiB sent: the benchmarks then write
# synthetic data of the same shape (timings hold; accuracies mean nothing there).
# On a CPU machine, DEVICE=cpu TRIALS=4 EPOCHS=1 checks the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_figures}}
mkdir -p "$out"
device=${DEVICE:-cuda}
trials=${TRIALS:-16}
epochs=${EPOCHS:-3}
if [ -d .whl ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

python3 - <<'PY' | tee "$out/device.txt"
import torch, ray, optuna
print("torch", torch.__version__, "ray", ray.__version__, "optuna", optuna.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

timeout 240 python3 benchmarks/trainable.py --device "$device" --epochs "$epochs" --batch-sizes 64 128 2>&1 | tee "$out/trainable.txt"

if [ "$device" = cuda ]; then packed=0.25; single=1; else packed=0; single=0; fi
for gpu in $packed $single; do
  timeout 200 python3 benchmarks/search.py --trials "$trials" --gpu "$gpu" --skip-baseline --no-tracking \
    --out "$out/search_gpu$gpu" 2>&1 | tee "$out/search_gpu$gpu.txt"
done
python3 - "$out" "$packed" "$single" <<'PY' | tee "$out/summary.txt"
import json, sys
out, packed, single = sys.argv[1:]
p = json.load(open(f"{out}/search_gpu{packed}/search.json"))["hpsearch"]
s = json.load(open(f"{out}/search_gpu{single}/search.json"))["hpsearch"]
print(f"trials per minute: packed (gpu {packed}) {p['trials_per_min']:.1f}, one per GPU (gpu {single}) "
      f"{s['trials_per_min']:.1f}: {p['trials_per_min'] / s['trials_per_min']:.2f}x")
PY

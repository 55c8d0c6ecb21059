#!/usr/bin/env bash
# The accelerator check (about 6 minutes on one GPU): smoke runs of the classifier and both captioners in
# float32 and bfloat16, the classifier and decoder benchmarks (float32 and bfloat16), feature extraction of
# the UCM images; JSON lines with the device, samples/s and peak device memory.
#   pip install -e '.[cuda12]'    # once, on the GPU machine
#   bash bench/device_check.sh [UCM_DIR] [FMNIST_DIR] | tee device_check.jsonl
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
UCM=${1:-../shared/data/ucm_captions}
FMNIST=${2:-/usr/share/datasets/fashion-mnist}
WORK=${DEVICE_CHECK_DIR:-/tmp/device_check}
rm -rf "$WORK"
mkdir -p "$WORK"
fmnist_flag=()
[ -d "$FMNIST" ] && fmnist_flag=(--fmnist_dir="$FMNIST")
ucm_flag=()
[ -d "$UCM" ] && ucm_flag=(--ucm_dir="$UCM")
timeout 200 "$PY" bench/device_check.py --workdir="$WORK" "${fmnist_flag[@]}" "${ucm_flag[@]}" 2>"$WORK/runs.log" \
  || echo "{\"check\": \"runs\", \"error\": \"exit $? (see $WORK/runs.log)\"}"
# Benchmarks on the default device (no core pinning on an accelerator machine: --core=-1), no PyTorch peers.
timeout 60 "$PY" bench/bench_classifier.py --core=-1 --reps=1 --seconds=2 --half_precision 2>>"$WORK/bench.log" \
  || echo '{"check": "bench_classifier", "error": "see bench.log"}'
timeout 60 "$PY" bench/bench_decoders.py --core=-1 --reps=1 --seconds=2 --half_precision 2>>"$WORK/bench.log" \
  || echo '{"check": "bench_decoders", "error": "see bench.log"}'
if [ -d "$UCM" ]; then
  timeout 60 "$PY" bench/bench_features.py --core=-1 --reps=1 --ucm_dir="$UCM" 2>>"$WORK/bench.log" \
    || echo '{"check": "bench_features", "error": "see bench.log"}'
fi

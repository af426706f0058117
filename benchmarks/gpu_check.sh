#!/usr/bin/env bash
# GPU speed check for a lent machine (Python 3.12, torch 2.11; no network; kdad not installed: PYTHONPATH=src).
# Writes every JSON under $OUT in about 6 minutes of wall time:
#   vs_anomalib_cuda.json          kdad vs anomalib RD/STFPM (resnet18, wide_resnet50_2): infer b16/b64,
#                                  train b16, memory; kdad levers (fp32 / bf16 autocast, channels_last,
#                                  BN folding, fast head) with cudnn.benchmark on for everyone
#   vs_anomalib_cuda_compile.json  the lever table again with torch.compile (fp32 and bf16)
#   methods_speed_cuda.json        every other method, efficientnet_lite0 and resnet18 teachers
# anomalib 2.7.0 and its deps missing on that image travel as wheels in .whl/ (27 MiB; see
# docs/benchmarks.md for the download command); without them the kdad rows are still measured and
# anomalib's H200 numbers from ../shared/REFERENCE.md section 4.4 are the comparison.
# Run from the repo root:  bash benchmarks/gpu_check.sh   (the run tool's call is in docs/benchmarks.md)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY=python3
log() { echo "[$(date +%T)] $*"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  log "installing carried wheels"
  timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site" || log "wheel install failed: kdad-only run"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'tv', torchvision.__version__, 'timm', timm.__version__)"
$PY -c "import anomalib; print('anomalib', anomalib.__version__)" 2>/dev/null || log "anomalib not importable"

log "vs_anomalib (cuda)"
timeout 200 $PY benchmarks/vs_anomalib.py --device cuda --out "$OUT/vs_anomalib_cuda.json" \
  --rounds 5 --rounds-big 5 --calls 10 --calls-big 10 --warmup 3 --skip accuracy 2>&1 | grep -v Warning \
  || log "vs_anomalib ended early (partial JSON kept)"

log "methods_speed (cuda)"
timeout 100 $PY benchmarks/methods_speed.py --device cuda --out "$OUT/methods_speed_cuda.json" \
  --rounds 5 --rounds-big 5 --calls 10 --calls-big 5 --warmup 3 2>&1 | grep -v Warning \
  || log "methods_speed ended early (partial JSON kept)"

log "torch.compile levers (cuda)"
timeout 90 $PY benchmarks/vs_anomalib.py --device cuda --out "$OUT/vs_anomalib_cuda_compile.json" \
  --skip configs head accuracy roofline --compile --rounds 5 --calls 10 --calls-big 10 --warmup 3 2>&1 \
  | grep -v Warning || log "compile run ended early (partial JSON kept)"

ls -la "$OUT"
log "done"

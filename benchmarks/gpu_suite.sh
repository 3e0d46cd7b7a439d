#!/usr/bin/env bash
# Issue 5's GPU benchmark in one go (what the README's H200 table comes from):
#   bash benchmarks/gpu_suite.sh OUTDIR [TRAINED_YOLOV8N.pt]
# Scenes (uint16 DEFLATE tiled 8k/16k/32k, striped 32k, uint8 DEFLATE tiled 32k, uint8 LZW tiled/striped
# 8k), TorchScript models (random-weight YOLOv8m, YOLOv8n trained if given), then engine-only vs
# end-to-end per scene, each in a fresh process, PyTorch backend, fp16, on cuda, CUDA graphs on (and
# once off, RS_DETECT_CUDA_GRAPHS=0, for comparison). Scenes and models go to $BENCH_WORK (/tmp/bench);
# models already there are reused (BENCH_SKIP_MODELS=1 skips making them: no Ultralytics needed).
# Each measured run's memory samples (RSS and its parts, pinned bytes, slabs; every 10 ms) go to
# OUTDIR/traces/RUN/trace_SCENE.json. BENCH_REPEAT=N measures every case N times in turn (medians in the
# CSV, each pair's ratio in its 'ratios'): the end-to-end ratios of one case moved by up to 0.05 from call
# to call on the H200 (README, "Speed and memory"), so a target near a ratio needs more than one pair.
set -euo pipefail
OUT=${1:?usage: gpu_suite.sh OUTDIR [YOLOV8N.pt]}
V8N=${2:-}
W=${BENCH_WORK:-/tmp/bench}
THREADS=${BENCH_THREADS:-$(( $(nproc) - 4 ))}  # 12 of 16 cores: 14 readers were slower (GIL)
mkdir -p "$OUT" "$W/scenes" "$W/models"
OUT=$(realpath "$OUT"); W=$(realpath "$W"); [ -z "$V8N" ] || V8N=$(realpath "$V8N")  # before the cd below
cd "$(dirname "$0")/.."
S=$W/scenes
t0=$(date +%s)
[ "${BENCH_SKIP_MODELS:-0}" = 1 ] || python3 benchmarks/make_models.py --out "$W/models" ${V8N:+--v8n-pt "$V8N"} 2>&1 | grep -v '^ *$' | tail -4
python3 benchmarks/bench_pipeline.py scenes --out "$S" --spec 8192:uint16:tiled:deflate 16384:uint16:tiled:deflate \
  32768:uint16:tiled:deflate 32768:uint16:striped:deflate 32768:uint8:tiled:deflate 8192:uint8:tiled:lzw 8192:uint8:striped:lzw
echo "setup: $(( $(date +%s) - t0 )) s"
REPEAT=${BENCH_REPEAT:-1}  # engine-only and end-to-end this many times in turn per case; medians reported
run() { python3 benchmarks/bench_pipeline.py run --device cuda --threads "$THREADS" --warmup --repeat "$REPEAT" "$@"; }
run --model "$W/models/yolov8m.torchscript" --batch 16 --csv "$OUT/bench_v8m_b16.csv" --trace-dir "$OUT/traces/v8m_b16" --png "$OUT/bench_v8m_b16.png" \
  --title "YOLOv8m, batch 16, fp16, PyTorch backend" \
  --scenes "$S/scene_32768_uint16_tiled_deflate.tif" "$S/scene_32768_uint16_striped_deflate.tif" \
  "$S/scene_16384_uint16_tiled_deflate.tif" "$S/scene_8192_uint16_tiled_deflate.tif" \
  "$S/scene_8192_uint8_tiled_lzw.tif" "$S/scene_8192_uint8_striped_lzw.tif" \
  --seed-baseline "$S/scene_8192_uint16_tiled_deflate.tif"
RS_DETECT_CUDA_GRAPHS=0 run --model "$W/models/yolov8m.torchscript" --batch 16 --csv "$OUT/bench_v8m_b16_eager.csv" --trace-dir "$OUT/traces/v8m_b16_eager" \
  --scenes "$S/scene_32768_uint16_tiled_deflate.tif"
run --model "$W/models/yolov8m.torchscript" --batch 32 --csv "$OUT/bench_v8m_b32.csv" --trace-dir "$OUT/traces/v8m_b32" --scenes "$S/scene_32768_uint16_tiled_deflate.tif"
run --model "$W/models/yolov8n.torchscript" --batch 16 --csv "$OUT/bench_v8n_b16.csv" --trace-dir "$OUT/traces/v8n_b16" --png "$OUT/bench_v8n_b16.png" \
  --title "YOLOv8n, batch 16, fp16, PyTorch backend" \
  --scenes "$S/scene_32768_uint16_tiled_deflate.tif" "$S/scene_32768_uint16_striped_deflate.tif" "$S/scene_32768_uint8_tiled_deflate.tif"
echo "total: $(( $(date +%s) - t0 )) s"

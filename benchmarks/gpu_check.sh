#!/usr/bin/env bash
# The GPU figures issue 15 asks for, in one command, on a machine with a CUDA GPU:
#
#   MODELS_DIR=/models benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. benchmarks/extractors.py --paper --device cuda --dtype bf16: per-model throughput of the
#    real architectures (random weights of the same shape where no checkpoint is found).
# 2. benchmarks/extraction.py --profile paper models.device=cuda: the whole extraction (every
#    frame) vs the sum of the stages vs the naive loop. It needs the paper's checkpoints under
#    MODELS_DIR (models.models_dir); without MODELS_DIR it runs the demo models on the GPU with
#    the paper's face settings instead, and says so.
# Figures go to OUT_DIR (default /tmp/merflow-gpu-check): *.log and extraction.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/merflow-gpu-check}"
mkdir -p "$out"
py=.venv/bin/python
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
uptime | tee -a "$out/gpu.txt"
extra=()
[ -n "${MODELS_DIR:-}" ] && extra+=(--models-dir "$MODELS_DIR")
"$py" benchmarks/extractors.py --paper --device cuda --dtype bf16 "${extra[@]}" 2>&1 | tee "$out/extractors.log"
if [ -n "${MODELS_DIR:-}" ]; then
  "$py" benchmarks/extraction.py --n 96 --shard-size 32 --profile paper --out "$out/extraction" \
    --json "$out/extraction.json" models.device=cuda "models.models_dir=$MODELS_DIR" 2>&1 | tee "$out/extraction.log"
else
  echo "no MODELS_DIR: the paper's checkpoints are absent; extraction runs the demo models on cuda" \
    "with the paper's face settings (112 px, every frame, detect_every=5)" | tee "$out/extraction.log"
  "$py" benchmarks/extraction.py --n 96 --shard-size 32 --profile demo --out "$out/extraction" \
    --json "$out/extraction.json" models.device=cuda faces.size=112 faces.fps=null \
    faces.detect_every=5 2>&1 | tee -a "$out/extraction.log"
fi
uptime | tee -a "$out/gpu.txt"

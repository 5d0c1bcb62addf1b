#!/usr/bin/env bash
# The GPU figures, in one command, on a machine with a CUDA GPU:
#
#   MODELS_DIR=/models AUTHORS_DIR=/tmp/mer2024-semi/models benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. benchmarks/extractors.py --paper --device cuda, twice: the paper profile's recipes (the
#    challenge baseline's, whose precision is fixed: CLIP and HuBERT fp32, the LLM fp16) and
#    merflow's recipe in bf16. Real architectures, from MODELS_DIR's checkpoints or else random
#    weights of the same shape (speed does not depend on the weights).
# 2. benchmarks/train_synthetic.py --throughput --rows 115595 --device cuda: MR-CCL's step and
#    whole epochs at MER2024's size; with AUTHORS_DIR (a local copy of the authors' models/
#    folder, never fetched here) their model's step too, timed the same way.
# 3. benchmarks/extraction.py: the whole extraction (every frame) vs the sum of the stages vs
#    the naive loop, with the paper's checkpoints under MODELS_DIR, else the demo models on the
#    GPU with the paper's face settings. It needs Prefect, dlib and FFmpeg; where they are
#    missing (a bare GPU machine) it is skipped and says so.
# PY picks the Python (default .venv/bin/python). Figures go to OUT_DIR (default
# /tmp/merflow-gpu-check), one log per phase; a phase that fails is named and the next runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/merflow-gpu-check}"
mkdir -p "$out"
py="${PY:-.venv/bin/python}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()
phase() {  # phase NAME COMMAND...: run it, its output to NAME.log, its time and status said
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)" \
  | tee -a "$out/gpu.txt"
uptime | tee -a "$out/gpu.txt"
models=()
[ -n "${MODELS_DIR:-}" ] && models+=(--models-dir "$MODELS_DIR")
sizes=(--crops 1024 --clips 32 --audio-seconds 5 --texts 256 --repeats 3)
phase extractors-profile "$py" benchmarks/extractors.py --paper --device cuda --recipe profile \
  --kinds visual,acoustic,text "${sizes[@]}" "${models[@]}"
authors=()
[ -n "${AUTHORS_DIR:-}" ] && authors+=(--authors "$AUTHORS_DIR")
phase training "$py" benchmarks/train_synthetic.py --throughput --rows 115595 --device cuda \
  --steps 20 "${authors[@]}"
phase extractors-bf16 "$py" benchmarks/extractors.py --paper --device cuda --recipe merflow \
  --dtype bf16 --kinds visual,acoustic,text "${sizes[@]}" "${models[@]}"
if ! "$py" -c "import prefect, dlib" 2>/dev/null || ! command -v ffmpeg >/dev/null; then
  echo "== extraction: skipped (Prefect, dlib or FFmpeg missing; run make setup first)" \
    | tee "$out/extraction.log"
elif [ -n "${MODELS_DIR:-}" ]; then
  phase extraction "$py" benchmarks/extraction.py --n 96 --shard-size 32 --profile paper \
    --out "$out/extraction" --json "$out/extraction.json" models.device=cuda \
    "models.models_dir=$MODELS_DIR"
else
  echo "no MODELS_DIR: the paper's checkpoints are absent; extraction runs the demo models on" \
    "cuda with the paper's face settings (112 px, every frame, detect_every=5)"
  phase extraction "$py" benchmarks/extraction.py --n 96 --shard-size 32 --profile demo \
    --out "$out/extraction" --json "$out/extraction.json" models.device=cuda faces.size=112 \
    faces.fps=null faces.detect_every=5
fi
uptime | tee -a "$out/gpu.txt"
[ "${#failed[@]}" -eq 0 ] || { echo "failed phases: ${failed[*]}"; exit 1; }

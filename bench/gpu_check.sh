#!/usr/bin/env bash
# GPU check of every tiny family (bench/gpu_check.py): bf16 LoRA steps, 4-bit QLoRA, Liger kernels, batched
# generation; prints tokens/s and peak memory per family as a Markdown table for bench/RESULTS.md.
# Where no CUDA device is present it prints one "no CUDA device" line and exits 0 (CI runs that path).
#   bench/gpu_check.sh [--steps 5] [--batch 8] [--new-tokens 32] [--families llava,gemma3]
# PYTHON overrides the interpreter (default: the project's .venv); GPU_CHECK_TIMEOUT (seconds, default 450)
# bounds the whole run, well inside the 8 minutes it is budgeted.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT:-450}" "$python" "$root/bench/gpu_check.py" "$@"

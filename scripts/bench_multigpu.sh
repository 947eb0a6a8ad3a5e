#!/usr/bin/env bash
# Multi-GPU rows of the [multi-device] issue on one host (nvidia-h200-x2 or -x4; N = the GPUs it has), one part per
# call, every command under `timeout` with its limit taken from one deadline (BUDGET_S, default 560 s after the start;
# scripts/bench_lib.sh). One JSON line per configuration in ${OUT:-.}/multigpu.jsonl (scripts/bench_train.py's
# fields: tokens/s, peak GiB and MFU per device, --batch per data x fsdp coordinate; bench_generate.py's), stderr in
# multigpu.log.
#
#   bash scripts/bench_multigpu.sh scaling 2b   # Qwen2-VL-2B LoRA bf16, batch 4 per GPU: 1 GPU, then fsdp=N, data=N
#   bash scripts/bench_multigpu.sh scaling 7b   # the same at the Qwen2-VL-7B geometry
#   bash scripts/bench_multigpu.sh 72b          # Qwen2.5-VL-72B LoRA bf16, batch 2 per GPU, fsdp=N (not one GPU: its
#                                               # 146 GB of bf16 weights exceed an H200's 141 GB), then greedy
#                                               # generation (bf16, tensor=N, batch 1 and 8, 64 new tokens)
#
# The 1-GPU baseline runs with CUDA_VISIBLE_DEVICES=0 (with several devices and no mesh, the trainer takes them all).
# Remat: full (per block). TINY=1 runs the tiny config on forced CPU devices (a check of the script; N=2 then).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
END=$(( $(date +%s) + ${BUDGET_S:-560} ))
source scripts/bench_lib.sh
TRAIN=(python -m scripts.bench_train --weights bf16 --remat full)
GEN=(python -m scripts.bench_generate --quant 16bit --batch 1 8 --new 64)
if [[ ${TINY:-0} == 1 ]]; then
  TRAIN+=(--tiny); GEN+=(--tiny); N=2
  export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2
else
  N=$(nvidia-smi -L | wc -l)
fi
case "${1:-}" in
  scaling)
    G=qwen2-vl-${2:-2b}
    CUDA_VISIBLE_DEVICES=0 run multigpu "$(limit 200 250)" "${TRAIN[@]}" --geometry "$G" --batch 4
    run multigpu "$(limit 400 0)" "${TRAIN[@]}" --geometry "$G" --batch 4 --mesh fsdp=$N data=$N ;;
  72b)
    run multigpu "$(limit 330 200)" "${TRAIN[@]}" --geometry qwen2.5-vl-72b --batch 2 --mesh fsdp=$N
    XLA_PYTHON_CLIENT_PREALLOCATE=false run multigpu "$(limit 400 0)" "${GEN[@]}" --geometry qwen2.5-vl-72b \
      --mesh tensor=$N ;;
  *) echo "usage: $0 scaling 2b|7b | 72b" >&2; exit 2 ;;
esac

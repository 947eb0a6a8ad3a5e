#!/usr/bin/env bash
# Multi-GPU rows of the [multi-device] issue on one host (nvidia-h200-x4), one part per call, every command under
# `timeout` with its limit taken from one deadline (BUDGET_S, default 560 s after the start; scripts/bench_lib.sh).
# One JSON line per configuration in ${OUT:-.}/multigpu.jsonl (scripts/bench_train.py's fields; tokens/s, peak GiB
# and MFU per device, --batch per data x fsdp coordinate), stderr in multigpu.log.
#
#   bash scripts/bench_multigpu.sh scaling 2b   # Qwen2-VL-2B LoRA bf16, batch 4 per GPU: 1 GPU, fsdp=2, fsdp=4, data=4
#   bash scripts/bench_multigpu.sh scaling 7b   # the same at the Qwen2-VL-7B geometry
#   bash scripts/bench_multigpu.sh 72b          # Qwen2.5-VL-72B LoRA bf16, batch 2 per GPU: fsdp=2, fsdp=4 (not one GPU:
#                                               # its 146 GB of bf16 weights exceed an H200's 141 GB)
#
# The 1-GPU baseline runs with CUDA_VISIBLE_DEVICES=0 (with several devices and no mesh, the trainer takes them all).
# Remat: full (per block). TINY=1 runs the tiny config on forced CPU devices (a check of the script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
END=$(( $(date +%s) + ${BUDGET_S:-560} ))
source scripts/bench_lib.sh
TRAIN=(python -m scripts.bench_train --weights bf16 --remat full)
[[ ${TINY:-0} == 1 ]] && TRAIN+=(--tiny)
case "${1:-}" in
  scaling)
    G=qwen2-vl-${2:-2b}
    CUDA_VISIBLE_DEVICES=0 run multigpu "$(limit 150 300)" "${TRAIN[@]}" --geometry "$G" --batch 4
    CUDA_VISIBLE_DEVICES=0,1 run multigpu "$(limit 150 150)" "${TRAIN[@]}" --geometry "$G" --batch 4 --mesh fsdp=2
    run multigpu "$(limit 300 0)" "${TRAIN[@]}" --geometry "$G" --batch 4 --mesh fsdp=4 data=4 ;;
  72b)
    CUDA_VISIBLE_DEVICES=0,1 run multigpu "$(limit 280 250)" "${TRAIN[@]}" --geometry qwen2.5-vl-72b --batch 2 --mesh fsdp=2
    run multigpu "$(limit 280 0)" "${TRAIN[@]}" --geometry qwen2.5-vl-72b --batch 2 --mesh fsdp=4 ;;
  *) echo "usage: $0 scaling 2b|7b | 72b" >&2; exit 2 ;;
esac

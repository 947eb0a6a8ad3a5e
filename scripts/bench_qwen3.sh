#!/usr/bin/env bash
# The Qwen3-VL rows of docs/BENCHMARKS.md on the lent 2-GPU machine (nvidia-h200-x2): two groups run at once,
# one per GPU, each command under a time limit so that one device call (10 min) always returns its results.
# One JSON line per configuration in ${OUT:-.}/<group>.jsonl, each tool's stderr in <group>.log.
#
#   bash scripts/bench_qwen3.sh dense   # Qwen3-VL-2B: GPU 0 jaxvlm + transformers/PEFT(+bnb); GPU 1 Unsloth + decode
#   bash scripts/bench_qwen3.sh moe     # Qwen3-VL-30B-A3B: GPU 0 jaxvlm NF4 (+ transformers' 2B decode);
#                                       # GPU 1 transformers + PEFT bf16 (+ Unsloth's 2B bf16 step, batch 4)
#   bash scripts/bench_qwen3.sh moe-kernel   # the grouped-matmul kernel check, then the MoE step with it;
#                                            # GPU 1 Unsloth's 2B batch-8 rows
#   bash scripts/bench_qwen3.sh moe-lora     # LoRA on the experts too (Unsloth's default): the kernels' check
#                                            # (LoRA factor shapes, weight gradients), jaxvlm NF4 and bf16;
#                                            # GPU 1 transformers + PEFT bf16 (target_parameters)
#
# Needs .peers/ (scripts/fetch_peers.sh; carried with the call) for bitsandbytes and Unsloth.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/.peers/bnb:${PYTHONPATH:-} PYTHONUNBUFFERED=1
json() { grep --line-buffered -o '{".*' >> "$OUT/$1.jsonl"; }
run() {  # GROUP SECONDS COMMAND...: the command's JSON lines to GROUP.jsonl, the rest of its output to GROUP.log
  local group=$1 limit=$2; shift 2
  echo "== $(date -u +%FT%TZ) $*" >> "$OUT/$group.log"
  timeout "$limit" "$@" 2>>"$OUT/$group.log" | tee -a "$OUT/$group.log" | json "$group"
}
G=qwen3-vl-2b
case "${1:-}" in
  dense)
    (export CUDA_VISIBLE_DEVICES=0
     run dense-gpu0 300 python3 -m scripts.bench_train --geometry $G --batch 4 8 --weights bf16 nf4 --remat full
     run dense-gpu0 270 python3 scripts/bench_hf_peft.py --geometry $G --batch 4 8 --quant bf16 nf4) &
    (export CUDA_VISIBLE_DEVICES=1
     run dense-gpu1 420 env PYTHONPATH=$PWD/.peers/unsloth:$PYTHONPATH python3 scripts/bench_unsloth.py \
       --geometry $G --batch 4 8 --q4 0 1 --timeout 120
     run dense-gpu1 150 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 scripts/bench_generate.py --geometry $G --batch 1 --new 128 --quant 16bit nf4 --hf) &
    wait ;;
  moe)  # with the 2B runs the dense group's time limits cut (Unsloth's bf16 compile, transformers' decode)
    (export CUDA_VISIBLE_DEVICES=0
     run moe-gpu0 340 python3 -m scripts.bench_train --geometry qwen3-vl-30b-a3b --batch 4 8 --weights nf4 \
       --remat full
     run moe-gpu0 220 env JAX_PLATFORMS=cpu python3 -m scripts.bench_generate --one hf --geometry $G --batch 1 \
       --new 128) &
    (export CUDA_VISIBLE_DEVICES=1
     run moe-gpu1 300 python3 scripts/bench_hf_peft.py --geometry qwen3-vl-30b-a3b --batch 4 8 --quant bf16
     run moe-gpu1 270 env PYTHONPATH=$PWD/.peers/unsloth:$PYTHONPATH python3 scripts/bench_unsloth.py \
       --geometry $G --batch 4 --q4 0 --timeout 260) &
    wait ;;
  moe-kernel)  # the MoE step with the Mosaic GPU grouped matmul; Unsloth's 2B batch-8 rows beside it
    (export CUDA_VISIBLE_DEVICES=0
     run kernel-gpu0 90 python3 -m scripts.bench_grouped_matmul
     # A kernel that fails to lower leaves the step on XLA's op (the row then says so by its speed).
     if grep -q mgpu_error "$OUT/kernel-gpu0.jsonl" 2>/dev/null || ! grep -q mgpu_ms "$OUT/kernel-gpu0.jsonl"; then
       export JAXVLM_GROUPED_MATMUL=xla; echo "grouped matmul: xla" >> "$OUT/kernel-gpu0.log"; fi
     run kernel-gpu0 460 python3 -m scripts.bench_train --geometry qwen3-vl-30b-a3b --batch 4 8 --weights nf4 bf16 \
       --remat full) &
    (export CUDA_VISIBLE_DEVICES=1
     run kernel-gpu1 560 env PYTHONPATH=$PWD/.peers/unsloth:$PYTHONPATH python3 scripts/bench_unsloth.py \
       --geometry $G --batch 8 --q4 0 1 --timeout 270) &
    wait ;;
  moe-lora)
    (export CUDA_VISIBLE_DEVICES=0
     run lora-gpu0 120 python3 -m scripts.bench_grouped_matmul
     run lora-gpu0 440 python3 -m scripts.bench_train --geometry qwen3-vl-30b-a3b --batch 4 8 --weights nf4 bf16 \
       --remat full --lora-experts auto) &
    (export CUDA_VISIBLE_DEVICES=1
     run lora-gpu1 560 python3 scripts/bench_hf_peft.py --geometry qwen3-vl-30b-a3b --batch 4 8 --quant bf16 \
       --lora-experts auto) &
    wait ;;
  *) echo "usage: bash scripts/bench_qwen3.sh dense|moe|moe-kernel|moe-lora" >&2; exit 2 ;;
esac

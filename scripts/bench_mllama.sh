#!/usr/bin/env bash
# The Llama 3.2 Vision rows on the lent 2-GPU machine (nvidia-h200-x2): two groups at once, one per GPU, every command
# under `timeout`, its limit taken from one deadline (BUDGET_S, default 560 s after the start), as bench_gemma3.sh.
# One JSON line per configuration in ${OUT:-.}/<group>.jsonl, each tool's stderr in <group>.log.
#
#   bash scripts/bench_mllama.sh all   # GPU 0: jaxvlm 11B LoRA NF4 + bf16 (batch 4), jaxvlm decode at batch 1 (16-bit,
#                                      #        NF4);
#                                      # GPU 1: transformers + PEFT bf16 and + bitsandbytes NF4 (batch 4), Unsloth NF4
#                                      #        (batch 4, on the model the NF4 run saved), transformers decode
#
# Geometry: scripts/bench_common.py (mllama-11b; random weights). Workload: one 1120x1120 image as 2 x 2 tiles of 560
# (4 x 1601 vision tokens, seen by every text token through the 8 cross-attention layers) + "<|image|>" + 256 text
# tokens per sample (seq 257), labels on the text. Needs .peers/ (scripts/fetch_peers.sh; carried with the call).
# TINY=1 runs the family's tiny config (a CPU check of the script; Unsloth needs a GPU and is skipped there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/.peers/bnb:${PYTHONPATH:-} PYTHONUNBUFFERED=1
END=$(( $(date +%s) + ${BUDGET_S:-560} ))
G=mllama-11b
HF_DIR=/tmp/unsloth_bench_$G${TINY:+_tiny}  # saved once by the NF4 transformers run, reused by Unsloth
T=${TINY:+--tiny}
UNSLOTH="env PYTHONPATH=$PWD/.peers/unsloth:$PYTHONPATH python3 scripts/bench_unsloth.py"
source scripts/bench_lib.sh  # json, limit, run

case "${1:-}" in
  all)
    (export CUDA_VISIBLE_DEVICES=0
     run gpu0 "$(limit 300 160)" python3 -m scripts.bench_train --geometry $G $T --batch 4 --weights nf4 bf16 \
       --remat full
     run gpu0 "$(limit 200 0)" env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 scripts/bench_generate.py \
       --geometry $G $T --batch 1 --new 128 --quant 16bit nf4) &
    (export CUDA_VISIBLE_DEVICES=1
     run gpu1 "$(limit 300 230)" python3 scripts/bench_hf_peft.py --geometry $G $T --batch 4 --quant bf16 nf4 \
       --dir "$HF_DIR"
     if [[ -z "${TINY:-}" ]]; then
       L=$(limit 200 60); run gpu1 "$L" $UNSLOTH --geometry $G --batch 4 --q4 1 --timeout $(( L - 15 ))
     fi
     run gpu1 "$(limit 90 0)" env JAX_PLATFORMS=cpu python3 -m scripts.bench_generate --one hf --geometry $G $T \
       --batch 1 --new 128) &
    wait ;;
  *) echo "usage: bash scripts/bench_mllama.sh all" >&2; exit 2 ;;
esac

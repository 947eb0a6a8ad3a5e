#!/usr/bin/env bash
# The LLaVA rows (LLaVA-1.5-7B, Pixtral-12B) on the lent 2-GPU machine (nvidia-h200-x2), one geometry per call: two
# groups at once, one per GPU, every command under `timeout`, its limit taken from one deadline (BUDGET_S, default
# 560 s after the start), as bench_mllama.sh. One JSON line per configuration in ${OUT:-.}/<group>.jsonl (groups
# <which>-gpu0, <which>-gpu1), each tool's stderr in <group>.log.
#
#   bash scripts/bench_llava.sh llava     # LLaVA-1.5-7B
#   bash scripts/bench_llava.sh pixtral   # Pixtral-12B (`llava` with a Pixtral tower)
#     GPU 0: jaxvlm LoRA NF4 + bf16 (batch 4), jaxvlm decode at batch 1 (16-bit, NF4);
#     GPU 1: transformers + PEFT bf16 and + bitsandbytes NF4 (batch 4; a batch that does not fit is a line with
#            "error": "OOM"), Unsloth NF4 (batch 4, on the model the NF4 run saved), transformers decode
#
# Geometries: scripts/bench_common.py (llava-1.5-7b, pixtral-12b; random weights). Workload: one image then 256 text
# tokens per sample, labels on the text: LLaVA-1.5 a 336x336 image as 576 <image> tokens (CLIP ViT-L/14 read at
# layer -2, class token dropped; seq 832); Pixtral a 448x448 image as 28 rows of 28 [IMG] each ended by
# [IMG_BREAK], the last by [IMG_END] (812 tokens, seq 1068). Needs .peers/ (scripts/fetch_peers.sh; carried with the
# call). TINY=1 runs the family's tiny config (a CPU check of the script; Unsloth needs a GPU and is skipped there).
#
# The limits are bench_mllama.sh's (Llama 3.2 11B Vision, the same sizes: 7B / 12B): a jaxvlm training configuration
# 60-130 s (its own process: model draw, compile, 13 steps), decode 60-90 s per weights; transformers + PEFT
# 60-100 s per --quant (NF4 also saves the random bf16 model once, 14 GB / 25 GB, which Unsloth reuses: same
# directory), Unsloth 100-200 s, transformers decode ~60 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/.peers/bnb:${PYTHONPATH:-} PYTHONUNBUFFERED=1
END=$(( $(date +%s) + ${BUDGET_S:-560} ))
case "${1:-}" in
  llava) G=llava-1.5-7b ;;
  pixtral) G=pixtral-12b ;;
  *) echo "usage: bash scripts/bench_llava.sh llava|pixtral" >&2; exit 2 ;;
esac
HF_DIR=/tmp/unsloth_bench_$G${TINY:+_tiny}  # saved once by the NF4 transformers run, reused by Unsloth
T=${TINY:+--tiny}
UNSLOTH="env PYTHONPATH=$PWD/.peers/unsloth:$PYTHONPATH python3 scripts/bench_unsloth.py"
source scripts/bench_lib.sh  # json, limit, run

(export CUDA_VISIBLE_DEVICES=0
 run "$1-gpu0" "$(limit 300 160)" python3 -m scripts.bench_train --geometry $G $T --batch 4 --weights nf4 bf16 \
   --remat full
 run "$1-gpu0" "$(limit 200 0)" env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 scripts/bench_generate.py \
   --geometry $G $T --batch 1 --new 128 --quant 16bit nf4) &
(export CUDA_VISIBLE_DEVICES=1
 run "$1-gpu1" "$(limit 300 230)" python3 scripts/bench_hf_peft.py --geometry $G $T --batch 4 --quant bf16 nf4 \
   --dir "$HF_DIR"
 if [[ -z "${TINY:-}" ]]; then
   L=$(limit 200 60); run "$1-gpu1" "$L" $UNSLOTH --geometry $G --batch 4 --q4 1 --timeout $(( L - 15 ))
 fi
 run "$1-gpu1" "$(limit 90 0)" env JAX_PLATFORMS=cpu python3 -m scripts.bench_generate --one hf --geometry $G $T \
   --batch 1 --new 128) &
wait

#!/usr/bin/env bash
# The Gemma 3 rows on the lent 2-GPU machine (nvidia-h200-x2): two groups at once, one per GPU, every command
# under `timeout`, its limit taken from one deadline (BUDGET_S, default 560 s after the start) so that the whole
# script, and the device call of at most 600 s that runs it, always returns with what finished.
# One JSON line per configuration in ${OUT:-.}/<group>.jsonl, each tool's stderr (and a line per command, with
# its limit, or why it was skipped) in <group>.log.
#
#   bash scripts/bench_gemma3.sh all     # GPU 0: jaxvlm Gemma-3-4B LoRA bf16 + NF4 (batch 4, 8), Gemma-3-27B NF4
#                                        #        (batch 4), jaxvlm decode at batch 1 (16-bit, NF4), then 27B NF4
#                                        #        batch 8 if the time left allows it;
#                                        # GPU 1: transformers + PEFT 4B bf16 and + bitsandbytes NF4 (batch 4, 8),
#                                        #        Unsloth 4B NF4 then bf16 (batch 4), transformers decode
#   bash scripts/bench_gemma3.sh extra   # a second call for what `all` leaves out: GPU 0 jaxvlm 27B NF4 batch 8
#                                        # and 27B NF4 decode; GPU 1 Unsloth 4B bf16 + NF4 at batch 8
#
# Geometries: scripts/bench_common.py (gemma3-4b, gemma3-27b; random weights). Workload: one 896x896 image (256
# tokens in "\n\n<boi>" .. "<eoi>\n\n") + 256 text tokens per sample (seq 516), labels on the text only.
# Needs .peers/ (scripts/fetch_peers.sh; carried with the call) for bitsandbytes and Unsloth.
# TINY=1 gives every command the scripts' hidden --tiny (the family's tiny config), to check this script on a CPU.
#
# Rough costs behind the limits (from the Qwen3-VL runs of scripts/bench_qwen3.sh, scaled): a jaxvlm training
# configuration 45-60 s at 4B (its own process: model draw, compile, 13 steps), 100-150 s at 27B NF4; jaxvlm
# decode 50-65 s per weights; transformers + PEFT 60-80 s per --quant (NF4 also saves the 8.6 GB random model
# once, which Unsloth then reuses: same directory); Unsloth 100-250 s per configuration (its first one writes its
# compiled-module cache); transformers decode ~60 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/.peers/bnb:${PYTHONPATH:-} PYTHONUNBUFFERED=1
END=$(( $(date +%s) + ${BUDGET_S:-560} ))
G4=gemma3-4b G27=gemma3-27b
# The random 4B model, saved once by bench_hf_peft's NF4 run into Unsloth's default directory for the geometry
# (bench_unsloth.model_dir), where Unsloth's first run adds only its offline processor.
HF_DIR=/tmp/unsloth_bench_$G4${TINY:+_tiny}
T=${TINY:+--tiny}
UNSLOTH="env PYTHONPATH=$PWD/.peers/unsloth:$PYTHONPATH python3 scripts/bench_unsloth.py"

source scripts/bench_lib.sh  # json, limit, run

case "${1:-}" in
  all)
    (export CUDA_VISIBLE_DEVICES=0
     # reserve: 27B batch 4 (170) + decode (130)
     run gpu0 "$(limit 250 300)" python3 -m scripts.bench_train --geometry $G4 $T --batch 4 8 --weights bf16 nf4 \
       --remat full
     run gpu0 "$(limit 170 130)" python3 -m scripts.bench_train --geometry $G27 $T --batch 4 --weights nf4 --remat full
     run gpu0 "$(limit 140 0)" env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 scripts/bench_generate.py \
       --geometry $G4 $T --batch 1 --new 128 --quant 16bit nf4
     # 27B batch 8 only with room for its draw, compile and 13 steps
     if (( $(limit 300 0) >= 120 )); then
       run gpu0 "$(limit 300 0)" python3 -m scripts.bench_train --geometry $G27 $T --batch 8 --weights nf4 --remat full
     else
       printf '\n== %s skipped 27B NF4 batch 8: %ss left\n' "$(date -u +%FT%TZ)" "$(limit 300 0)" >> "$OUT/gpu0.log"
     fi) &
    (export CUDA_VISIBLE_DEVICES=1
     # reserve: Unsloth NF4 (150) + transformers decode (90)
     run gpu1 "$(limit 230 240)" python3 scripts/bench_hf_peft.py --geometry $G4 $T --batch 4 8 --quant bf16 nf4 \
       --dir "$HF_DIR"
     # Each Unsloth config's own --timeout ends before the command's, so that a slow one still leaves its line.
     L=$(limit 150 90); run gpu1 "$L" $UNSLOTH --geometry $G4 $T --batch 4 --q4 1 --timeout $(( L - 15 ))
     L=$(limit 300 90); run gpu1 "$L" $UNSLOTH --geometry $G4 $T --batch 4 --q4 0 --timeout $(( L - 15 ))
     run gpu1 "$(limit 90 0)" env JAX_PLATFORMS=cpu python3 -m scripts.bench_generate --one hf --geometry $G4 $T \
       --batch 1 --new 128) &
    wait ;;
  extra)
    (export CUDA_VISIBLE_DEVICES=0
     run extra-gpu0 "$(limit 300 150)" python3 -m scripts.bench_train --geometry $G27 $T --batch 8 --weights nf4 \
       --remat full
     run extra-gpu0 "$(limit 150 0)" env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 scripts/bench_generate.py \
       --geometry $G27 $T --batch 1 --new 128 --quant nf4) &
    (export CUDA_VISIBLE_DEVICES=1
     # a fresh machine: the random model is saved first (~60 s), then each config gets half of what is left
     L=$(limit 555 0); run extra-gpu1 "$L" $UNSLOTH --geometry $G4 $T --batch 8 --q4 1 0 --timeout $(( (L - 60) / 2 ))) &
    wait ;;
  *) echo "usage: bash scripts/bench_gemma3.sh all|extra" >&2; exit 2 ;;
esac

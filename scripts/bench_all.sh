#!/usr/bin/env bash
# The head-to-head training benchmark of docs/BENCHMARKS.md, on the lent GPU, in groups that each fit
# one device call. Results: one JSON line per configuration, appended to ${OUT:-.}/results.jsonl.
#
#   bash scripts/bench_all.sh jaxvlm|hf|unsloth|long|7b
#
# hf runs ../shared/bench/hf_peft_step.py (copied to .shared_bench/, carried with the call) and needs
# bitsandbytes for its NF4 rows: .peers/bnb (an unpacked wheel, carried). unsloth runs
# scripts/bench_unsloth.py with .peers/unsloth.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
RES=$OUT/results.jsonl
export PYTHONPATH=$PWD:$PWD/.peers/bnb:${PYTHONPATH:-} PYTHONUNBUFFERED=1
json() { grep -o '{".*' | tee -a "$RES"; }
hf() {  # B TXT Q4
  B=$1 TXT=$2 Q4=$3 python3 .shared_bench/hf_peft_step.py 2>"$OUT/hf_err_$1_$2_$3.txt" \
    | python3 -c "import json,sys; [print(json.dumps({'bench': 'train', **json.loads(l)})) for l in sys.stdin if l.startswith('{')]" | json
  tail -3 "$OUT/hf_err_$1_$2_$3.txt"
}
case "${1:-}" in
  jaxvlm) python3 -m scripts.bench_train --batch 4 8 --weights bf16 nf4 --remat ${REMAT:-full} 2>&1 | json ;;
  hf) hf 4 256 0; hf 8 256 0; hf 4 256 1; hf 8 256 1 ;;
  unsloth) PYTHONPATH=$PWD/.peers/unsloth:$PYTHONPATH python3 scripts/bench_unsloth.py --batch 4 8 --q4 0 1 2>&1 | json ;;
  long) python3 -m scripts.bench_train --batch 1 --text 7934 --weights bf16 nf4 --remat ${REMAT:-full} 2>&1 | json
        hf 1 7934 0; hf 1 7934 1 ;;
  7b) python3 -m scripts.bench_train --geometry qwen2-vl-7b --batch 4 8 --weights nf4 --remat ${REMAT:-full} 2>&1 | json ;;
  *) echo "usage: bash scripts/bench_all.sh jaxvlm|hf|unsloth|long|7b" >&2; exit 2 ;;
esac

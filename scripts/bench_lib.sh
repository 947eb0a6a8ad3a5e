# Helpers of the per-family benchmark scripts (bench_gemma3.sh, bench_mllama.sh), sourced after they set OUT and
# END (the deadline, in epoch seconds).
json() { grep --line-buffered -o '{".*' >> "$OUT/$1.jsonl"; }
limit() {  # CAP RESERVE: at most CAP seconds, and none of the last RESERVE seconds before the deadline
  local left=$(( END - $(date +%s) - $2 ))
  echo $(( left < $1 ? left : $1 ))
}
run() {  # GROUP SECONDS COMMAND...: the command's JSON lines to GROUP.jsonl, the rest of its output to GROUP.log;
         # skipped with under 30 s (timeout 0 would mean no limit at all)
  local group=$1 limit=$2; shift 2
  # (each header on a line of its own: a killed command's progress bar leaves its last line open)
  if (( limit < 30 )); then
    printf '\n== %s skipped, %ss left: %s\n' "$(date -u +%FT%TZ)" "$limit" "$*" >> "$OUT/$group.log"
    return
  fi
  printf '\n== %s limit %ss: %s\n' "$(date -u +%FT%TZ)" "$limit" "$*" >> "$OUT/$group.log"
  # timeout signals the command's whole process group (the scripts' per-configuration children too), then KILL
  # 5 s later if anything is still there (those 5 s come out of the next command's reserve, or the deadline's
  # slack: the script ends by BUDGET_S + 5 s).
  timeout -k 5 "$limit" "$@" 2>>"$OUT/$group.log" | tee -a "$OUT/$group.log" | json "$group"
}

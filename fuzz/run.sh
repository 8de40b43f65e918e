#!/usr/bin/env bash
# fuzz/run.sh [SECONDS] [TARGET...] -- run each fuzz target (default: all) for SECONDS (default 30),
# starting from the committed seeds (seeds/TARGET) plus whatever earlier runs left in corpus/TARGET.
# A crash stops the script with the input in artifacts/TARGET/ and libFuzzer's report printed.
# Needs cargo-fuzz; works on the stable toolchain through RUSTC_BOOTSTRAP=1 (it needs -Z flags).
#
#   fuzz/run.sh                 # what .ci/run does: every target, 30 s each
#   fuzz/run.sh 3600 chunked    # a long run of one target
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
shift || true
export RUSTC_BOOTSTRAP=1
# Not CARGO_TARGET_DIR itself: the sanitizer flags would invalidate the main build's artifacts.
target_dir=${CARGO_TARGET_DIR:-$PWD/target}/fuzz
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build --target-dir "$target_dir"
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=logs/$t.log
  if ! cargo fuzz run --target-dir "$target_dir" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $t FAILED (input in fuzz/artifacts/$t/, log in fuzz/$log)" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$done_line")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$done_line")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$done_line")
  echo "fuzz: $t: ${runs:-?} runs in ${seconds}s, cov ${cov:-?} ft ${ft:-?} corpus ${corp:-?}, no crash"
done

#!/usr/bin/env bash
# run.sh [LIBRARY...] -- build this benchmark once per TLS library, then run them in turn, pinned to
# one CPU, ROUNDS times over (A B C .. A B C ..: the machine's drift hits each alike); the table in
# the top-level README.md (Benchmarks: the TLS library) shows the medians over those runs.
#   benches/tls-libraries/run.sh                  # all: debian-openssl openssl-vendored aws-lc boringssl rustls-ring rustls-aws-lc
#   ROUNDS=1 benches/tls-libraries/run.sh debian-openssl aws-lc
# Needs cmake, and libclang for the ones built with bindgen: apt-get install cmake libclang1-14 libclang-common-14-dev clang-14
set -euo pipefail
cd "$(dirname "$0")"
CPU=${CPU:-1}; ROUNDS=${ROUNDS:-3}
libs=("$@")
[ ${#libs[@]} -gt 0 ] || libs=(debian-openssl openssl-vendored aws-lc boringssl rustls-ring rustls-aws-lc)
target=${CARGO_TARGET_DIR:-/var/cache/cutover-target}/tls-libraries
out=${OUT:-/tmp/tls-libraries-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
for lib in "${libs[@]}"; do
  env=(); features=
  case $lib in
    debian-openssl) features=openssl-lib; env=(OPENSSL_NO_VENDOR=1) ;;
    openssl-vendored) features=vendored; env=(OPENSSL_NO_VENDOR=0) ;;
    aws-lc) features=aws-lc ;;
    boringssl) features=boring-lib ;;
    rustls-ring) features=rustls-ring ;;
    rustls-aws-lc) features=rustls-aws-lc ;;
    *) echo "unknown library $lib" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  env "${env[@]}" CARGO_TARGET_DIR="$target/$lib" cargo build --release --quiet --features "$features" 2>/dev/null
  echo "== $lib: built in $(( $(date +%s) - start )) s (incremental if built before)" | tee -a "$out/build.txt"
done
for r in $(seq 1 "$ROUNDS"); do
  for lib in "${libs[@]}"; do
    echo "== round $r: $lib"
    taskset -c "$CPU" "$target/$lib/release/tls-libraries" | tee "$out/$lib-r$r.txt"
  done
done
echo "raw: $out"

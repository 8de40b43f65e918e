#!/usr/bin/env bash
# profile.sh NAME=BINARY... -- instructions and syscalls per request, for each cutover binary.
#
#   benches/compare/profile.sh new=$CARGO_TARGET_DIR/release/cutover old=/tmp/cutover-old
#   PATHS="/ruok /obj4k" SECONDS_RUN=10 CONNS=4 benches/compare/profile.sh ...
#   TLS=1 benches/compare/profile.sh ...     # through the TLS listener
#   POST=1 benches/compare/profile.sh ...    # POST 4 KiB
#   RATE=300 CONNS=64 benches/compare/profile.sh ...   # a paced load (matrix.sh's RATE=): the cost of a
#                                            # request when the process sleeps between requests
#   benches/compare/profile.sh nginx=nginx cutover=...   # nginx doing the same job (its bench config,
#                                            # one worker, no master process), as the reference
#
# Instruction counts (valgrind's callgrind) do not depend on how fast the machine is today, so two
# builds can be compared on different days; syscalls per request come from `strace -c -f`. For each
# binary and path: start it on the bench config (cutover.sh writes it: run that once first), warm up
# with wrk -c$CONNS, zero the counters, load with wrk -c$CONNS for $SECONDS_RUN s, dump the counters
# (before the process exits), and divide by the requests wrk completed. Needs valgrind, strace, wrk
# and the bench origin (setup.sh). The dumps stay in the raw folder for callgrind_annotate.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
PATHS=${PATHS:-"/ruok /obj4k"}
SECONDS_RUN=${SECONDS_RUN:-10}
CONNS=${CONNS:-4}
# CACHE_SIM=yes: also simulated cache misses per request (callgrind's cache model: slower)
CACHE_SIM=${CACHE_SIM:-no}
# TLS=1: through the TLS listener (matrix.sh's config has one on 18184); POST=1: POST 4 KiB to /upload
TLS=${TLS:-0}; POST=${POST:-0}
CONFIG=${CONFIG:-$CONF_DIR/matrix-cutover.yaml}
if [ "$TLS" = 1 ]; then PORT=$MATRIX_TLS_PORT; SCHEME=https; else PORT=${CUTOVER_PORT:-$MATRIX_PORT}; SCHEME=http; fi
[ -f "$CONFIG" ] || die "run matrix.sh once first (it writes $CONFIG)"
RATE=${RATE:-}
WRK_SCRIPT=()
LUA=$BENCH_DIR/tmp/profile.lua
mkdir -p "$BENCH_DIR/tmp"
: >"$LUA"
if [ "$POST" = 1 ]; then
  PATHS=/upload
  printf 'wrk.method = "POST"\nwrk.body = string.rep("p", 4096)\n' >>"$LUA"
fi
[ -n "$RATE" ] && pace_lua "$CONNS" "$RATE" >>"$LUA"
[ -s "$LUA" ] && WRK_SCRIPT=(-s "$LUA")
command -v valgrind >/dev/null && command -v strace >/dev/null || die "needs valgrind and strace"
[ $# -gt 0 ] || die "usage: profile.sh NAME=BINARY..."
OUT=$BENCH_DIR/profile/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
trap 'stop_all' EXIT
stop_all
start_origin bench

load() { # SECONDS PATH -> prints completed requests
  taskset -c "$ORIGIN_CPU" wrk -t1 -c"$CONNS" -d"$1s" "${WRK_SCRIPT[@]}" -H "Host: $FRONT_HOST" "$SCHEME://127.0.0.1:$PORT$2" \
    | awk '/requests in/ { print $1 }'
}

# nginx as the reference: its bench config with the worker as the only process (valgrind and strace
# follow one process), on its own ports.
if [ "$TLS" = 1 ]; then NGINX_AT=$NGINX_TLS_PORT; else NGINX_AT=$NGINX_PORT; fi
sed 's/^master_process on;/master_process off;/' "$CONF_DIR/nginx-proxy.conf" >"$CONF_DIR/nginx-profile.conf"
command_for() { # NAME BINARY -> sets CMD and PORT
  if [ "$2" = nginx ]; then
    CMD=(nginx -c "$CONF_DIR/nginx-profile.conf"); PORT=$NGINX_AT
  else
    CMD=("$2" run --config "$CONFIG"); PORT=$CUTOVER_AT
  fi
}
CUTOVER_AT=$PORT

printf '%-10s %-7s %12s %14s %12s %10s\n' name path requests "instr/request" syscalls "sys/request"
for arg in "$@"; do
  name=${arg%%=*}; bin=${arg#*=}
  command_for "$name" "$bin"
  for path in $PATHS; do
    cg=$OUT/$name-${path//\//}.callgrind
    taskset -c "$PROXY_CPU" valgrind --tool=callgrind --cache-sim="$CACHE_SIM" --callgrind-out-file="$cg" \
      "${CMD[@]}" >"$OUT/$name.valgrind.log" 2>&1 &
    pid=$!
    wait_port "$PORT" 300 || die "$name did not start under valgrind"
    # Warm up until the connections are made: under valgrind a TLS handshake takes long enough that
    # a first 2 s run ends with most of them (client and upstream) still in flight, and the
    # upstream handshakes would land in the measured window.
    for _ in 1 2 3 4 5; do [ "$(load 2 "$path")" -ge $((CONNS * 10)) ] && break; done
    callgrind_control -z "$pid" >/dev/null
    reqs=$(load "$SECONDS_RUN" "$path")
    # Dump now: what the process does at exit (freeing the CA stores, the
    # runtimes) is not per-request work.
    callgrind_control -d "$pid" >/dev/null
    kill -INT "$pid"; wait "$pid" 2>/dev/null || true
    ir=$(callgrind_annotate "$cg.1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
    if [ "$CACHE_SIM" = yes ]; then
      # Simulated misses per request: the last-level cache's data read and write misses.
      callgrind_annotate "$cg.1" 2>/dev/null | awk -v r="$reqs" -v n="$name" -v p="$path" '
        /^Events shown:/ { for (i = 3; i <= NF; i++) ev[i - 2] = $i }
        /PROGRAM TOTALS/ { for (i = 1; i in ev; i++) { v = $(2 * i - 1); gsub(",", "", v); if (ev[i] ~ /^(D1mr|D1mw|DLmr|DLmw)$/) printf "%s %s %s per request: %.0f\n", n, p, ev[i], v / r } }' >&2
    fi

    st=$OUT/$name-${path//\//}.strace
    taskset -c "$PROXY_CPU" "${CMD[@]}" >>"$OUT/$name.log" 2>&1 &
    pid=$!
    wait_port "$PORT" || die "$name did not start"
    load 2 "$path" >/dev/null
    strace -c -f -q -o "$st" -p "$pid" &
    spid=$!
    sleep 0.5
    sreqs=$(load "$SECONDS_RUN" "$path")
    kill -INT "$spid"; wait "$spid" 2>/dev/null || true
    kill -INT "$pid"; wait "$pid" 2>/dev/null || true
    calls=$(awk '$NF == "total" { print $4; exit }' "$st")
    awk -v n="$name" -v p="$path" -v r="$reqs" -v ir="$ir" -v c="$calls" -v sr="$sreqs" 'BEGIN {
      printf "%-10s %-7s %12d %14.0f %12d %10.2f\n", n, p, r, ir / r, c, c / sr }'
  done
done | tee "$OUT/summary.txt"
echo "raw: $OUT"

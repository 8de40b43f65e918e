#!/usr/bin/env bash
# timeprofile.sh -- where the CPU *time* of a request goes (not its instructions): a sampling
# profile (perf record -e cpu-clock) of nginx and of cutover serving the same load, one at a time.
#
#   sudo benches/compare/timeprofile.sh                      # TLS in, /obj4k, nginx then cutover
#   SCHEME=http URL_PATH=/ruok benches/compare/timeprofile.sh
#   TARGETS=cutover CALL_GRAPH=dwarf,16384 benches/compare/timeprofile.sh   # callers of a hot spot
#   RATE=12000 SCHEME=http benches/compare/timeprofile.sh   # below saturation (matrix.sh's pacing)
#
# callgrind (profile.sh) counts instructions; it cannot see what an instruction costs: a cache
# miss, a lock-prefixed instruction, the kernel's side of a syscall. This machine kind has no PMU
# (perf stat counts nothing), but perf's software clock samples where each process spends its
# time, kernel and user, which is what "requests per CPU-second" measures. Needs perf (linux-perf),
# wrk, the bench origin (setup.sh) and matrix.sh's config (run matrix.sh once first). Prints, per
# target, the share by object (kernel, libcrypto, the binary, libc) and the hottest symbols; the
# recordings stay in $BENCH_DIR/timeprofile for `perf report -i`. "µs of CPU per request" is the
# sample count over the sampling rate and the requests of the window: perf's own cost is in it (more
# for cutover's deeper stacks and several threads), and one run after another differs by ~10% on
# this machine kind; matrix.sh's interleaved, unprofiled figures are the ones to compare proxies by.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
BIN=${BIN:-${CARGO_TARGET_DIR:-/var/cache/cutover-target}/dist/cutover}
SCHEME=${SCHEME:-https}; URL_PATH=${URL_PATH:-/obj4k}; TARGETS=${TARGETS:-"nginx cutover"}
SECONDS_RUN=${SECONDS_RUN:-5}; CALL_GRAPH=${CALL_GRAPH:-fp}; TOP=${TOP:-30}; RATE=${RATE:-}; HZ_SAMPLE=4999
command -v perf >/dev/null || die "needs perf (apt-get install linux-perf)"
[ -f "$CONF_DIR/matrix-cutover.yaml" ] || die "run matrix.sh once first (it writes the config)"
OUT=$BENCH_DIR/timeprofile/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
PACE=()
if [ -n "$RATE" ]; then pace_lua 64 "$RATE" >"$OUT/pace.lua"; PACE=(-s "$OUT/pace.lua"); fi
CPID=
cleanup() { [ -n "$CPID" ] && kill -INT "$CPID" 2>/dev/null && wait "$CPID" 2>/dev/null; stop_all; }
trap cleanup EXIT
stop_all
start_origin bench
start_peer nginx
taskset -c "$PROXY_CPU" env RUST_LOG=warn "$BIN" run --config "$CONF_DIR/matrix-cutover.yaml" >"$OUT/cutover.log" 2>&1 &
CPID=$!
wait_port "$MATRIX_TLS_PORT" || die "cutover did not start; see $OUT/cutover.log"
pin_origin
if [ "$SCHEME" = https ]; then NGINX_AT=$NGINX_TLS_PORT; CUTOVER_AT=$MATRIX_TLS_PORT; else NGINX_AT=$NGINX_PORT; CUTOVER_AT=$MATRIX_PORT; fi
for t in $TARGETS; do
  if [ "$t" = nginx ]; then port=$NGINX_AT; pid=$(pgrep -P "$(cat "$PID_DIR/nginx.pid")" | head -1); else port=$CUTOVER_AT; pid=$CPID; fi
  url="$SCHEME://127.0.0.1:$port$URL_PATH"
  taskset -c "$ORIGIN_CPU" wrk -t1 -c64 -d3s "${PACE[@]}" -H "Host: $FRONT_HOST" "$url" >/dev/null
  taskset -c "$ORIGIN_CPU" wrk -t1 -c64 -d$((SECONDS_RUN + 2))s "${PACE[@]}" -H "Host: $FRONT_HOST" "$url" >"$OUT/$t.wrk" &
  w=$!
  sleep 1
  perf record -q -e cpu-clock -F "$HZ_SAMPLE" --call-graph "$CALL_GRAPH" -p "$pid" -o "$OUT/$t.data" -- sleep "$SECONDS_RUN" 2>"$OUT/$t.perf.log"
  wait "$w"
  rps=$(awk '/Requests\/sec/ { print $2 }' "$OUT/$t.wrk")
  samples=$(perf script -i "$OUT/$t.data" -F tid 2>/dev/null | wc -l)
  echo "== $t: $url${RATE:+ at $RATE req/s offered}, $rps req/s (under perf), $samples samples:" \
    "$(awk -v s="$samples" -v r="$rps" -v d="$SECONDS_RUN" -v hz="$HZ_SAMPLE" 'BEGIN { printf "%.1f", s / hz * 1e6 / (r * d) }') µs of CPU per request"
  perf report -i "$OUT/$t.data" --no-children --sort dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -6
  perf report -i "$OUT/$t.data" --no-children --sort dso,sym -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -"$TOP"
done
echo "recordings: $OUT"

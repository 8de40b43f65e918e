#!/usr/bin/env bash
# matrix.sh -- every way a user deploys cutover, against nginx and HAProxy doing the same job, in
# one interleaved run, printed as one table.
#
#   sudo benches/compare/matrix.sh                         # setup if needed, build, run, table
#   ROUNDS=5 DURATION=10 benches/compare/matrix.sh         # more rounds (medians)
#   SCENARIOS="tls tls-close" benches/compare/matrix.sh    # a subset
#   BASE_BIN=/tmp/cutover-old benches/compare/matrix.sh    # also that binary, as cutover-base
#   PROFILE=release benches/compare/matrix.sh              # measure the thin-LTO `release` build instead of `dist`
#   RATE=8000 SCENARIOS="plain tls" benches/compare/matrix.sh  # latency at a fixed offered rate (below)
#
# Scenarios (each row: one target, one path, wrk -t1 -c$CONNS, target pinned to CPU $PROXY_CPU,
# wrk + origin on CPU $ORIGIN_CPU, the same job as run.sh: Host rewritten, TLS to the origin with
# SNI and a verified certificate, upstream keep-alive, one worker, access logs off):
#   plain      plain HTTP in (an ALB's HTTP targets), keep-alive clients, GET /ruok and /obj4k
#   tls        TLS in (an ALB's HTTPS targets), keep-alive clients, GET /ruok and /obj4k
#   close      plain in, a new connection per request (`Connection: close`), GET /ruok
#   tls-close  TLS in, a new connection and handshake per request, GET /ruok (wrk offers the
#              previous session back, so these are mostly resumed handshakes)
#   post4k     plain in, keep-alive, POST of a 4 KiB body to /upload (the origin reads and drops it)
#   chunked4k  the same POST with `Transfer-Encoding: chunked` (one 4 KiB chunk), as a client that
#              streams an upload sends it
#   4addr      plain in, cutover with the origin's name on 4 addresses (hosts file) vs 1; no peers
#
# Order: for round: for scenario: for path: for target, each round starting at another target (drift
# hits everyone alike); medians over rounds, and the same-round ratio to nginx (x nginx) and to
# HAProxy (x haproxy) per row. This machine kind's speed swings up to 2x within a minute: many short
# rounds and same-round ratios are what hold; single rows do not.
# MODE=concurrent (default) runs a scenario's targets at the same time, all pinned to CPU $PROXY_CPU,
# one wrk each: each gets a share of that CPU under the same conditions, and requests per CPU-second
# compare them even while the machine's speed changes (p99 then includes waiting for the CPU the
# others hold). MODE=sequential measures one target at a time, the whole CPU each (run.sh's way).
# RATE=N offers each target N requests per second instead of as many as it can take (each of the
# $CONNS connections waits a random, exponentially distributed time between its answer and its next
# request, mean $CONNS/N s; the rate reached is printed): an ALB's load, not a saturating one. It
# implies MODE=sequential, so a p99 is the target's own latency, not a wait for a CPU another target
# holds; below saturation the machine's speed swings change little but the CPU per request.
# Env: ROUNDS=5 DURATION=6 WARMUP=2 CONNS=64 MODE=concurrent SCENARIOS="plain tls close tls-close post4k chunked4k 4addr"
#      BASE_BIN= PROFILE=dist PEERS="nginx haproxy" RATE=
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
. "$HERE/common.sh"

ROUNDS=${ROUNDS:-5}; DURATION=${DURATION:-6}; WARMUP=${WARMUP:-2}; CONNS=${CONNS:-64}
SCENARIOS=${SCENARIOS:-"plain tls close tls-close post4k chunked4k 4addr"}
PEERS=${PEERS:-"nginx haproxy"}
PROFILE=${PROFILE:-dist}
MODE=${MODE:-concurrent}
RATE=${RATE:-}
[ -n "$RATE" ] && MODE=sequential
BASE_BIN=${BASE_BIN:-}
CUTOVER_PORT=$MATRIX_PORT; CUTOVER_TLS_PORT=$MATRIX_TLS_PORT; CUTOVER_ADMIN=18094
BASE_PORT=18085; BASE_TLS_PORT=18185
FOUR_PORT=18086
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/cutover-target}

[ "$(id -u)" = 0 ] || die "run as root (taskset, binding)"
# (Re)write the configs when they predate the TLS fronts; apt only when a program is missing.
if ! grep -qs "$HAPROXY_TLS_PORT" "$CONF_DIR/haproxy.cfg" || ! grep -qs "$NGINX_TLS_PORT" "$CONF_DIR/nginx-proxy.conf"; then
  skip=1; for c in nginx haproxy wrk; do command -v $c >/dev/null || skip=0; done
  SKIP_APT=$skip "$HERE/setup.sh" || die "setup failed"
fi
(cd "$REPO" && cargo build --profile "$PROFILE" --locked) || die "build failed"
BIN=$CARGO_TARGET_DIR/$PROFILE/cutover

# cutover's configs: one process with a plain and a TLS listener (the bench CA's cdn.example.test).
cutover_yaml() { # PLAIN-PORT TLS-PORT ADMIN-PORT NAME ORIGIN-ADDRESS
  local tls_listener=""
  [ -n "$2" ] && tls_listener="  - address: 127.0.0.1:$2
    tls: { cert: $CERT_DIR/$FRONT_HOST.crt, key: $CERT_DIR/$FRONT_HOST.key }"
  cat <<YAML
phase: bench
listeners:
  - address: 127.0.0.1:$1
$tls_listener
admin:
  address: 127.0.0.1:$3
server:
  threads: 1
  grace_period: 1s
  graceful_shutdown_timeout: 1s
  upgrade_sock: $BENCH_DIR/tmp/$4-upgrade.sock
  pid_file: $BENCH_DIR/tmp/$4.pid
  upstream_keepalive_pool_size: 1024
  work_stealing: false
access_log: off
routes:
  - name: cdn
    hosts: [$FRONT_HOST]
    sticky: none
    upstreams:
      - name: origin
        address: $5
        host_header: $UP_HOST
        sni: $UP_HOST
        ca_file: $CERT_DIR/ca.crt
        timeouts: { idle: 300s }
YAML
}
printf '127.0.0.%s origin.bench.test\n' 1 2 3 4 >"$CONF_DIR/hosts-4addr"
cutover_yaml $CUTOVER_PORT $CUTOVER_TLS_PORT $CUTOVER_ADMIN cutover "127.0.0.1:$ORIGIN_PORT" >"$CONF_DIR/matrix-cutover.yaml"
cutover_yaml $BASE_PORT $BASE_TLS_PORT $((CUTOVER_ADMIN + 1)) cutover-base "127.0.0.1:$ORIGIN_PORT" >"$CONF_DIR/matrix-cutover-base.yaml"
cutover_yaml $FOUR_PORT "" $((CUTOVER_ADMIN + 2)) cutover-4addr "origin.bench.test:$ORIGIN_PORT" >"$CONF_DIR/matrix-cutover-4addr.yaml"
for c in matrix-cutover matrix-cutover-4addr; do "$BIN" check --config "$CONF_DIR/$c.yaml" >/dev/null || die "$c.yaml"; done

CHILDREN=()
start_cutover() { # NAME BINARY CONFIG PORT [hosts file]
  taskset -c "$PROXY_CPU" env RUST_LOG=warn ${5:+CUTOVER_HOSTS_FILE=$5} "$2" run --config "$CONF_DIR/$3.yaml" \
    >>"$LOG_DIR/$1.out" 2>&1 &
  CHILDREN+=($!)
  wait_port "$4" || die "$1 did not start; see $LOG_DIR/$1.out"
}
cleanup() { for pid in "${CHILDREN[@]}"; do kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done; stop_all; }
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$LOG_DIR"
stop_all
start_origin bench
for p in $PEERS; do start_peer "$p"; done
start_cutover cutover "$BIN" matrix-cutover $CUTOVER_TLS_PORT
[ -n "$BASE_BIN" ] && start_cutover cutover-base "$BASE_BIN" matrix-cutover-base $BASE_TLS_PORT
[[ " $SCENARIOS " == *" 4addr "* ]] && start_cutover cutover-4addr "$BIN" matrix-cutover-4addr $FOUR_PORT "$CONF_DIR/hosts-4addr"
pin_origin

# Targets of a scenario: "NAME URL-BASE" lines.
targets() {
  local s=$1 tls=0 p
  case $s in tls|tls-close) tls=1 ;; esac
  if [ "$s" = 4addr ]; then
    echo "cutover http://127.0.0.1:$CUTOVER_PORT"; echo "cutover-4addr http://127.0.0.1:$FOUR_PORT"; return
  fi
  for p in $PEERS; do
    case $p:$tls in
      nginx:0) echo "nginx http://127.0.0.1:$NGINX_PORT" ;; nginx:1) echo "nginx https://127.0.0.1:$NGINX_TLS_PORT" ;;
      haproxy:0) echo "haproxy http://127.0.0.1:$HAPROXY_PORT" ;; haproxy:1) echo "haproxy https://127.0.0.1:$HAPROXY_TLS_PORT" ;;
    esac
  done
  if [ $tls = 1 ]; then echo "cutover https://127.0.0.1:$CUTOVER_TLS_PORT"; else echo "cutover http://127.0.0.1:$CUTOVER_PORT"; fi
  if [ -n "$BASE_BIN" ]; then
    if [ $tls = 1 ]; then echo "cutover-base https://127.0.0.1:$BASE_TLS_PORT"; else echo "cutover-base http://127.0.0.1:$BASE_PORT"; fi
  fi
}
paths() { case $1 in plain|tls|4addr) echo "/ruok /obj4k" ;; post4k|chunked4k) echo /upload ;; *) echo /ruok ;; esac; }
# wrk's extra arguments and script per scenario
REPORT_LUA=$BENCH_DIR/tmp/wrk-report.lua POST_LUA=$BENCH_DIR/tmp/wrk-post4k.lua CHUNKED_LUA=$BENCH_DIR/tmp/wrk-chunked4k.lua
mkdir -p "$BENCH_DIR/tmp"
{ cat "$HERE/wrk-report.lua"; [ -n "$RATE" ] && pace_lua "$CONNS" "$RATE"; } >"$REPORT_LUA"
{ echo 'wrk.method = "POST"'; echo 'wrk.body = string.rep("p", 4096)'
  echo 'wrk.headers["Content-Type"] = "application/octet-stream"'; cat "$REPORT_LUA"; } >"$POST_LUA"
# wrk.format adds Content-Length to any body it is given: the chunked body is appended to a head
# formatted without one, once, and every request sends that string.
{ echo 'wrk.method = "POST"'; echo 'wrk.headers["Content-Type"] = "application/octet-stream"'
  echo 'wrk.headers["Transfer-Encoding"] = "chunked"'
  echo 'local chunked_req'
  echo 'init = function(args) chunked_req = wrk.format(nil, nil, nil, nil) .. "1000\r\n" .. string.rep("p", 4096) .. "\r\n0\r\n\r\n" end'
  echo 'request = function() return chunked_req end'; cat "$REPORT_LUA"; } >"$CHUNKED_LUA"
wrk_args() {
  case $1 in
    close|tls-close) echo "-H Connection:close -s $REPORT_LUA" ;;
    post4k) echo "-s $POST_LUA" ;;
    chunked4k) echo "-s $CHUNKED_LUA" ;;
    *) echo "-s $REPORT_LUA" ;;
  esac
}

# Every target answers every path of its scenarios before anything is measured.
for s in $SCENARIOS; do
  while read -r n base; do
    for path in $(paths "$s"); do
      body=()
      case $s in
        post4k) body=(--data-binary "@$WWW_DIR/obj4k") ;;
        chunked4k) body=(-H "Transfer-Encoding: chunked" --data-binary "@$WWW_DIR/obj4k") ;;
      esac
      c=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 5 "${body[@]}" -H "Host: $FRONT_HOST" "$base$path")
      [ "$c" = 200 ] || die "$n ($s): $base$path answered $c"
    done
  done < <(targets "$s")
done
log "every target answers; measuring: scenarios [$SCENARIOS], $ROUNDS rounds of ${DURATION}s, wrk -t1 -c$CONNS"

RES=$BENCH_DIR/results/matrix-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RES/raw"
CSV=$RES/runs.csv
echo "round,scenario,target,path,rps,p50_us,p99_us,requests,errors,cpu_s,req_per_cpu_s,up_conns,rss_kb,p999_us,csw_per_req,user_us_per_req,sys_us_per_req" >"$CSV"
HZ=$(getconf CLK_TCK)
origin_accepts() { curl -s --max-time 2 "http://127.0.0.1:$STATUS_PORT/status" | awk 'NR == 3 { print $1 }'; }

# One row per target: wrk's figures, the target's CPU time during the run, the origin's new
# connections (sequential mode only: concurrent targets share the origin) and the RSS after it.
declare -A T0 A0 C0 PIDS U0 S0
begin() { # NAME URL
  local port=${2##*:}; port=${port%%/*}
  PIDS[$1]=$(pids_on_port "$port"); T0[$1]=$(cpu_ticks ${PIDS[$1]}); read -r U0[$1] S0[$1] < <(cpu_ticks_split ${PIDS[$1]}); C0[$1]=$(ctx_switches ${PIDS[$1]})
  A0[$1]=$(origin_accepts)
}
finish() { # ROUND SCENARIO NAME URL RAW
  local r=$1 s=$2 n=$3 url=$4 raw=$5 line t1 c1 up u1 s1
  t1=$(cpu_ticks ${PIDS[$n]}); read -r u1 s1 < <(cpu_ticks_split ${PIDS[$n]}); c1=$(ctx_switches ${PIDS[$n]})
  if [ "$MODE" = sequential ]; then up=$(( $(origin_accepts) - A0[$n] - 1 )); else up=-; fi
  line=$(grep '^WRKSTAT' "$raw") || { log "wrk failed: $n $s $url: $(tail -2 "$raw")"; return; }
  gv() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$line"; }
  awk -v r="$r" -v s="$s" -v n="$n" -v path="/${url##*/}" -v reqs="$(gv requests)" -v dur="$(gv duration_us)" \
      -v p50="$(gv p50_us)" -v p99="$(gv p99_us)" -v p999="$(gv p999_us)" \
      -v err=$(( $(gv err_status) + $(gv err_connect) + $(gv err_read) + $(gv err_write) + $(gv err_timeout) )) \
      -v ticks=$((t1 - T0[$n])) -v csw=$((c1 - C0[$n])) -v hz="$HZ" -v ut=$((u1 - U0[$n])) -v st=$((s1 - S0[$n])) -v up="$up" -v rss="$(rss_kb ${PIDS[$n]})" 'BEGIN {
    cpu = ticks / hz; printf "%d,%s,%s,%s,%.0f,%d,%d,%d,%d,%.2f,%.0f,%s,%d,%d,%.3f,%.2f,%.2f\n", r, s, n, path, reqs / (dur / 1e6),
      p50, p99, reqs, err, cpu, (cpu > 0) ? reqs / cpu : 0, up, rss, p999, (reqs > 0) ? csw / reqs : 0,
      (reqs > 0) ? ut / hz * 1e6 / reqs : 0, (reqs > 0) ? st / hz * 1e6 / reqs : 0 }' >>"$CSV"
  tail -1 "$CSV" | awk -F, '{ printf "r%s %-9s %-13s %-7s %7s req/s p99 %6.2f ms %7s req/cpu-s err %s\n", $1, $2, $3, $4, $5, $7 / 1000, $11, $9 }' >&2
}
load() { # SECONDS SCENARIO URL OUT [--latency]
  # shellcheck disable=SC2046
  taskset -c "$ORIGIN_CPU" wrk -t1 -c"$CONNS" -d"$1s" ${5:-} $(wrk_args "$2") -H "Host: $FRONT_HOST" "$3" >"$4" 2>&1
}

for r in $(seq 1 "$ROUNDS"); do
  for s in $SCENARIOS; do
    for path in $(paths "$s"); do
      # Each round starts at another target, so no target is always measured first.
      mapfile -t rows < <(targets "$s" | awk -v k="$r" '{ t[NR] = $0 } END { for (i = 0; i < NR; i++) print t[(i + k) % NR + 1] }')
      if [ "$MODE" = concurrent ]; then
        # Every target at once, all on CPU $PROXY_CPU, one wrk each: the machine's speed, whatever
        # it is at that moment, is the same for all of them.
        w=(); for row in "${rows[@]}"; do read -r n base <<<"$row"; load "$WARMUP" "$s" "$base$path" /dev/null & w+=($!); done; wait "${w[@]}"
        w=(); for row in "${rows[@]}"; do read -r n base <<<"$row"; begin "$n" "$base$path"; done
        for row in "${rows[@]}"; do read -r n base <<<"$row"
          load "$DURATION" "$s" "$base$path" "$RES/raw/r$r-$s-$n-${path#/}.txt" --latency & w+=($!); done
        wait "${w[@]}"
        for row in "${rows[@]}"; do read -r n base <<<"$row"; finish "$r" "$s" "$n" "$base$path" "$RES/raw/r$r-$s-$n-${path#/}.txt"; done
      else
        for row in "${rows[@]}"; do read -r n base <<<"$row"
          load "$WARMUP" "$s" "$base$path" /dev/null
          begin "$n" "$base$path"
          load "$DURATION" "$s" "$base$path" "$RES/raw/r$r-$s-$n-${path#/}.txt" --latency
          finish "$r" "$s" "$n" "$base$path" "$RES/raw/r$r-$s-$n-${path#/}.txt"
        done
      fi
    done
  done
done

{
  echo
  echo "== $(date -Is) $(uname -n), $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo) x $(nproc); cutover $PROFILE build"
  echo "== medians over $ROUNDS rounds; wrk -t1 -c$CONNS -d${DURATION}s per target${RATE:+ at $RATE req/s offered}; $MODE: targets on CPU $PROXY_CPU, wrk + origin on CPU $ORIGIN_CPU"
  awk -F, -v scen="$SCENARIOS" '
    function med(list,   a, m, i, j, t) { m = split(list, a, " ")
      for (i = 2; i <= m; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
      return m == 0 ? "" : (m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2) }
    NR > 1 { k = $2 SUBSEP $4 SUBSEP $3; seen[k] = 1; if (!(($2, $4) in order)) { order[$2, $4] = 1; pl[$2] = pl[$2] " " $4 }
      if (!(($2, $3) in tn)) { tn[$2, $3] = 1; tl[$2] = tl[$2] " " $3 }
      for (c = 5; c <= 17; c++) v[k, c] = v[k, c] " " $c; err[k] += $9; rpc[$1, $2, $4, $3] = $11; p99r[$1, $2, $4, $3] = $7; rounds[$1] = 1 }
    END {
      printf "| scenario | path | target | req/s | p50 ms | p99 ms | p99.9 ms | p99 x best other | req per proxy CPU-s | x nginx | x haproxy | context switches per req | CPU µs per req: user / system | upstream conns opened | RSS MiB | errors |\n"
      printf "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
      ns = split(scen, S, " "); split("nginx haproxy cutover", O, " ")
      for (i = 1; i <= ns; i++) { s = S[i]; np = split(pl[s], P, " "); nt = split(tl[s], T, " ")
        for (p = 1; p <= np; p++) for (t = 1; t <= nt; t++) { k = s SUBSEP P[p] SUBSEP T[t]; if (!(k in seen)) continue
          xn = ""; xh = ""
          for (r in rounds) { if (((r, s, P[p], "nginx") in rpc) && rpc[r, s, P[p], "nginx"] > 0) xn = xn " " rpc[r, s, P[p], T[t]] / rpc[r, s, P[p], "nginx"]
                              if (((r, s, P[p], "haproxy") in rpc) && rpc[r, s, P[p], "haproxy"] > 0) xh = xh " " rpc[r, s, P[p], T[t]] / rpc[r, s, P[p], "haproxy"] }
          xp = ""
          for (r in rounds) { b = ""
            for (o = 1; o <= 3; o++) { q = O[o]
              if (q != T[t] && ((r, s, P[p], q) in p99r) && p99r[r, s, P[p], q] > 0 && (b == "" || p99r[r, s, P[p], q] + 0 < b)) b = p99r[r, s, P[p], q] + 0 }
            if (b != "" && ((r, s, P[p], T[t]) in p99r)) xp = xp " " p99r[r, s, P[p], T[t]] / b }
          xn = med(xn); xh = med(xh); xp = med(xp)
          printf "| %s | %s | %s | %.0f | %.2f | %.2f | %.2f | %s | %.0f | %s | %s | %.2f | %.1f / %.1f | %s | %.1f | %d |\n", s, P[p], T[t], med(v[k, 5]),
            med(v[k, 6]) / 1000, med(v[k, 7]) / 1000, med(v[k, 14]) / 1000, xp == "" ? "" : sprintf("%.2f", xp), med(v[k, 11]), xn == "" ? "" : sprintf("%.2f", xn),
            xh == "" ? "" : sprintf("%.2f", xh), med(v[k, 15]), med(v[k, 16]), med(v[k, 17]), v[k, 12] ~ /-/ ? "-" : med(v[k, 12]), med(v[k, 13]) / 1024, err[k] } }
    }' "$CSV"
  echo
  echo "x nginx / x haproxy: median over rounds of the same-round ratio of requests per proxy CPU-second."
  echo "p99 x best other: median over rounds of the same-round ratio of the target's p99 to the lowest p99 of the other targets among nginx, HAProxy and cutover"
  echo "  (nginx's and HAProxy's own figures show this metric's noise floor: the same p99 against the lower of two noisy others reads above 1)."
  echo "RSS: the target's processes after that row's run (nginx/HAProxy: master + worker)."
  echo "context switches: voluntary + involuntary, every thread of the target's processes, during the run."
  echo "CPU µs per req: the target's user and system time (/proc/PID/stat, clock ticks) during the run over its requests."
  echo "raw: $RES"
} | tee "$RES/summary.md"

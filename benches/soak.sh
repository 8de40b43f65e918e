#!/usr/bin/env bash
# soak.sh -- cutover under mixed load for a long time, reloaded every minute and upgraded in place
# (a new binary takes the sockets, the old one drains) every ten, as a migration runs for days:
# prints RSS and descriptors over time (and the RSS slope), and every failed request. Exits 1 if any
# request failed, if a reload or an upgrade did not happen, or if descriptors grew.
#
#   sudo benches/soak.sh                                   # an hour (the README's figures)
#   SOAK_SECONDS=120 RELOAD_EVERY=20 UPGRADE_EVERY=60 benches/soak.sh   # what .ci/run does
#
# Load (wrk, each its own connections, for the whole run): 16 keep-alive GET clients, 4 clients
# opening a connection per GET (an ALB's churn), 4 keep-alive clients POSTing 4 KiB. The origin is
# Debian's nginx over TLS with a certificate made here, closing idle connections after 4 s as a
# CloudFront edge does; cutover verifies it. Each reload changes a response header (a real new
# model); each upgrade runs `cutover run --upgrade` beside the running process and sends SIGQUIT
# to the old one, which finishes its requests and exits.
# Env: SOAK_SECONDS=3600 RELOAD_EVERY=60 UPGRADE_EVERY=600 SAMPLE_EVERY=30 BIN=(dist, else release)
# Needs: nginx, wrk, openssl, curl; root only for nothing (any user with free ports 18500-18503).
set -euo pipefail
SOAK_SECONDS=${SOAK_SECONDS:-3600}
RELOAD_EVERY=${RELOAD_EVERY:-60}
UPGRADE_EVERY=${UPGRADE_EVERY:-600}
SAMPLE_EVERY=${SAMPLE_EVERY:-30}
PORT=${PORT:-18500}; ADMIN=$((PORT + 1)); ORIGIN=$((PORT + 2))
REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-/var/cache/cutover-target}
if [ -z "${BIN:-}" ]; then
  if [ -x "$TARGET/dist/cutover" ]; then BIN=$TARGET/dist/cutover; else
    (cd "$REPO" && cargo build --release --locked --quiet); BIN=$TARGET/release/cutover; fi
fi
for c in nginx wrk openssl curl; do command -v "$c" >/dev/null || { echo "soak: needs $c" >&2; exit 2; }; done
NGINX=$(command -v nginx)
for p in "$PORT" "$ADMIN" "$ORIGIN"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "soak: port $p is in use (PORT= moves all three)" >&2; exit 2; fi
done
DIR=$(mktemp -d /tmp/cutover-soak.XXXXXX)
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# A CA and the origin's certificate.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=soak-ca \
  -keyout "$DIR/ca.key" -out "$DIR/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=origin.soak.test \
  -keyout "$DIR/origin.key" -out "$DIR/origin.csr" 2>/dev/null
printf 'subjectAltName=DNS:origin.soak.test\n' >"$DIR/san.ext"
openssl x509 -req -in "$DIR/origin.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial \
  -days 2 -extfile "$DIR/san.ext" -out "$DIR/origin.pem" 2>/dev/null

cat >"$DIR/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1; pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $DIR/body; proxy_temp_path $DIR/proxy; fastcgi_temp_path $DIR/fcgi;
  uwsgi_temp_path $DIR/uwsgi; scgi_temp_path $DIR/scgi;
  keepalive_timeout 4s; keepalive_requests 100000;
  server {
    listen 127.0.0.1:$ORIGIN ssl;
    ssl_certificate $DIR/origin.pem; ssl_certificate_key $DIR/origin.key;
    location / { return 200 "ok\n"; }
    location /upload { client_max_body_size 1m; client_body_buffer_size 64k; return 200 "uploaded\n"; }
  }
}
NGINX

config() { # GENERATION
  cat <<YAML
phase: soak
listeners:
  - address: 127.0.0.1:$PORT
admin:
  address: 127.0.0.1:$ADMIN
server:
  threads: 2
  grace_period: 5s
  graceful_shutdown_timeout: 5s
  upgrade_sock: $DIR/upgrade.sock
  pid_file: $DIR/cutover.pid
access_log: off
routes:
  - name: cdn
    hosts: [cdn.example.test]
    response_headers: { set: { X-Soak-Generation: "$1" } }
    upstreams:
      - name: origin
        address: 127.0.0.1:$ORIGIN
        sni: origin.soak.test
        host_header: origin.soak.test
        ca_file: $DIR/ca.pem
YAML
}
config 0 >"$DIR/cutover.yaml"
"$BIN" check --config "$DIR/cutover.yaml" >/dev/null

PIDS=()
KEEP_DIR=1
# Every process this script started stops with it (the upgraded cutover processes included: each
# is added to PIDS as it starts); the files go only when the soak passed.
cleanup() {
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$KEEP_DIR" = 1 ]; then echo "(files in $DIR)"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
"$NGINX" -c "$DIR/nginx.conf" -p "$DIR" 2>>"$DIR/nginx-error.log" & PIDS+=($!)
RUST_LOG=warn "$BIN" run --config "$DIR/cutover.yaml" >>"$DIR/cutover.log" 2>&1 & PIDS+=($!)
for _ in $(seq 1 100); do curl -sf -o /dev/null -H 'Host: cdn.example.test' "http://127.0.0.1:$PORT/" && break; sleep 0.1; done
curl -sf -o /dev/null -H 'Host: cdn.example.test' "http://127.0.0.1:$PORT/" || { echo "soak: cutover does not serve" >&2; cat "$DIR/cutover.log"; exit 2; }

cat >"$DIR/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("p", 4096)
wrk.headers["Content-Type"] = "application/octet-stream"
LUA
url=http://127.0.0.1:$PORT
wrk -t1 -c16 -d"${SOAK_SECONDS}s" --timeout 10s -H 'Host: cdn.example.test' "$url/" >"$DIR/wrk-get.txt" 2>&1 & PIDS+=($!)
wrk -t1 -c4 -d"${SOAK_SECONDS}s" --timeout 10s -H 'Host: cdn.example.test' -H 'Connection: close' "$url/" >"$DIR/wrk-close.txt" 2>&1 & PIDS+=($!)
wrk -t1 -c4 -d"${SOAK_SECONDS}s" --timeout 10s -H 'Host: cdn.example.test' -s "$DIR/post.lua" "$url/upload" >"$DIR/wrk-post.txt" 2>&1 & PIDS+=($!)
WRKS=("${PIDS[@]: -3}")

pid() { cat "$DIR/cutover.pid"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
fds() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
echo "seconds,pid,rss_kib,fds" >"$DIR/samples.csv"
sample() { local p; p=$(pid); echo "$1,$p,$(rss_kib "$p"),$(fds "$p")" >>"$DIR/samples.csv"; }

log "soak: $SOAK_SECONDS s, reload every $RELOAD_EVERY s, upgrade every $UPGRADE_EVERY s; $BIN; files in $DIR"
start=$(date +%s); reloads=0; upgrades=0; generation=0
next_reload=$RELOAD_EVERY; next_upgrade=$UPGRADE_EVERY; next_sample=0
while :; do
  now=$(( $(date +%s) - start ))
  [ "$now" -ge "$SOAK_SECONDS" ] && break
  if [ "$now" -ge "$next_sample" ]; then sample "$now"; next_sample=$((next_sample + SAMPLE_EVERY)); fi
  if [ "$now" -ge "$next_upgrade" ]; then
    old=$(pid); rm -f "$DIR/upgrade.sock"
    RUST_LOG=warn "$BIN" run --upgrade --config "$DIR/cutover.yaml" >>"$DIR/cutover.log" 2>&1 & new=$!
    PIDS+=("$new")
    for _ in $(seq 1 150); do [ -S "$DIR/upgrade.sock" ] && break; sleep 0.1; done
    kill -QUIT "$old"
    for _ in $(seq 1 150); do [ "$(pid)" = "$new" ] && break; sleep 0.1; done
    if [ "$(pid)" = "$new" ]; then upgrades=$((upgrades + 1)); log "upgrade $upgrades: $old -> $new"; else log "upgrade FAILED: still $(pid)"; fi
    next_upgrade=$((next_upgrade + UPGRADE_EVERY))
  elif [ "$now" -ge "$next_reload" ]; then
    generation=$((generation + 1)); config "$generation" >"$DIR/cutover.yaml.new"; mv "$DIR/cutover.yaml.new" "$DIR/cutover.yaml"
    kill -HUP "$(pid)"; reloads=$((reloads + 1))
    next_reload=$((next_reload + RELOAD_EVERY))
  fi
  sleep 1
done
for w in "${WRKS[@]}"; do wait "$w" || true; done
sample "$(( $(date +%s) - start ))"
# The last reload took: the header says the last generation.
served_gen=$(curl -s -D - -o /dev/null -H 'Host: cdn.example.test' "$url/" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-soak-generation" { print $2 }')

# wrk: requests, and every kind of failure it counts.
failures=0; total=0
for f in get close post; do
  reqs=$(awk '/requests in/ { print $1 }' "$DIR/wrk-$f.txt")
  errs=$(awk '/Socket errors/ { gsub(/,/, ""); s = $4 + $6 + $8 + $10 } /Non-2xx/ { n = $NF } END { print s + n + 0 }' "$DIR/wrk-$f.txt")
  printf '  %-6s %10s requests, %s failed\n' "$f" "${reqs:-?}" "$errs"
  total=$((total + ${reqs:-0})); failures=$((failures + errs))
done
echo "RSS and descriptors over time (seconds, pid, RSS KiB, fds):"
column -t -s, "$DIR/samples.csv" | sed 's/^/  /'
# Least-squares RSS slope per process (an upgrade starts a fresh one), the first sample of each left
# out (warm-up), and over the whole run.
awk -F, 'NR > 1 { n++; x[n] = $1; y[n] = $3 * 1024; f[n] = $4; p[n] = $2 }
  function slope(from, to,   i, m, sx, sy, mx, my, num, den) {
    for (i = from; i <= to; i++) { sx += x[i]; sy += y[i]; m++ }
    if (m < 3) return "n/a"
    mx = sx / m; my = sy / m
    for (i = from; i <= to; i++) { num += (x[i] - mx) * (y[i] - my); den += (x[i] - mx) ^ 2 }
    return sprintf("%+.2f MiB/h", num / den * 3600 / 1048576)
  }
  END {
    start = 1
    for (i = 1; i <= n; i++) if (i == n || p[i + 1] != p[i]) {
      printf "  pid %s: %d samples, RSS %.1f -> %.1f MiB, slope %s\n", p[i], i - start + 1, y[start] / 1048576, y[i] / 1048576, slope(start + 1, i)
      start = i + 1
    }
    printf "RSS slope over the run: %s; RSS %.1f -> %.1f MiB; fds %d -> %d\n", slope(2, n), y[2] / 1048576, y[n] / 1048576, f[2], f[n]
  }' "$DIR/samples.csv" | tee "$DIR/slope.txt"
echo "soak: $total requests, $failures failed; $reloads reloads, $upgrades upgrades; last generation served: ${served_gen:-none} (of $generation)"
fds_first=$(awk -F, 'NR == 3 { print $4 }' "$DIR/samples.csv"); fds_last=$(tail -1 "$DIR/samples.csv" | cut -d, -f4)
ok=1
[ "$failures" -eq 0 ] || { echo "soak: FAILED requests" >&2; ok=0; }
[ "$reloads" -ge 1 ] && [ "${served_gen:-x}" = "$generation" ] || { echo "soak: the reloads did not take" >&2; ok=0; }
[ "$UPGRADE_EVERY" -ge "$SOAK_SECONDS" ] || [ "$upgrades" -ge $((SOAK_SECONDS / UPGRADE_EVERY - 1)) ] || { echo "soak: upgrades missing" >&2; ok=0; }
[ -z "$fds_first" ] || [ "$fds_last" -le $((fds_first + 16)) ] || { echo "soak: descriptors grew $fds_first -> $fds_last" >&2; ok=0; }
[ "$ok" = 1 ] || exit 1
KEEP_DIR=0

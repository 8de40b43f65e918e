#!/usr/bin/env bash
# idle.sh -- memory per idle client connection: cutover (the dist build, the bench config of
# matrix.sh: one thread) with N keep-alive connections that each made one request and then went
# quiet, and N connections that never sent a byte; RSS before, with them, and after they closed.
#
#   sudo benches/compare/idle.sh              # N=10000
#   N=2000 benches/compare/idle.sh
#   TLS=1 benches/compare/idle.sh             # on the TLS listener (an ALB's HTTPS targets)
#   BIN=/tmp/cutover-old benches/compare/idle.sh   # another binary
#
# Needs python3 (the client: asyncio, one socket per connection) and what matrix.sh set up
# (run it once first: it writes the config and builds the binary).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
N=${N:-10000}
PROFILE=${PROFILE:-dist}
BIN=${BIN:-${CARGO_TARGET_DIR:-/var/cache/cutover-target}/$PROFILE/cutover}
CONFIG=$CONF_DIR/matrix-cutover.yaml
TLS=${TLS:-0}
if [ "$TLS" = 1 ]; then PORT=$MATRIX_TLS_PORT; SCHEME=https; else PORT=$MATRIX_PORT; SCHEME=http; fi
[ -x "$BIN" ] && [ -f "$CONFIG" ] || die "run matrix.sh once first (it builds $BIN and writes $CONFIG)"
# Descriptors: N for the clients (python, its own process), N + the upstream pool for cutover.
want=$((N * 2 + 4096)); hard=$(ulimit -Hn)
[ "$hard" = unlimited ] || [ "$hard" -ge "$want" ] || want=$hard
ulimit -n "$want"
# The bench config with room for N clients whatever the limit makes the default.
sed "s|^  - address: 127.0.0.1:$PORT\$|&\n    max_connections: $((N + 100))|" "$CONFIG" >"$CONF_DIR/idle-cutover.yaml"
grep -q "max_connections: $((N + 100))" "$CONF_DIR/idle-cutover.yaml" || die "could not set max_connections"
CONFIG=$CONF_DIR/idle-cutover.yaml
mkdir -p "$LOG_DIR"
trap 'kill $CUTOVER 2>/dev/null; wait $CUTOVER 2>/dev/null; stop_all' EXIT
stop_all
start_origin bench
taskset -c "$PROXY_CPU" env RUST_LOG=warn "$BIN" run --config "$CONFIG" >>"$LOG_DIR/idle-cutover.out" 2>&1 &
CUTOVER=$!
wait_port "$PORT" || die "cutover did not start"
# One request first, so the upstream connection and the caches exist.
curl -sk -o /dev/null -H "Host: $FRONT_HOST" "$SCHEME://127.0.0.1:$PORT/ruok"
sleep 2

measure() { # MODE: request | silent
  local base
  base=$(rss_kb "$CUTOVER")
  python3 - "$PORT" "$N" "$1" "$FRONT_HOST" "$TLS" <<'PY' &
import asyncio, ssl, sys
port, n, mode, host, tls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
ctx = None
if tls:
    # The bench CA's certificate is not what is measured here: no verification.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
async def one(held):
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host if tls else None)
    if mode == "request":
        w.write(f"GET /ruok HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
        await r.readexactly(length)
    held.append(w)
async def main():
    held = []
    for i in range(0, n, 500):
        await asyncio.gather(*(one(held) for _ in range(min(500, n - i))))
    print(len(held), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
PY
  CLIENT=$!
  # Wait for the client to hold all N, then for cutover's held upstream connections to go back to
  # the pool (1 s idle) and its timers to settle.
  for _ in $(seq 1 600); do [ "$(ss -Htn state established "dport = :$PORT" | wc -l)" -ge "$N" ] && break; sleep 0.1; done
  sleep 3
  local with open_fds pooled
  with=$(rss_kb "$CUTOVER")
  open_fds=$(ls /proc/"$CUTOVER"/fd | wc -l)
  pooled=$(ss -Htn state established "dport = :$ORIGIN_PORT" | wc -l)
  kill "$CLIENT"; wait "$CLIENT" 2>/dev/null || true
  sleep 3
  local after
  after=$(rss_kb "$CUTOVER")
  awk -v m="$1" -v n="$N" -v b="$base" -v w="$with" -v a="$after" -v f="$open_fds" -v p="$pooled" 'BEGIN {
    printf "%-8s %6d conns: RSS before %.1f MiB, with them %.1f MiB (%d fds, %d upstream connections), after they closed %.1f MiB: %.1f KiB per connection\n",
      m, n, b/1024, w/1024, f, p, a/1024, (w-b)/n }'
}
log "cutover $BIN, $N connections each way, $SCHEME"
measure request
measure silent

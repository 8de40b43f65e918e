#!/usr/bin/env bash
# cutover.sh -- benchmark cutover against nginx and HAProxy doing the same job, on this machine.
#
#   sudo benches/compare/cutover.sh              # setup (apt, CA, configs), build, then run.sh
#   ACCESS_LOG=json benches/compare/cutover.sh   # same, cutover writing a JSON access log to a file
#   ROUNDS=1 DURATION=5 PEERS=nginx benches/compare/cutover.sh   # quicker; all run.sh knobs apply
#   BASE_BIN=/path/to/old/cutover benches/compare/cutover.sh      # before/after: that binary runs beside
#                                                                 # this build, same config, as cutover-base
#   FOUR_ADDRESSES=1 benches/compare/cutover.sh   # also `cutover-4addr` (port +2): the same job with the
#                                                 # origin's name resolving to 127.0.0.1-4 (hosts file)
#
# The job: plain HTTP in for cdn.example.test, Host rewritten to cdn-new.example.test, TLS to the
# origin (127.0.0.1:19443) with SNI cdn-new.example.test and a verified certificate, upstream
# keep-alive, one worker thread/process each, access logs off. cutover runs as `cutover=18084`
# next to the peers; see README.md in this folder for the harness, and run.sh for its knobs.
#
# To compare against your own upstream instead, edit the generated $BENCH_DIR/conf/cutover.yaml
# (address, sni, host_header, ca_file) and start cutover with it; run.sh takes any NAME=PORT.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
. "$HERE/common.sh"

CUTOVER_PORT=${CUTOVER_PORT:-18084}
CUTOVER_ADMIN=${CUTOVER_ADMIN:-18094}
ACCESS_LOG=${ACCESS_LOG:-off}          # off | json
BASE_BIN=${BASE_BIN:-}                 # optional second cutover binary (port +1), for before/after
FOUR_ADDRESSES=${FOUR_ADDRESSES:-}     # 1: a third cutover whose upstream name has four addresses
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/cutover-target}

[ -f "$CONF_DIR/origin-bench.conf" ] || "$HERE/setup.sh"
(cd "$REPO" && cargo build --profile dist --locked)
BIN=$CARGO_TARGET_DIR/dist/cutover

case $ACCESS_LOG in
  off) access="access_log: off" ;;
  json) access="access_log: { format: json, path: $LOG_DIR/cutover-access.log }" ;;
  *) die "ACCESS_LOG must be off or json" ;;
esac
cat >"$CONF_DIR/cutover.yaml" <<YAML
phase: bench
listeners:
  - address: 127.0.0.1:$CUTOVER_PORT
admin:
  address: 127.0.0.1:$CUTOVER_ADMIN
server:
  threads: 1
  grace_period: 1s
  graceful_shutdown_timeout: 1s
  upgrade_sock: $BENCH_DIR/tmp/cutover-upgrade.sock
  pid_file: $BENCH_DIR/tmp/cutover.pid
  upstream_keepalive_pool_size: 1024
  work_stealing: false          # one thread: a plain current-thread runtime
$access
routes:
  - name: cdn
    hosts: [$FRONT_HOST]
    sticky: none
    upstreams:
      - name: origin
        address: 127.0.0.1:$ORIGIN_PORT
        host_header: $UP_HOST
        sni: $UP_HOST
        ca_file: $CERT_DIR/ca.crt
        timeouts: { idle: 300s }
YAML
"$BIN" check --config "$CONF_DIR/cutover.yaml"

# Not in $PID_DIR: run.sh's stop_all must not stop them between scenarios.
CUTOVER_PIDS=()
stop_cutover() {
  for pid in "${CUTOVER_PIDS[@]}"; do kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; done
}
trap stop_cutover EXIT
mkdir -p "$LOG_DIR"
taskset -c "$PROXY_CPU" env RUST_LOG=warn "$BIN" run --config "$CONF_DIR/cutover.yaml" >>"$LOG_DIR/cutover.out" 2>&1 &
CUTOVER_PIDS+=($!)
wait_port "$CUTOVER_PORT" || die "cutover did not start; see $LOG_DIR/cutover.out"
log "cutover pid ${CUTOVER_PIDS[0]} on 127.0.0.1:$CUTOVER_PORT (access log: $ACCESS_LOG)"
targets=("cutover=$CUTOVER_PORT")

if [ -n "$BASE_BIN" ]; then
  BASE_PORT=$((CUTOVER_PORT + 1))
  sed -e "s/127.0.0.1:$CUTOVER_PORT/127.0.0.1:$BASE_PORT/" -e "s/127.0.0.1:$CUTOVER_ADMIN/127.0.0.1:$((CUTOVER_ADMIN + 1))/" \
      -e "s/cutover-upgrade.sock/cutover-base-upgrade.sock/" -e "s/cutover.pid/cutover-base.pid/" \
      -e "s/cutover-access.log/cutover-base-access.log/" "$CONF_DIR/cutover.yaml" >"$CONF_DIR/cutover-base.yaml"
  taskset -c "$PROXY_CPU" env RUST_LOG=warn "$BASE_BIN" run --config "$CONF_DIR/cutover-base.yaml" >>"$LOG_DIR/cutover-base.out" 2>&1 &
  CUTOVER_PIDS+=($!)
  wait_port "$BASE_PORT" || die "the base cutover did not start; see $LOG_DIR/cutover-base.out"
  log "cutover-base ($BASE_BIN) pid ${CUTOVER_PIDS[1]} on 127.0.0.1:$BASE_PORT"
  targets+=("cutover-base=$BASE_PORT")
fi

if [ -n "$FOUR_ADDRESSES" ]; then
  FOUR_PORT=$((CUTOVER_PORT + 2))
  printf '127.0.0.%s origin.bench.test\n' 1 2 3 4 >"$CONF_DIR/hosts-4addr"
  sed -e "s/127.0.0.1:$CUTOVER_PORT/127.0.0.1:$FOUR_PORT/" -e "s/127.0.0.1:$CUTOVER_ADMIN/127.0.0.1:$((CUTOVER_ADMIN + 2))/" \
      -e "s/cutover-upgrade.sock/cutover-4addr-upgrade.sock/" -e "s/cutover.pid/cutover-4addr.pid/" \
      -e "s/cutover-access.log/cutover-4addr-access.log/" \
      -e "s/address: 127.0.0.1:$ORIGIN_PORT/address: origin.bench.test:$ORIGIN_PORT/" \
      "$CONF_DIR/cutover.yaml" >"$CONF_DIR/cutover-4addr.yaml"
  taskset -c "$PROXY_CPU" env RUST_LOG=warn CUTOVER_HOSTS_FILE="$CONF_DIR/hosts-4addr" "$BIN" run \
      --config "$CONF_DIR/cutover-4addr.yaml" >>"$LOG_DIR/cutover-4addr.out" 2>&1 &
  CUTOVER_PIDS+=($!)
  wait_port "$FOUR_PORT" || die "cutover-4addr did not start; see $LOG_DIR/cutover-4addr.out"
  log "cutover-4addr pid ${CUTOVER_PIDS[-1]} on 127.0.0.1:$FOUR_PORT (origin name on 127.0.0.1-4)"
  targets+=("cutover-4addr=$FOUR_PORT")
fi

"$HERE/run.sh" "${targets[@]}" "$@"

#!/usr/bin/env bash
# Build the .deb, check what is in it, lint it, install it, use it, remove and
# purge it. Run as root on a Debian machine (CI runs it from .ci/run); it
# changes the system: it installs and purges the `cutover` package.
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/cutover-target}"

passed=0; failed=0
ok()   { passed=$((passed + 1)); echo "ok   - $1"; }
bad()  { failed=$((failed + 1)); echo "FAIL - $1"; }
check() { local what=$1; shift; if "$@" >/tmp/test-deb.out 2>&1; then ok "$what"; else bad "$what"; sed 's/^/       /' /tmp/test-deb.out; fi; }

[ "$(id -u)" = 0 ] || { echo "run as root"; exit 2; }
if dpkg -s cutover >/dev/null 2>&1; then
  echo "cutover is already installed here; refusing to touch it"; exit 2
fi

cargo deb --locked --strip --profile dist >/tmp/test-deb.build 2>&1 || { cat /tmp/test-deb.build; exit 1; }
deb=$(tail -1 /tmp/test-deb.build)
[ -f "$deb" ] || { echo "no .deb built"; cat /tmp/test-deb.build; exit 1; }
echo "# $deb"

# 1. The package's content.
expected="./etc/cutover/cutover.yaml
./etc/logrotate.d/cutover
./usr/bin/cutover
./usr/lib/systemd/system/cutover.service
./usr/share/cutover/grafana/cutover-dashboard.json
./usr/share/cutover/prometheus/cutover-alerts.yml
./usr/share/doc/cutover/README.md
./usr/share/doc/cutover/changelog.Debian.gz
./usr/share/doc/cutover/copyright
./usr/share/doc/cutover/examples/fleet/bootstrap.yaml
./usr/share/doc/cutover/examples/fleet/document.yaml
./usr/share/doc/cutover/examples/phase-1-old-through-proxy.yaml
./usr/share/doc/cutover/examples/phase-2-rollout.yaml
./usr/share/doc/cutover/examples/phase-2-split.yaml
./usr/share/doc/cutover/examples/phase-3-new-with-old-backup.yaml
./usr/share/lintian/overrides/cutover"
actual=$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $6 }' | sort)
check "file list is exactly the expected one" diff <(echo "$expected") <(echo "$actual")
check "/etc/cutover/cutover.yaml is a conffile" sh -c "dpkg-deb -I '$deb' conffiles | grep -qx /etc/cutover/cutover.yaml"
check "the binary is stripped" sh -c "dpkg-deb --fsys-tarfile '$deb' | tar -xO ./usr/bin/cutover > /tmp/test-deb.bin && ! readelf -S /tmp/test-deb.bin | grep -q debug_info"
check "lintian: no errors" lintian --fail-on error "$deb"

# 2. Install.
check "dpkg -i" dpkg -i "$deb"
check "system user created" getent passwd cutover
check "system group created" getent group cutover
check "installed binary runs" /usr/bin/cutover --version
check "installed default config passes check (as the service user)" \
  runuser -u cutover -- /usr/bin/cutover check --config /etc/cutover/cutover.yaml
check "unit passes systemd-analyze verify" systemd-analyze verify /usr/lib/systemd/system/cutover.service
check "unit installed but not enabled" test ! -e /etc/systemd/system/multi-user.target.wants/cutover.service
check "unit runs as the cutover user, hardened" sh -c "grep -qx 'User=cutover' /usr/lib/systemd/system/cutover.service && grep -qx 'NoNewPrivileges=yes' /usr/lib/systemd/system/cutover.service && grep -qx 'AmbientCapabilities=CAP_NET_BIND_SERVICE' /usr/lib/systemd/system/cutover.service"

# 3. The installed default starts without any reachable upstream (as systemd
# would run it: the cutover user, /run/cutover as its runtime directory).
install -d -o cutover -g cutover -m 0750 /run/cutover
# setpriv execs (runuser would fork), so $! is cutover itself.
setpriv --reuid cutover --regid cutover --init-groups -- \
  /usr/bin/cutover run --config /etc/cutover/cutover.yaml >/tmp/test-deb.run 2>&1 &
pid=$!
up=0
for _ in $(seq 1 100); do
  if curl -fs --max-time 1 http://127.0.0.1:9091/healthz >/dev/null 2>&1; then up=1; break; fi
  sleep 0.1
done
check "installed default starts and answers /healthz" test "$up" = 1
check "an unreachable upstream gives 502, not a crash" \
  sh -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H 'Host: cdn.example.com' http://127.0.0.1:8080/)\" = 502 ]"
check "an unknown host gives 421" \
  sh -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Host: nope.example' http://127.0.0.1:8080/)\" = 421 ]"
check "pid file written" sh -c "[ \"\$(cat /run/cutover/cutover.pid)\" = $pid ]"
kill -TERM "$pid"
wait "$pid"; rc=$?
check "SIGTERM: clean exit" test "$rc" = 0
sed 's/^/       log: /' /tmp/test-deb.run | tail -3

# 3b. A fleet instance: the example bootstrap with its document served on
# loopback (python3's http.server), the cache in /var/lib/cutover (which
# the unit's StateDirectory= makes).
install -d -o cutover -g cutover -m 0750 /var/lib/cutover
fleet=$(mktemp -d); chmod 755 "$fleet"
cp /usr/share/doc/cutover/examples/fleet/document.yaml "$fleet/cutover.yaml"
sed 's#^  url: .*#  url: "http://127.0.0.1:18950/cutover.yaml"#' \
  /usr/share/doc/cutover/examples/fleet/bootstrap.yaml > "$fleet/bootstrap.yaml"
python3 -m http.server 18950 --bind 127.0.0.1 --directory "$fleet" >/dev/null 2>&1 &
web=$!
for _ in $(seq 1 50); do curl -fs --max-time 1 -o /dev/null http://127.0.0.1:18950/cutover.yaml && break; sleep 0.1; done
check "the fleet example bootstrap passes check" runuser -u cutover -- /usr/bin/cutover check --config "$fleet/bootstrap.yaml"
check "the fleet example document passes check with it" \
  runuser -u cutover -- /usr/bin/cutover check --config "$fleet/bootstrap.yaml" --document "$fleet/cutover.yaml"
setpriv --reuid cutover --regid cutover --init-groups -- \
  /usr/bin/cutover run --config "$fleet/bootstrap.yaml" >/tmp/test-deb.fleet 2>&1 &
pid=$!
sha=$(sha256sum "$fleet/cutover.yaml" | cut -d' ' -f1)
up=0
for _ in $(seq 1 100); do
  if curl -fs --max-time 1 http://127.0.0.1:9091/metrics 2>/dev/null | grep -q "cutover_config_info{phase=\"phase-2-split-10\",sha256=\"$sha\"} 1"; then up=1; break; fi
  sleep 0.1
done
check "a fleet instance runs the served document (cutover_config_info names its sha256)" test "$up" = 1
check "its cache is written in /var/lib/cutover, owned by cutover" \
  sh -c "test \"\$(stat -c %U /var/lib/cutover/source.yaml)\" = cutover && tail -n +2 /var/lib/cutover/source.yaml | cmp - '$fleet/cutover.yaml'"
kill -TERM "$pid"; wait "$pid"
kill "$web"; wait "$web" 2>/dev/null
sed 's/^/       log: /' /tmp/test-deb.fleet | grep "lifecycle::source" | tail -2
rm -rf "$fleet"

# 4. Remove, then purge.
check "dpkg -r" dpkg -r cutover
check "binary removed" test ! -e /usr/bin/cutover
check "conffile kept after remove" test -f /etc/cutover/cutover.yaml
check "dpkg -P" dpkg -P cutover
check "config gone after purge" test ! -e /etc/cutover
check "unit gone after purge" test ! -e /usr/lib/systemd/system/cutover.service
check "user gone after purge" sh -c "! getent passwd cutover"
check "group gone after purge" sh -c "! getent group cutover"
check "runtime, log and state dirs gone after purge" sh -c "test ! -e /run/cutover && test ! -e /var/log/cutover && test ! -e /var/lib/cutover"
check "package fully gone" sh -c "! dpkg -s cutover"

echo "deb: $passed passed, $failed failed"
[ "$failed" = 0 ]

#!/usr/bin/env bash
# How bifs grows with image size (1 GiB to 100 GiB) and with the number of images (1000):
# time-to-first-byte, daemon RSS, metadata on disk, mount start-up time, `ls -l` time.
# nginx serves sparse files on 127.0.0.1 (holes read as zeros; nothing is fetched from outside).
# Env: BIFS_BIN (default target/release/bifs), SCALE_IMAGES (default 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh nginx bc
BIFS=${BIFS_BIN:-$PWD/target/release/bifs}
[ -x "$BIFS" ] || cargo build --release --quiet
N=${SCALE_IMAGES:-1000}
W=$(mktemp -d /var/tmp/bifs-scale.XXXXXX)
PORT=18777 API=127.0.0.1:18778
export BIFS_SERVER=http://$API
chmod 755 "$W"; mkdir -p "$W"/{www,mnt,disk}
cleanup() {
  pkill -f "listen $API" 2>/dev/null || true
  sleep 0.3; mountpoint -q "$W/mnt" && umount -l "$W/mnt" || true
  [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
cat > "$W/nginx.conf" <<NGX
worker_processes 1; pid $W/nginx.pid; error_log $W/nginx-error.log;
events { worker_connections 1024; }
http { access_log off; sendfile on; server { listen 127.0.0.1:$PORT; root $W/www; } }
NGX
nginx -c "$W/nginx.conf"
for g in 1 10 100; do truncate -s ${g}G "$W/www/sparse-${g}g.raw"; done
head -c 1M /dev/urandom > "$W/www/small.raw"

now() { date +%s.%N; }
start_daemon() {
  "$BIFS" mount --mountpoint "$W/mnt" --disk "$W/disk" --listen $API 2>>"$W/daemon.log" &
  DPID=$!
  for _ in $(seq 400); do curl -sf "$BIFS_SERVER/healthz" >/dev/null && mountpoint -q "$W/mnt" && return; sleep 0.01; done
  echo "daemon did not start" >&2; tail "$W/daemon.log" >&2; exit 1
}
rss() { awk '/VmRSS/{print int($2/1024)}' /proc/$DPID/status; }
hwm() { awk '/VmHWM/{print int($2/1024)}' /proc/$DPID/status; }

printf '%-34s %12s %12s %12s %14s\n' "image size" "create s" "TTFB ms" "RSS MiB" "metadata KiB"
start_daemon
for g in 1 10 100; do
  t0=$(now); "$BIFS" create "sparse-${g}g" --no-fill --url "http://127.0.0.1:$PORT/sparse-${g}g.raw" >/dev/null; t1=$(now)
  sync; echo 3 > /proc/sys/vm/drop_caches
  # First byte far from the start: a cold 4 KiB read in the middle of the image.
  off=$(( g * 1024 * 1024 * 1024 / 2 / 4096 ))
  t2=$(now); dd if="$W/mnt/sparse-${g}g" of=/dev/null bs=4k skip=$off count=1 2>/dev/null; t3=$(now)
  meta=$(du -k --apparent-size "$W/disk/images/sparse-${g}g"/{bitmap,spec.json,state.json} | awk '{s+=$1} END {print s}')
  printf '%-34s %12.3f %12.2f %12s %14s\n' "${g} GiB (sparse, --no-fill)" "$(echo "$t1-$t0" | bc)" "$(echo "($t3-$t2)*1000" | bc)" "$(rss)" "$meta"
done
echo "daemon peak RSS with 1+10+100 GiB images: $(hwm) MiB"
"$BIFS" delete sparse-100g >/dev/null; "$BIFS" delete sparse-10g >/dev/null; "$BIFS" delete sparse-1g >/dev/null

echo
echo "$N images of 1 MiB:"
t0=$(now)
for i in $(seq -w 1 "$N"); do
  printf '{"name":"img-%s","sourceType":"download","sourceParameters":{"url":"http://127.0.0.1:%s/small.raw"}}' "$i" "$PORT" \
    | curl -sf -o /dev/null -H 'content-type: application/json' -d @- "$BIFS_SERVER/v1/images"
done
t1=$(now)
printf '  create all: %.2f s\n' "$(echo "$t1-$t0" | bc)"
for _ in $(seq 600); do
  [ "$(curl -sf "$BIFS_SERVER/metrics" | grep -c 'state="ready"} 1')" -ge "$N" ] && break; sleep 0.1
done
kill -TERM $DPID; wait $DPID 2>/dev/null || true
t0=$(now); start_daemon; t1=$(now)
printf '  mount start-up with %s images: %.3f s (target < 2 s)\n' "$N" "$(echo "$t1-$t0" | bc)"
t0=$(now); ls -l "$W/mnt" >/dev/null; t1=$(now)
printf '  ls -l of the mount, first: %.1f ms (target < 100 ms)\n' "$(echo "($t1-$t0)*1000" | bc)"
t0=$(now); ls -l "$W/mnt" >/dev/null; t1=$(now)
printf '  ls -l of the mount, again: %.1f ms\n' "$(echo "($t1-$t0)*1000" | bc)"
printf '  daemon RSS: %s MiB\n' "$(rss)"
t0=$(now); "$BIFS" list >/dev/null; t1=$(now)
printf '  bifs list: %.1f ms\n' "$(echo "($t1-$t0)*1000" | bc)"

#!/usr/bin/env bash
# Benchmark of the QCOW2 raw view: a 1 GiB qcow2 of random data, served by `bifs serve`
# on 127.0.0.1, created in bifs and fetched until ready. Then, in the same run:
#   baseline   qemu-img convert of the same local qcow2 file (page cache warm) to a
#              null-co target: decode only, nothing written. (`-O raw /dev/null` is
#              refused: "Cannot grow device files"; null-co is its equivalent.)
#   tmpfs      qemu-img convert -O raw of it to a file on /dev/shm (one more copy, as
#              a FUSE reply is one more copy than a decode)
#   raw cold   dd bs=1M of <mnt>/.raw/<name>, its FUSE page cache dropped first
#              (dd iflag=nocache count=0), the cached data file warm: the decode path
#   raw direct dd bs=1M iflag=direct: every request reaches the daemon, no readahead
#   raw warm   dd bs=1M again without dropping: the kernel page cache (KEEP_CACHE)
# Best of RUNS (default 3) each; the table prints MiB/s and the ratio to the baseline
# (target: raw cold >= 0.8x).
# BENCH_DIR (default /tmp/bifs-bench-qcow2) holds everything (about 2 GiB), removed at
# the end unless BENCH_KEEP=1; needs root (FUSE).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: bifs mounts a FUSE filesystem" >&2; exit 1; }
for t in qemu-img openssl dd curl; do
  command -v "$t" >/dev/null || { echo "needs $t (scripts/deps.sh installs it)" >&2; exit 1; }
done
echo "== building bifs (release)" >&2
cargo build --release --quiet
BIFS="${CARGO_TARGET_DIR:-$PWD/target}/release/bifs"
DIR=${BENCH_DIR:-/tmp/bifs-bench-qcow2}
RUNS=${RUNS:-3}
ORIGIN_PORT=${BENCH_ORIGIN_PORT:-18180}
API=${BENCH_API:-127.0.0.1:18190}
export BIFS_SERVER="http://$API"
SIZE=$((1024 * 1024 * 1024))

mountpoint -q "$DIR/mnt" 2>/dev/null && umount -l "$DIR/mnt" || true
rm -rf "$DIR"; mkdir -p "$DIR"/{www,disk,mnt}
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  mountpoint -q "$DIR/mnt" 2>/dev/null && umount -l "$DIR/mnt" || true
  rm -f /dev/shm/bifs-bench-qcow2.raw
  if [ "${BENCH_KEEP:-0}" != 1 ] && ! mountpoint -q "$DIR/mnt" 2>/dev/null; then rm -rf "$DIR"; fi
}
trap cleanup EXIT

echo "== making a 1 GiB qcow2 of random data" >&2
{ openssl enc -aes-128-ctr -nosalt -pass pass:bifs -in /dev/zero 2>/dev/null || true; } | head -c "$SIZE" > "$DIR/big.raw"
qemu-img convert -O qcow2 "$DIR/big.raw" "$DIR/www/big.qcow2"
rm "$DIR/big.raw"

"$BIFS" serve "$DIR/www" --listen "127.0.0.1:$ORIGIN_PORT" 2>"$DIR/serve.log" & pids+=($!)
for _ in $(seq 50); do grep -q "serving files" "$DIR/serve.log" && break; sleep 0.1; done
"$BIFS" mount --mountpoint "$DIR/mnt" --disk "$DIR/disk" --listen "$API" 2>"$DIR/daemon.log" & pids+=($!)
for _ in $(seq 100); do
  curl -fs "$BIFS_SERVER/healthz" >/dev/null && mountpoint -q "$DIR/mnt" && break
  kill -0 "${pids[1]}" 2>/dev/null || { tail -5 "$DIR/daemon.log" >&2; exit 1; }
  sleep 0.1
done
"$BIFS" create big --url "http://127.0.0.1:$ORIGIN_PORT/big.qcow2" >&2
"$BIFS" status big --wait ready --timeout 10m >/dev/null
RAW="$DIR/mnt/.raw/big"
[ "$(stat -c %s "$RAW")" = "$SIZE" ] || { echo "raw view size is not the virtual size" >&2; exit 1; }

# Seconds (with ns precision) that a command takes.
secs() {
  local t0 t1
  t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }'
}
mibs() { awk -v s="$SIZE" -v t="$1" 'BEGIN { printf "%d", s / 1048576 / t }'; }
best() { # best (lowest) time of RUNS runs of a command, after an optional setup command
  local setup=$1; shift; local b=
  for _ in $(seq "$RUNS"); do
    [ -n "$setup" ] && eval "$setup"
    local t; t=$(secs "$@")
    if [ -z "$b" ] || awk -v t="$t" -v b="$b" 'BEGIN { exit !(t < b) }'; then b=$t; fi
  done
  echo "$b"
}

cat "$DIR/www/big.qcow2" > /dev/null   # the baseline reads a warm local file too
drop_raw="dd if=$RAW iflag=nocache count=0 status=none"
t_base=$(best "" qemu-img convert -n -f qcow2 "$DIR/www/big.qcow2" --target-image-opts "driver=null-co,size=$SIZE")
t_tmpfs=$(best "rm -f /dev/shm/bifs-bench-qcow2.raw" qemu-img convert -O raw "$DIR/www/big.qcow2" /dev/shm/bifs-bench-qcow2.raw)
rm -f /dev/shm/bifs-bench-qcow2.raw
t_cold=$(best "$drop_raw" dd if="$RAW" of=/dev/null bs=1M)
t_direct=$(best "" dd if="$RAW" of=/dev/null bs=1M iflag=direct)
t_warm=$(best "" dd if="$RAW" of=/dev/null bs=1M)
# The raw view must read what qemu-img decodes.
qemu-img convert -O raw "$DIR/www/big.qcow2" "$DIR/want.raw"
cmp "$RAW" "$DIR/want.raw" || { echo "raw view differs from qemu-img convert" >&2; exit 1; }
rm "$DIR/want.raw"

b=$(mibs "$t_base")
printf '\n1 GiB qcow2 (random data, 64 KiB clusters), best of %s runs\n' "$RUNS"
tb=$(mibs "$t_tmpfs")
printf '%-58s %8s %7s %7s\n' "read" "MiB/s" "/null" "/tmpfs"
row() {
  local m; m=$(mibs "$2")
  printf '%-58s %8s %6.2fx %6.2fx\n' "$1" "$m" "$(awk -v m="$m" -v b="$b" 'BEGIN { print m / b }')" \
    "$(awk -v m="$m" -v b="$tb" 'BEGIN { print m / b }')"
}
row "baseline: qemu-img convert local qcow2 -> null-co" "$t_base"
row "qemu-img convert local qcow2 -> raw file on tmpfs" "$t_tmpfs"
row "raw view, FUSE cache cold (dd bs=1M)  [target >= 0.8x]" "$t_cold"
row "raw view, O_DIRECT (dd bs=1M iflag=direct)" "$t_direct"
row "raw view, page cache warm (dd bs=1M)" "$t_warm"

#!/usr/bin/env bash
# The bifs demo: builds bifs, makes a demo disk image (an ext4 filesystem with a few
# files), serves it with `bifs serve` on 127.0.0.1, mounts bifs and creates the image.
# Then it shows what a user sees, and keeps the mount up until Ctrl-C.
# DEMO_DIR (default /tmp/bifs-demo) holds everything; DEMO_EXIT=1 stops right away.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
[ "$(id -u)" = 0 ] || { echo "run as root: bifs mounts a FUSE filesystem" >&2; exit 1; }
echo "== building bifs (release)"
cargo build --release --quiet
BIFS="$PWD/target/release/bifs"
DIR=${DEMO_DIR:-/tmp/bifs-demo}
ORIGIN_PORT=${DEMO_ORIGIN_PORT:-18080}
API=${DEMO_API:-127.0.0.1:18090}
export BIFS_SERVER="http://$API"

mountpoint -q "$DIR/mnt" 2>/dev/null && umount -l "$DIR/mnt" || true
rm -rf "$DIR"; mkdir -p "$DIR"/{www,disk,mnt,content}
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  mountpoint -q "$DIR/mnt" 2>/dev/null && umount -l "$DIR/mnt" || true
}
trap cleanup EXIT

echo "== making a 256 MiB demo image (ext4 with a few files)"
head -c 64M /dev/urandom > "$DIR/content/random.bin"
echo "hello from a lazily fetched backing image" > "$DIR/content/hello.txt"
mkfs.ext4 -q -F -d "$DIR/content" "$DIR/www/demo.raw" 256M
SUM=$(sha512sum "$DIR/www/demo.raw" | cut -d' ' -f1)

echo "== serving it: bifs serve $DIR/www --listen 127.0.0.1:$ORIGIN_PORT"
"$BIFS" serve "$DIR/www" --listen "127.0.0.1:$ORIGIN_PORT" 2>"$DIR/serve.log" & pids+=($!)
for _ in $(seq 50); do grep -q "serving files" "$DIR/serve.log" && break; kill -0 "${pids[0]}" 2>/dev/null || { cat "$DIR/serve.log" >&2; exit 1; }; sleep 0.1; done
echo "== mounting: bifs mount --mountpoint $DIR/mnt --disk $DIR/disk --listen $API"
"$BIFS" mount --mountpoint "$DIR/mnt" --disk "$DIR/disk" --listen "$API" 2>"$DIR/daemon.log" & pids+=($!)
for _ in $(seq 100); do
  curl -fs "$BIFS_SERVER/healthz" >/dev/null && mountpoint -q "$DIR/mnt" && break
  kill -0 "${pids[1]}" 2>/dev/null || { tail -5 "$DIR/daemon.log" >&2; exit 1; }
  sleep 0.1
done

echo "== bifs create demo --url http://127.0.0.1:$ORIGIN_PORT/demo.raw --checksum ${SUM:0:16}..."
"$BIFS" create demo --url "http://127.0.0.1:$ORIGIN_PORT/demo.raw" --checksum "$SUM"
echo "== ls -l $DIR/mnt  (the image is there at once)"
ls -l "$DIR/mnt"
echo "== qemu-img info $DIR/mnt/demo"
qemu-img info "$DIR/mnt/demo"
echo "== bifs status demo --wait ready"
"$BIFS" status demo --wait ready
echo "== getfattr -d -m - $DIR/mnt/demo"
getfattr -d -m - "$DIR/mnt/demo"
echo "== mount -o loop,ro $DIR/mnt/demo $DIR/loop; cat hello.txt"
mkdir -p "$DIR/loop"
mount -o loop,ro "$DIR/mnt/demo" "$DIR/loop"
cat "$DIR/loop/hello.txt"
umount "$DIR/loop"
echo "== sha512sum through the mount matches the source: $(sha512sum "$DIR/mnt/demo" | cut -c1-16)... = ${SUM:0:16}..."
if [ "${DEMO_EXIT:-0}" = 1 ]; then exit 0; fi
echo
echo "bifs is mounted at $DIR/mnt (API $BIFS_SERVER). Try: BIFS_SERVER=$BIFS_SERVER $BIFS list"
echo "Press Ctrl-C to unmount and stop."
wait

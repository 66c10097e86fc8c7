#!/usr/bin/env bash
# Benchmark of the sources of issue 18, each beside the plain tool doing the same work
# on the same data in the same run (not run in CI; needs root, nginx, zstd, qemu-img):
#
#   upload        bifs upload FILE (hashed while received, ready at the end)
#                 beside curl -T FILE to a local nginx (dav PUT, written to disk)
#   raw export    bifs create --from-volume VOL --export-type raw, until ready
#                 beside cp --sparse=always VOL
#   qcow2 export  bifs create --from-volume VOL --export-type qcow2, until ready
#                 beside qemu-img convert -O qcow2 VOL
#   compressed    bifs create --url IMG.zst, until ready (decompressed, written, verified)
#                 beside curl IMG.zst | zstd -d | sha512sum
#
# Sizes: SIZE_MIB (default 1024) for the upload and the compressed image; the volume is
# 2 x SIZE_MIB with a quarter of it data. Page caches are dropped before each run.
# bifs hashes every image (SHA-512) before it is ready; each row also has the baseline
# followed by sha512sum of its result, the same work done the plain way.
# BENCH_TMP (default /var/tmp) holds about 3 x SIZE_MIB of files and cache.
# BIFS_BIN (default target/release/bifs); BENCH_KEEP=1 keeps the work dir.
source "$(dirname "$0")/bench-lib.sh"

SIZE_MIB=${SIZE_MIB:-1024}
bench_init
ensure_pkgs nginx:nginx zstd:zstd qemu-img:qemu-utils

# nginx with PUT (the dav module) for curl -T, and GET for the compressed image.
WWW=$TMP/www
mkdir -p "$WWW/up" "$TMP/ngx/tmp"
NPORT=$(free_port)
cat >"$TMP/ngx/nginx.conf" <<EOF
user root root;
worker_processes 1;
daemon on;
pid $TMP/ngx/nginx.pid;
error_log $TMP/ngx/error.log warn;
events { worker_connections 256; }
http {
    default_type application/octet-stream;
    access_log off;
    client_body_temp_path $TMP/ngx/tmp/body;
    client_max_body_size 0;
    sendfile on;
    server {
        listen 127.0.0.1:$NPORT;
        root $WWW;
        location /up/ { dav_methods PUT; create_full_put_path on; }
    }
}
EOF
nginx -c "$TMP/ngx/nginx.conf" -p "$TMP/ngx" || die "nginx did not start"
stop_ngx() { nginx -c "$TMP/ngx/nginx.conf" -p "$TMP/ngx" -s stop 2>/dev/null || true; }
trap 'rc=$?; stop_ngx; (exit $rc); bench_cleanup' EXIT
NGX=http://127.0.0.1:$NPORT

bifs_start "$TMP/mnt" "$TMP/disk"
B() { "$BIFS_BIN" "$@"; }

# secs CMD...: wall seconds of CMD (the script stops if it fails).
secs() { local t; t=$(now); "$@" >/dev/null || die "$* failed"; since "$t"; }
row() { # label bifs_secs base_label base_secs mib
    printf '| %-13s | %8.2f s | %8.0f MiB/s | %-34s | %8.2f s | %8.0f MiB/s | %5.2fx |\n' \
        "$1" "$2" "$(calc "$5 / $2")" "$3" "$4" "$(calc "$5 / $4")" "$(calc "$4 / $2")"
}
TABLE=()

# --- upload -------------------------------------------------------------------------
log "making a ${SIZE_MIB} MiB random file"
make_image "$TMP/up.img" $((SIZE_MIB * MIB))
drop_caches
t_curl=$(secs curl -fsS -T "$TMP/up.img" "$NGX/up/up.img")
drop_caches
t_up=$(secs B upload up "$TMP/up.img")
drop_caches
t_upsum=$(secs sha512sum "$WWW/up/up.img")
cmp -s "$TMP/up.img" "$TMP/mnt/up" || die "uploaded image differs"
TABLE+=("$(row upload "$t_up" "curl -T to nginx" "$t_curl" "$SIZE_MIB")")
TABLE+=("$(row upload "$t_up" "curl -T to nginx; sha512sum" "$(calc "$t_curl + $t_upsum")" "$SIZE_MIB")")
B delete up >/dev/null; rm -f "$WWW/up/up.img"

# --- exports ------------------------------------------------------------------------
VOL_MIB=$((2 * SIZE_MIB))
log "making a ${VOL_MIB} MiB sparse volume, a quarter of it data"
truncate -s $((VOL_MIB * MIB)) "$TMP/vol.raw"
for ((i = 0; i < VOL_MIB; i += 64)); do
    [ $(((i / 64) % 4)) = 0 ] || continue
    head -c $((64 * MIB)) /dev/urandom | dd of="$TMP/vol.raw" bs=1M seek="$i" conv=notrunc status=none
done
sync
drop_caches
t_cp=$(secs cp --sparse=always "$TMP/vol.raw" "$TMP/vol.copy")
# bifs also computes the image's SHA-512 before it says ready: the same work, timed apart.
drop_caches
t_sum=$(secs sha512sum "$TMP/vol.copy")
rm -f "$TMP/vol.copy"
export_run() { B create "$1" --from-volume "$TMP/vol.raw" --export-type "$2" && B status "$1" --wait ready --timeout 30m; }
drop_caches
t_raw=$(secs export_run vraw raw)
cmp -s "$TMP/vol.raw" "$TMP/mnt/vraw" || die "raw export differs"
TABLE+=("$(row "raw export" "$t_raw" "cp --sparse=always" "$t_cp" "$VOL_MIB")")
TABLE+=("$(row "raw export" "$t_raw" "cp --sparse=always; sha512sum" "$(calc "$t_cp + $t_sum")" "$VOL_MIB")")
B delete vraw >/dev/null
drop_caches
t_conv=$(secs qemu-img convert -O qcow2 "$TMP/vol.raw" "$TMP/vol.qcow2")
q_size=$(stat -c %s "$TMP/vol.qcow2")
drop_caches
t_qsum=$(secs sha512sum "$TMP/vol.qcow2")
rm -f "$TMP/vol.qcow2"
drop_caches
t_q=$(secs export_run vq qcow2)
qemu-img compare -f raw -F qcow2 "$TMP/vol.raw" "$TMP/mnt/vq" >/dev/null || die "qcow2 export differs"
b_size=$(stat -c %s "$TMP/mnt/vq")
TABLE+=("$(row "qcow2 export" "$t_q" "qemu-img convert -O qcow2" "$t_conv" "$VOL_MIB")")
TABLE+=("$(row "qcow2 export" "$t_q" "qemu-img convert; sha512sum" "$(calc "$t_conv + $t_qsum")" "$VOL_MIB")")
B delete vq >/dev/null
rm -f "$TMP/vol.raw"

# --- compressed download ------------------------------------------------------------
log "making a ${SIZE_MIB} MiB image (half random, half text) and its zstd"
# (yes dies of SIGPIPE when head has enough: not a failure under pipefail)
{ head -c $((SIZE_MIB * MIB / 2)) /dev/urandom; { yes "bifs compressed download benchmark line" || true; } | head -c $((SIZE_MIB * MIB / 2)); } >"$TMP/c.img"
zstd -q -T0 "$TMP/c.img" -o "$WWW/c.img.zst"
sum=$(sha512sum "$TMP/c.img" | cut -d' ' -f1)
drop_caches
pipe() { curl -fsS "$NGX/c.img.zst" | zstd -d | sha512sum; }
t_pipe=$(secs pipe)
zst_run() { B create cz --url "$NGX/c.img.zst" --checksum "$sum" && B status cz --wait ready --timeout 30m; }
drop_caches
t_z=$(secs zst_run)
TABLE+=("$(row "zstd download" "$t_z" "curl | zstd -d | sha512sum" "$t_pipe" "$SIZE_MIB")")

echo
echo "bifs $(git -C "$REPO" rev-parse --short HEAD), $(nproc) CPUs, sizes: upload/compressed ${SIZE_MIB} MiB, volume ${VOL_MIB} MiB (a quarter data)"
echo "| source        | bifs       | bifs rate      | baseline                           | baseline   | baseline rate  | speed |"
echo "|---------------|------------|----------------|------------------------------------|------------|----------------|-------|"
printf '%s\n' "${TABLE[@]}"
echo "qcow2 file sizes: bifs $b_size bytes, qemu-img $q_size bytes"

#!/usr/bin/env bash
# bifs nodes fetching from each other (issue 17), each figure beside its baseline from the
# same run. Needs root; installs nginx.
#
#   sudo scripts/bench-peers.sh                 # 512 MiB image; N = 2, 3, 5
#   BENCH_QUICK=1 scripts/bench-peers.sh        # 128 MiB; N = 2, 3
#
# A. A ready on node A; node B creates the same spec: B's cold sequential read and its
#    create -> ready, beside curl of A's /v1/images/NAME/data (what a peer can send), and
#    the bytes the origin sent B.
# B. N fresh nodes (each --peer to all others) create one image at once from an origin
#    limited to BENCH_RATE per connection (nginx limit_rate): the origin's bytes in total as
#    a multiple of the image, and the slowest node's time to ready beside one node alone.
source "$(dirname "$0")/bench-lib.sh"

bench_init
ensure_pkgs nginx:nginx curl:curl bc:bc
if [ "$QUICK" = 1 ]; then SIZE_MIB=${BENCH_SIZE_MIB:-128}; NS=${BENCH_NODES:-"2 3"}; else SIZE_MIB=${BENCH_SIZE_MIB:-512}; NS=${BENCH_NODES:-"2 3 5"}; fi
RATE=${BENCH_RATE:-40m}
DATA=$TMP/origin
mkdir -p "$DATA"
make_image "$DATA/img.img" $((SIZE_MIB * MIB))
SUM=$(sha512sum "$DATA/img.img" | cut -d' ' -f1)
nginx_start "$DATA"
URL=$ORIGIN/img.img

# node_start I EXTRA...: a daemon on a port picked by the caller (PORTS[I]).
node_start() {
    local i=$1
    shift
    mkdir -p "$TMP/mnt$i" "$TMP/disk$i"
    RUST_LOG=${BIFS_LOG:-warn} "$BIFS_BIN" mount --mountpoint "$TMP/mnt$i" --disk "$TMP/disk$i" \
        --listen "127.0.0.1:${PORTS[$i]}" "$@" >>"$TMP/bifs$i.log" 2>&1 &
    PIDS+=($!)
    MOUNTS+=("$TMP/mnt$i")
    local k
    for ((k = 0; k < 100; k++)); do
        curl -fs -o /dev/null "http://127.0.0.1:${PORTS[$i]}/healthz" && mountpoint -q "$TMP/mnt$i" && return 0
        sleep 0.1
    done
    die "node $i did not come up; see $TMP/bifs$i.log"
}
on() { BIFS_SERVER=http://127.0.0.1:${PORTS[$1]} "$BIFS_BIN" "${@:2}"; }
stop_all() {
    local p m
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for m in "${MOUNTS[@]}"; do mountpoint -q "$m" && umount -l "$m"; done
    PIDS=() MOUNTS=()
    rm -rf "$TMP"/disk* "$TMP"/mnt*
}
declare -a PORTS
for i in 0 1 2 3 4 5; do PORTS[$i]=$(free_port); done

# --- A. from a ready peer ---
log "A: node 0 ready, node 1 fetches from it"
node_start 0
on 0 create img --url "$URL" --checksum "$SUM" >/dev/null
on 0 status img --wait ready --timeout 10m >/dev/null
node_start 1 --peer "http://127.0.0.1:${PORTS[0]}"
drop_caches
mark=$(log_mark)
t0=$(now)
on 1 create img --url "$URL" --checksum "$SUM" >/dev/null
cold=$(timed dd_read "$TMP/mnt1/img")
on 1 status img --wait ready --timeout 10m >/dev/null
ready=$(since "$t0")
origin_b=$(log_bytes "$mark")
drop_caches
curl_t=$(timed curl -fsS -o /dev/null "http://127.0.0.1:${PORTS[0]}/v1/images/img/data")
stop_all
cold_mib=$(calc "$SIZE_MIB / $cold")
curl_mib=$(calc "$SIZE_MIB / $curl_t")

# --- B. N fresh nodes at once from a rate-limited origin ---
nginx_stop
NGINX_LIMIT_RATE=$RATE nginx_start "$DATA"
URL=$ORIGIN/img.img
declare -A total_x slowest alone
for n in 1 $NS; do
    log "B: $n node(s) at once, origin limited to $RATE per connection"
    for ((i = 0; i < n; i++)); do
        peers=()
        for ((j = 0; j < n; j++)); do [ "$j" != "$i" ] && peers+=(--peer "http://127.0.0.1:${PORTS[$j]}"); done
        node_start "$i" "${peers[@]}"
    done
    mark=$(log_mark)
    t0=$(now)
    create_pids=()
    for ((i = 0; i < n; i++)); do on "$i" create img --url "$URL" --checksum "$SUM" >/dev/null & create_pids+=($!); done
    for p in "${create_pids[@]}"; do wait "$p"; done
    wait_pids=()
    for ((i = 0; i < n; i++)); do on "$i" status img --wait ready --timeout 20m >/dev/null & wait_pids+=($!); done
    for p in "${wait_pids[@]}"; do wait "$p"; done
    slowest[$n]=$(since "$t0")
    stop_all
    total_x[$n]=$(calc "$(log_bytes "$mark") / ($SIZE_MIB * $MIB)")
done

printf '\n== bifs peers: %s MiB image, nginx on loopback (%s, load %s) ==\n' "$SIZE_MIB" "$(date -u +%FT%TZ)" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-58s %10s | %-34s %10s | %6s\n' figure value baseline value ratio
printf '%-58s %10.0f | %-34s %10.0f | %6.2f\n' "B's cold sequential read from ready peer A, MiB/s" "$cold_mib" "curl of A's /data, MiB/s" "$curl_mib" "$(calc "$cold_mib / $curl_mib")"
printf '%-58s %10.2f | %-34s %10s | %6s\n' "B's create -> ready (fetch + verify), s" "$ready" "" "" ""
printf '%-58s %10.0f | %-34s %10s | %6s\n' "bytes the origin sent B" "$origin_b" "image bytes" "$((SIZE_MIB * MIB))" "$(calc "$origin_b / ($SIZE_MIB * $MIB)")"
for n in $NS; do
    printf '%-58s %10.2f | %-34s %10.2f | %6s\n' "N=$n at once: origin bytes / image (target ~1x)" "${total_x[$n]}" "one node alone" "${total_x[1]}" ""
    printf '%-58s %10.2f | %-34s %10.2f | %6.2f\n' "N=$n at once: slowest node create -> ready, s" "${slowest[$n]}" "one node alone, s" "${slowest[1]}" "$(calc "${slowest[$n]} / ${slowest[1]}")"
done

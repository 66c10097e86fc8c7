#!/usr/bin/env bash
# The QCOW2 raw view (`<mnt>/.raw/<name>`) against what a user would run without bifs
# (issue 22): qemu-img reading the image over HTTP through qemu's own curl driver.
#
#   sudo scripts/bench-qcow2.sh            # 2 images x 3 runs of every row (~4 min)
#
# Two 1 GiB (virtual) qcow2 images, 64 KiB clusters, served by nginx on 127.0.0.1 from
# the page cache:
#   half  512 MiB of random data in every other 1 MiB, the rest unallocated (the issue's case)
#   full  1 GiB of random data, every cluster allocated
# Rows, for each image, all in the same run (medians of RUNS, min-max beside them):
#   qemu http   qemu-img convert of the URL through qemu's curl driver (readahead 4 MiB;
#               its default 256 KiB crawls) to a null-co target: a cold read of the
#               image over HTTP, decoded, nothing written. With one coroutine (-m 1):
#               with its default 8 (or 4, or 2 for the full image) the curl driver of
#               qemu 10.0.2 hung in every run here; with 1 it took 0.64-0.86 s (half) and
#               1.1-1.2 s (full). Bounded by `timeout`; a run that times out counts as
#               TIMEOUT seconds.
#   qemu local  the same convert of the local qcow2 file (page cache warm)
#   bifs cold   `bifs create`, then dd bs=1M of <mnt>/.raw/<name> as soon as the view
#               has its size, timed from the create (the background fill runs from it on,
#               as it does for a user; timed from the dd alone, the row counted none of
#               what the fill fetched while the script waited for the size, 220-540 MiB
#               of the full image): the figure the issue compares with `qemu http`
#               (target >= 0.8x)
#   bifs cold, no fill   the same after `bifs create --no-fill`: the raw view's path alone
#   bifs cold, cat       as bifs cold, read by cat (128 KiB reads)
#   after ready: first read (dd bs=1M, the .raw inode's page cache, if the view keeps
#               one, dropped first; the data file warm: the decode path), O_DIRECT (every
#               request reaches the daemon), again (dd bs=1M: from the kernel's cache of
#               the raw view, if its opens keep one)
# Each ratio is the baseline's median time over the row's median time (higher is better);
# the range beside it uses the row's min and max. "reqs" and "MiB" count what the origin
# served during the row's median run (nginx's access log).
# Correctness: the raw view of each image must equal `qemu-img convert -O raw` of it (cmp),
# read cold (right after create, --no-fill) and after ready.
#
# Env: RUNS (default 3), TIMEOUT (default 60 s), BENCH_RA_KB (the mount's kernel
# readahead in KiB, written to its bdi read_ahead_kb after the mount; default: the
# daemon's own, 1 MiB), BIFS_LOG (RUST_LOG of the daemon), BENCH_KEEP=1, BIFS_BIN,
# BENCH_NO_BUILD=1 (use BIFS_BIN as it is; default: cargo build --release first).
# CSV: target/bench/bench-qcow2.csv (and a timestamped copy).

source "$(dirname "$0")/bench-lib.sh"

RUNS=${RUNS:-3}
TIMEOUT=${TIMEOUT:-60}
VSIZE=$GIB

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then (cd "$REPO" && cargo build --release --quiet); fi
bench_init
ensure_pkgs nginx:nginx curl:curl bc:bc python3:python3 qemu-img:qemu-utils openssl:openssl

DATA=$TMP/origin
mkdir -p "$DATA"
random_stream() { openssl enc -aes-128-ctr -nosalt -pass "pass:$1" -in /dev/zero 2>/dev/null || true; }
log "making the images (1 GiB virtual each)"
random_stream full | head -c "$VSIZE" >"$TMP/full.raw"
# Random data in every other MiB of a sparse file: qemu-img leaves the zero MiBs unallocated.
random_stream half | head -c $((VSIZE / 2)) | python3 -c '
import sys
out = open(sys.argv[1], "wb"); out.truncate(int(sys.argv[2])); src = sys.stdin.buffer
for mib in range(0, int(sys.argv[2]) >> 20, 2):
    out.seek(mib << 20); out.write(src.read(1 << 20))
' "$TMP/half.raw" "$VSIZE"
for img in half full; do
    qemu-img convert -O qcow2 "$TMP/$img.raw" "$DATA/$img.qcow2"
    rm "$TMP/$img.raw"
done
nginx_start "$DATA"
cat "$DATA"/*.qcow2 >/dev/null
qemu-img info --image-opts "driver=qcow2,file.driver=http,file.url=$ORIGIN/half.qcow2" >/dev/null 2>"$TMP/qemu-http.err" ||
    die "qemu-img cannot read over HTTP ($(head -1 "$TMP/qemu-http.err")): install qemu-block-extra at qemu-utils' version (scripts/deps.sh)"

MNT=$TMP/mnt
bifs_start "$MNT" "$TMP/disk"
if [ -n "${BENCH_RA_KB:-}" ]; then
    echo "$BENCH_RA_KB" >"/sys/class/bdi/$(mountpoint -d "$MNT")/read_ahead_kb"
fi
RA_KB=$(cat "/sys/class/bdi/$(mountpoint -d "$MNT")/read_ahead_kb")
log "mount readahead: $RA_KB KiB"

# --- measuring ------------------------------------------------------------------------

declare -A T REQS MIBS # T[key]: "t1 t2 ..."; REQS/MIBS[key]: "n1 n2 ..."
# record KEY SECONDS MARK: one run's time and what the origin served since MARK.
record() {
    T[$1]+="$2 "
    local reqs bytes
    reqs=$(log_requests "$3")
    bytes=$(tail -n +"$(($3 + 1))" "$NGINX_LOG" | awk '{s += $2} END {printf "%.0f", s}')
    REQS[$1]+="$reqs "
    MIBS[$1]+="$(calc "$bytes / $MIB" | xargs printf '%.0f') "
}
# Every cold row, the baseline's and bifs', starts from the same state: caches dropped and
# the origin (and the bifs binary the script runs) read back in, as bench.sh and
# bench-compare.sh do, and memory warmed (bench-lib.sh: mem_warm; bifs fills the data
# file's page cache, qemu-img writes to null-co). Without it each row inherited what the
# row before left.
fresh_cache() { drop_caches; cat "$DATA"/*.qcow2 "$BIFS_BIN" >/dev/null; mem_warm "$(warm_mib 1024)"; }
# run_timed KEY CMD...: times CMD and records it.
run_timed() {
    local key=$1 mark t
    shift
    mark=$(log_mark)
    t=$(timed "$@")
    record "$key" "$t" "$mark"
}
qemu_http() {
    timeout "$TIMEOUT" qemu-img convert -m 1 -n --image-opts \
        "driver=qcow2,file.driver=http,file.url=$ORIGIN/$1.qcow2,file.readahead=4M" \
        --target-image-opts "driver=null-co,size=$VSIZE" ||
        { log "qemu-img over http failed or timed out after ${TIMEOUT}s"; return 0; }
}
qemu_local() {
    qemu-img convert -n -f qcow2 "$DATA/$1.qcow2" --target-image-opts "driver=null-co,size=$VSIZE"
}
cat_read() { cat "$1" >/dev/null; }
# create_read NAME IMG MODE: `bifs create` (MODE nofill: --no-fill), then the raw view read
# by dd (MODE cat: by cat) as soon as it has its size.
create_read() {
    case $3 in
    nofill) create_cold "$1" "$2" --no-fill ;;
    *) create_cold "$1" "$2" ;;
    esac
    if [ "$3" = cat ]; then cat_read "$MNT/.raw/$1"; else dd_read "$MNT/.raw/$1"; fi
}
# The image's virtual size, without a Python start per poll (bifs_field: 0.13 s, which the
# timed cold rows would count).
virtual_size() { bifs status "$1" --json 2>/dev/null | grep -o '"virtualSize": *[0-9]*' | grep -o '[0-9]*$'; }
# create_cold NAME IMG [--no-fill]: creates the image and waits until its format is
# known (block 0 present), so the kernel sees the raw view's virtual size at open.
create_cold() {
    bifs create "$1" --url "$ORIGIN/$2.qcow2" "${@:3}" >/dev/null
    local i
    for ((i = 0; i < 200; i++)); do
        [ "$(virtual_size "$1")" = "$VSIZE" ] && break
        if [ "${3:-}" = --no-fill ] && ((i == 0)); then
            # Nothing fetches block 0 without a reader: read 1 byte of the stored image.
            head -c 1 "$MNT/$1" >/dev/null
        fi
        sleep 0.01
    done
    [ "$(stat -c %s "$MNT/.raw/$1")" = "$VSIZE" ] || die "raw view of $1 is not $VSIZE bytes"
}
# The raw view's FUSE page cache dropped, the data file's kept.
drop_raw() { dd if="$1" iflag=nocache count=0 status=none; }

n=0
for ((r = 1; r <= RUNS; r++)); do
    for img in half full; do
        log "run $r/$RUNS, $img"
        fresh_cache
        run_timed "$img.qemu_http" qemu_http "$img"
        run_timed "$img.qemu_local" qemu_local "$img"
        for mode in cold nofill cat; do
            n=$((n + 1))
            name=$img-$mode-$n
            fresh_cache
            run_timed "$img.bifs_$mode" create_read "$name" "$img" "$mode"
            bifs delete "$name" >/dev/null
        done
    done
done

for img in half full; do
    qemu-img convert -O raw "$DATA/$img.qcow2" "$TMP/want.raw"
    create_cold "$img-check" "$img" --no-fill
    cmp "$MNT/.raw/$img-check" "$TMP/want.raw" || die "cold raw view of $img differs from qemu-img convert -O raw"
    bifs delete "$img-check" >/dev/null
    log "$img: after ready"
    bifs create "$img" --url "$ORIGIN/$img.qcow2" >/dev/null
    bifs status "$img" --wait ready --timeout 10m >/dev/null
    raw=$MNT/.raw/$img
    for ((r = 1; r <= RUNS; r++)); do
        drop_raw "$raw"
        run_timed "$img.ready_cold" dd_read "$raw"
        run_timed "$img.ready_direct" dd if="$raw" of=/dev/null bs=1M iflag=direct status=none
        run_timed "$img.ready_warm" dd_read "$raw"
    done
    cmp "$raw" "$TMP/want.raw" || die "raw view of $img differs from qemu-img convert -O raw"
    rm "$TMP/want.raw"
    log "$img: raw view equals qemu-img convert -O raw"
    bifs delete "$img" >/dev/null
done

# --- the table ------------------------------------------------------------------------

# stats "t1 t2 ...": "median min max"
stats() {
    # shellcheck disable=SC2086
    echo "$(median $1) $(printf '%s\n' $1 | sort -g | head -1) $(printf '%s\n' $1 | sort -g | tail -1)"
}
# The value of list $2 at the position of the median of times $1 (the median run's count).
at_median() {
    local -a t v
    read -ra t <<<"$1"
    read -ra v <<<"$2"
    local med i
    med=$(median "${t[@]}")
    for i in "${!t[@]}"; do
        [ "$(calc "${t[i]} == $med")" = 1 ] && { echo "${v[i]}"; return; }
    done
    echo "${v[0]}" # even RUNS: the median lies between two runs
}

printf '\n== qcow2 raw view, 1 GiB virtual, 64 KiB clusters; medians of %s runs; mount readahead %s KiB ==\n' "$RUNS" "$RA_KB"
printf '%-44s %7s %15s %7s | %-12s %7s %15s | %5s %6s\n' \
    "row" "median" "min-max (s)" "MiB/s" "baseline" "ratio" "ratio min-max" "reqs" "MiB"
printf '%s\n' "$(printf '%.0s-' {1..132})"
CSV_ROWS=()
line() { # IMG KEY LABEL BASEKEY TARGET
    local key=$1.$2 med lo hi bmed ratio rlo rhi mibs
    read -r med lo hi <<<"$(stats "${T[$key]}")"
    read -r bmed _ _ <<<"$(stats "${T[$1.$4]}")"
    ratio=$(calc "$bmed / $med")
    rlo=$(calc "$bmed / $hi")
    rhi=$(calc "$bmed / $lo")
    mibs=$(calc "$VSIZE / $MIB / $med")
    printf '%-44s %7.3f %7.3f-%-7.3f %7.0f | %-12s %6.2fx %6.2f-%-6.2fx | %5s %6s %s\n' \
        "$1: $3" "$med" "$lo" "$hi" "$mibs" "$4" "$ratio" "$rlo" "$rhi" \
        "$(at_median "${T[$key]}" "${REQS[$key]}")" "$(at_median "${T[$key]}" "${MIBS[$key]}")" "$5"
    CSV_ROWS+=("\"$1: $3\",$med,$lo,$hi,\"$4\",$ratio,$rlo,$rhi,$RA_KB,\"${T[$key]% }\"")
}
for img in half full; do
    line "$img" qemu_http "qemu-img convert, http (curl, ra 4M)" qemu_http ""
    line "$img" qemu_local "qemu-img convert, local file" qemu_http ""
    line "$img" bifs_cold "bifs cold .raw, dd bs=1M" qemu_http "[target >= 0.80x]"
    line "$img" bifs_nofill "bifs cold .raw, --no-fill, dd bs=1M" qemu_http ""
    line "$img" bifs_cat "bifs cold .raw, cat" qemu_http ""
    line "$img" ready_cold "ready: first read, dd bs=1M" qemu_local ""
    line "$img" ready_direct "ready: O_DIRECT, dd bs=1M" qemu_local ""
    line "$img" ready_warm "ready: again, dd bs=1M" qemu_local ""
done
stamp=$(date +%Y%m%d-%H%M%S)
{
    echo "row,median_s,min_s,max_s,baseline,ratio,ratio_min,ratio_max,readahead_kb,runs_s"
    printf '%s\n' "${CSV_ROWS[@]}"
} >"$OUT_DIR/bench-qcow2-$stamp.csv"
cp "$OUT_DIR/bench-qcow2-$stamp.csv" "$OUT_DIR/bench-qcow2.csv"
log "wrote $OUT_DIR/bench-qcow2-$stamp.csv"

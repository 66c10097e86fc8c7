#!/usr/bin/env bash
# bifs against httpdirfs and rclone mount over the same nginx origin (issue 12).
#
#   sudo scripts/bench-compare.sh            # 1 GiB and 4 GiB images, 3 runs per figure
#   BENCH_QUICK=1 scripts/bench-compare.sh   # 1 GiB only, 1 run
#
# Env: BIFS_BIN (default target/release/bifs), BENCH_RUNS, BENCH_BIG_RUNS (4 GiB rows),
# BENCH_SIZE_MIB, BENCH_BIG_MIB, BENCH_READS, BENCH_BOOT_REPS (boot-pattern samples per
# run, 5), BENCH_REMOUNT_REPS (reads after remount per run, 3), BENCH_SYSTEMS ("bifs
# httpdirfs rclone"), BENCH_OUT (default target/bench), BENCH_KEEP=1, BIFS_LOG.
#
# Each system gets a fresh cache directory for its cold runs. The page cache is dropped
# before every cold run and the origin file read back in (nginx then serves from memory,
# as a fast server would). Limits measured in the same run: curl -o /dev/null, Range GETs
# on a keep-alive connection, sha512sum and dd of a file in page cache.
# CSV: target/bench/bench-compare.csv (and a timestamped copy).

source "$(dirname "$0")/bench-lib.sh"

bench_init
ensure_pkgs nginx:nginx curl:curl bc:bc python3:python3 sha512sum:coreutils \
    httpdirfs:httpdirfs rclone:rclone fusermount3:fuse3

if [ "$QUICK" = 1 ]; then
    RUNS=${BENCH_RUNS:-1}; BIG_RUNS=${BENCH_BIG_RUNS:-0}; SIZE_MIB=${BENCH_SIZE_MIB:-1024}; NREAD=${BENCH_READS:-500}
else
    RUNS=${BENCH_RUNS:-3}; BIG_RUNS=${BENCH_BIG_RUNS:-3}; SIZE_MIB=${BENCH_SIZE_MIB:-1024}; NREAD=${BENCH_READS:-2000}
fi
BIG_MIB=${BENCH_BIG_MIB:-4096}
BOOT_REPS=${BENCH_BOOT_REPS:-5}
REMOUNT_REPS=${BENCH_REMOUNT_REPS:-3}
[ "$QUICK" = 1 ] && REMOUNT_REPS=${BENCH_REMOUNT_REPS:-1}
# Memory touched and freed before each step that fills page cache, every system alike
# (bench-lib.sh: mem_warm, warm_mib): the image and 3 GiB.
WARM_MIB=$(warm_mib "$SIZE_MIB"); BIG_WARM_MIB=$(warm_mib "$BIG_MIB")
SYSTEMS=(${BENCH_SYSTEMS:-bifs httpdirfs rclone})
SEED=42
DATA=$TMP/origin
mkdir -p "$DATA"
log "making ${SIZE_MIB} MiB$([ "$BIG_RUNS" -gt 0 ] && echo " and ${BIG_MIB} MiB") random images"
make_image "$DATA/img.img" $((SIZE_MIB * MIB))
[ "$BIG_RUNS" -gt 0 ] && make_image "$DATA/big.img" $((BIG_MIB * MIB))
make_image "$DATA/chg.img" $((256 * MIB))
declare -A SUMS
for f in img big chg; do
    [ -f "$DATA/$f.img" ] && SUMS[$f]=$(sha512sum "$DATA/$f.img" | cut -d' ' -f1)
done
nginx_start "$DATA"
echo >"$TMP/rclone.conf"
warm_origin() { cat "$DATA/$1.img" >/dev/null; }
declare -A PEAK # system -> peak RSS MiB seen

# --- mounting each system ---------------------------------------------------------------

# sys_mount SYS MNT CACHE IMG [bifs create flags...]: mounts and sets SYS_PID and FILE.
# With WARM set (MiB), memory is touched and freed once the system is up and before bifs'
# create starts its fill (bench-lib.sh: mem_warm), for the steps that fill page cache.
sys_mount() {
    local sys=$1 mnt=$2 cache=$3 img=$4 i
    shift 4
    mkdir -p "$mnt" "$cache"
    case $sys in
    bifs)
        bifs_start "$mnt" "$cache"
        SYS_PID=$BIFS_PID
        [ -z "${WARM:-}" ] || mem_warm "$WARM"
        if ! bifs status "$img" >/dev/null 2>&1; then
            bifs create "$img" --url "$ORIGIN/$img.img" --checksum "${SUMS[$img]}" "$@" >/dev/null
        fi
        FILE=$mnt/$img
        return 0
        ;;
    httpdirfs)
        httpdirfs -f --cache --cache-location "$cache" --no-range-check "$ORIGIN/" "$mnt" \
            >>"$TMP/httpdirfs.log" 2>&1 &
        ;;
    rclone)
        rclone mount ":http:" "$mnt" --http-url "$ORIGIN/" --config "$TMP/rclone.conf" \
            --vfs-cache-mode full --cache-dir "$cache" --read-only \
            --log-level ERROR >>"$TMP/rclone.log" 2>&1 &
        ;;
    esac
    SYS_PID=$!
    PIDS+=("$SYS_PID")
    MOUNTS+=("$mnt")
    FILE=$mnt/$img.img
    for ((i = 0; i < 200; i++)); do
        if mountpoint -q "$mnt" && [ -e "$FILE" ]; then
            [ -z "${WARM:-}" ] || mem_warm "$WARM"
            return 0
        fi
        kill -0 "$SYS_PID" 2>/dev/null || die "$sys exited; see $TMP/$sys.log"
        sleep 0.1
    done
    die "$sys did not mount $mnt"
}

sys_umount() { # SYS MNT: records the peak RSS, then unmounts and waits for the daemon
    local rss
    rss=$(peak_rss_mib "$SYS_PID" 2>/dev/null || echo 0)
    PEAK[$1]=$(python3 -c "print(max(${PEAK[$1]:-0}, ${rss:-0}))")
    if [ "$1" = bifs ]; then
        bifs_stop
    else
        umount "$2" 2>/dev/null || umount -l "$2"
        wait_gone "$SYS_PID" 20 || kill "$SYS_PID" 2>/dev/null || true
        wait "$SYS_PID" 2>/dev/null || true
    fi
}

# Whole image local and verified. bifs: create -> ready (mounted before the clock starts).
# Others: one cold `sha512sum` through the mount (reads everything, fills their cache).
# Sets TV (seconds); runs in this shell so that cleanup and peak RSS see its daemon.
time_verified() { # SYS MNT CACHE IMG WARM_MIB
    local t0 sum
    if [ "$1" = bifs ]; then
        bifs_start "$2" "$3"; SYS_PID=$BIFS_PID
        mem_warm "$5"
        t0=$(now)
        bifs create "$4" --url "$ORIGIN/$4.img" --checksum "${SUMS[$4]}" >/dev/null
        bifs status "$4" --wait ready --timeout 30m >/dev/null
        TV=$(since "$t0")
    else
        WARM=$5 sys_mount "$1" "$2" "$3" "$4"
        t0=$(now)
        sum=$(sha512sum "$FILE" | cut -d' ' -f1)
        TV=$(since "$t0")
        [ "$sum" = "${SUMS[$4]}" ] || log "WARNING: $1 returned wrong bytes for $4"
    fi
    sys_umount "$1" "$2"
}

# --- the runs -----------------------------------------------------------------------------
declare -A R # "figure/system" -> space separated run values
add() { R[$1/$2]="${R[$1/$2]:-} $3"; }
fresh() { rm -rf "$1"; drop_caches; warm_origin "$2"; }

for ((r = 1; r <= RUNS; r++)); do
    for sys in "${SYSTEMS[@]}"; do
        log "run $r/$RUNS: $sys, ${SIZE_MIB} MiB"
        mnt=$TMP/mnt-$sys; cache=$TMP/cache-$sys
        # Cold sequential read, warm re-read, then remount with the cache kept.
        fresh "$cache" img
        WARM=$WARM_MIB sys_mount "$sys" "$mnt" "$cache" img
        mark=$(log_mark); c0=$(cpu_secs "$SYS_PID")
        add cold "$sys" "$(timed dd_read "$FILE")"
        add cold_cpu "$sys" "$(calc "$(cpu_secs "$SYS_PID") - $c0")"
        [ "$sys" = bifs ] && bifs status img --wait ready --timeout 10m >/dev/null
        add warm "$sys" "$(timed dd_read "$FILE")"
        # The limit beside each (the origin is in page cache): a dd of the local file
        # varies 0.12-0.16 s per GiB from minute to minute on this VM kind.
        add warm local "$(timed dd_read "$DATA/img.img")"
        sys_umount "$sys" "$mnt"
        # No warm_origin here: this read must not touch the origin (the next row checks).
        # Memory is warmed once the system is up (mem_warm): page cache that comes from
        # pages the host took back costs any reader, a plain dd of a local file too, up to
        # 2.3 s per GiB more on this VM kind.
        # REMOUNT_REPS reads a run: one read of 1 GiB from disk took 0.59-0.92 s in one run.
        for ((k = 0; k < REMOUNT_REPS; k++)); do
            drop_caches
            WARM=$WARM_MIB sys_mount "$sys" "$mnt" "$cache" img
            mark=$(log_mark)
            add remount "$sys" "$(timed dd_read "$FILE")"
            sys_umount "$sys" "$mnt" # streams still open are logged when they close
            add remount_origin "$sys" "$(calc "$(log_bytes "$mark") / $MIB")"
            if [ "$sys" = bifs ]; then # its limit: the data file itself, after the same steps
                drop_caches; mem_warm "$WARM_MIB"
                add remount local "$(timed dd_read "$(bifs_data_file "$cache" img)")"
            fi
        done

        # Cold 4 KiB random reads (bifs without fill: only what is read is fetched).
        fresh "$cache" img
        sys_mount "$sys" "$mnt" "$cache" img --no-fill
        mark=$(log_mark)
        read -r p50 p99 _ < <(python3 "$TMP/randio.py" pread "$FILE" $((SIZE_MIB * MIB)) "$NREAD" "$SEED" 4096)
        add p50 "$sys" "$p50"; add p99 "$sys" "$p99"
        sys_umount "$sys" "$mnt"
        add rand_origin "$sys" "$(calc "$(log_bytes "$mark") / $MIB")"

        # VM-boot-like pattern right after create (bifs with its fill running). For bifs
        # this races the fill through the pattern's region (about 100 ms after create):
        # one binary gave medians of 0.067 and 0.129 s in two sets of 8 runs. So each
        # run takes BOOT_REPS samples, each on a fresh cache.
        for ((k = 0; k < BOOT_REPS; k++)); do
            fresh "$cache" img
            sys_mount "$sys" "$mnt" "$cache" img
            mark=$(log_mark)
            read -r t bytes < <(python3 "$TMP/bootpattern.py" "$FILE" $((SIZE_MIB * MIB)) "$SEED")
            add boot "$sys" "$t"
            sys_umount "$sys" "$mnt"
            add boot_origin "$sys" "$(calc "$(log_bytes "$mark") / $MIB")"
        done

        # Whole image local and verified.
        fresh "$cache" img
        time_verified "$sys" "$mnt" "$cache" img "$WARM_MIB"; add verified "$sys" "$TV"
        rm -rf "$cache"
    done
    # Limits, in the same run.
    drop_caches; warm_origin img
    add cold curl "$(timed curl -fsS -o /dev/null "$ORIGIN/img.img")"
    add sha local "$(timed sha512sum "$DATA/img.img")"
    read -r p50 p99 _ < <(python3 "$TMP/randio.py" rangeget "$NGINX_PORT" /img.img $((SIZE_MIB * MIB)) "$NREAD" "$SEED" 4096)
    add p50 http "$p50"; add p99 http "$p99"
    read -r t bytes < <(python3 "$TMP/bootpattern.py" "$DATA/img.img" $((SIZE_MIB * MIB)) "$SEED")
    add boot local "$t"; add boot_read mib "$(calc "$bytes / $MIB")"
done

for ((r = 1; r <= BIG_RUNS; r++)); do
    for sys in "${SYSTEMS[@]}"; do
        log "run $r/$BIG_RUNS: $sys, ${BIG_MIB} MiB"
        mnt=$TMP/mnt-$sys; cache=$TMP/cache-$sys
        fresh "$cache" big
        WARM=$BIG_WARM_MIB sys_mount "$sys" "$mnt" "$cache" big
        add big_cold "$sys" "$(timed dd_read "$FILE")"
        [ "$sys" = bifs ] && bifs status big --wait ready --timeout 30m >/dev/null
        add big_warm "$sys" "$(timed dd_read "$FILE")"
        add big_warm local "$(timed dd_read "$DATA/big.img")"
        sys_umount "$sys" "$mnt"
        fresh "$cache" big
        time_verified "$sys" "$mnt" "$cache" big "$BIG_WARM_MIB"; add big_verified "$sys" "$TV"
        rm -rf "$cache"
    done
    drop_caches; warm_origin big
    add big_cold curl "$(timed curl -fsS -o /dev/null "$ORIGIN/big.img")"
    add big_sha local "$(timed sha512sum "$DATA/big.img")"
done

# --- the origin changes between two mounts ----------------------------------------------
declare -A CHANGED
cp "$DATA/chg.img" "$TMP/chg.old"
make_image "$TMP/chg.new" $((256 * MIB))
for sys in "${SYSTEMS[@]}"; do
    log "origin changed: $sys"
    mnt=$TMP/mnt-$sys; cache=$TMP/cache-$sys
    cp "$TMP/chg.old" "$DATA/chg.img"; touch -d '-1 hour' "$DATA/chg.img"
    fresh "$cache" chg
    sys_mount "$sys" "$mnt" "$cache" chg --no-fill
    dd if="$FILE" of=/dev/null bs=1M count=64 status=none # a quarter of it gets cached
    sys_umount "$sys" "$mnt"
    cp "$TMP/chg.new" "$DATA/chg.img"; touch "$DATA/chg.img" # same size, new content and mtime
    drop_caches
    sys_mount "$sys" "$mnt" "$cache" chg
    : >"$TMP/chg.out" # a system may refuse the open itself (bifs: the origin changed)
    err=$(dd if="$FILE" of="$TMP/chg.out" bs=1M status=none 2>&1 | tail -1) || true
    read -r old new neither verdict < <(python3 "$TMP/classify.py" "$TMP/chg.out" "$TMP/chg.old" "$TMP/chg.new")
    got=$(($(stat -c %s "$TMP/chg.out") / MIB))
    if [ -n "$err" ]; then
        verdict="ERROR after $got MiB: ${err##*: }"
        [ "$sys" = bifs ] && verdict="$verdict; status: $(bifs_field chg error | cut -c1-140)"
    else
        verdict="${verdict//_/ } ($old MiB old, $new MiB new, $neither MiB neither)"
    fi
    CHANGED[$sys]=$verdict
    sys_umount "$sys" "$mnt"
    rm -rf "$cache" "$TMP/chg.out"
done

# --- the table ------------------------------------------------------------------------------
S=${SIZE_MIB}; B=${BIG_MIB}
val() { # FIGURE SYS KIND: median of the runs, shown as KIND (mibs SIZE | s | ms | mib)
    local v
    [ -n "${R[$1/$2]:-}" ] || { echo "-"; return; }
    # shellcheck disable=SC2086
    v=$(median ${R[$1/$2]})
    case $3 in
    mibs) fmt "$(calc "$4 / $v")" 0 ;;
    ms) fmt "$v" 3 ;;
    mib) fmt "$v" 1 ;;
    *) fmt "$v" 2 ;;
    esac
}
TROWS=()
trow() { # LABEL UNIT FIG KIND [SIZE] LIMIT_LABEL LIMIT_FIG LIMIT_SYS
    local label=$1 unit=$2 fig=$3 kind=$4 size=$5 ll=$6 lf=$7 lsys=$8 line sys lim="-"
    line="$label|$unit"
    for sys in "${SYSTEMS[@]}"; do line="$line|$(val "$fig" "$sys" "$kind" "$size")"; done
    [ -n "$lf" ] && lim=$(val "$lf" "$lsys" "$kind" "$size")
    TROWS+=("$line|$ll|$lim")
    CSV_ROWS+=("\"$label\",$unit,$(printf '%s,' "${line#*|*|}" | tr '|' ','),\"$ll\",$lim")
}
trow "cold sequential read (dd bs=1M), $S MiB" MiB/s cold mibs "$S" "curl -o /dev/null" cold curl
trow "  daemon CPU seconds during it" s cold_cpu s "" "" "" ""
trow "warm re-read (same mount)" MiB/s warm mibs "$S" "dd of a file in page cache" warm local
trow "after unmount+remount (cache kept, cold)" MiB/s remount mibs "$S" "dd of bifs' data file, same steps" remount local
trow "  origin MiB sent for that read" MiB remount_origin mib "" "0 (all cached)" "" ""
trow "cold 4 KiB random read p50 ($NREAD reads)" ms p50 ms "" "Range GET, keep-alive" p50 http
trow "cold 4 KiB random read p99" ms p99 ms "" "Range GET, keep-alive" p99 http
trow "  origin MiB sent for them ($(calc "$NREAD * 4 / 1024" | xargs printf '%.1f') MiB asked)" MiB rand_origin mib "" "" "" ""
trow "VM-boot-like pattern, total ($BOOT_REPS per run)" s boot s "" "same pattern on a local file" boot local
trow "  origin MiB sent until unmount (bifs: fill on)" MiB boot_origin mib "" "MiB the pattern reads" boot_read mib
trow "create -> whole image local + verified" s verified s "" "sha512sum of a page-cached file" sha local
if [ "$BIG_RUNS" -gt 0 ]; then
    trow "cold sequential read, $B MiB" MiB/s big_cold mibs "$B" "curl -o /dev/null" big_cold curl
    trow "warm re-read, $B MiB" MiB/s big_warm mibs "$B" "dd of a file in page cache" big_warm local
    trow "create -> whole image local + verified, $B MiB" s big_verified s "" "sha512sum of a page-cached file" big_sha local
fi
line="daemon peak RSS (VmHWM, all of the above)|MiB"
for sys in "${SYSTEMS[@]}"; do line="$line|$(fmt "${PEAK[$sys]:-0}" 1)"; done
TROWS+=("$line|-|-")
CSV_ROWS+=("\"peak RSS\",MiB,$(for sys in "${SYSTEMS[@]}"; do printf '%s,' "${PEAK[$sys]:-0}"; done)\"-\",-")

hdr=$(printf '%-52s %-6s' figure unit)
for sys in "${SYSTEMS[@]}"; do hdr="$hdr$(printf ' %11s' "$sys")"; done
printf '\n== bifs vs httpdirfs vs rclone: nginx on loopback, median of %s runs (%s MiB) / %s (%s MiB); %s, %s cores, load %s ==\n' \
    "$RUNS" "$S" "$BIG_RUNS" "$B" "$(date -u +%FT%TZ)" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%s | %-32s %10s\n' "$hdr" "limit (same run)" value
printf '%s\n' "$(printf '%.0s-' {1..140})"
for line in "${TROWS[@]}"; do
    IFS='|' read -r -a f <<<"$line"
    out=$(printf '%-52s %-6s' "${f[0]}" "${f[1]}")
    for ((i = 0; i < ${#SYSTEMS[@]}; i++)); do out="$out$(printf ' %11s' "${f[$((i + 2))]}")"; done
    printf '%s | %-32s %10s\n' "$out" "${f[-2]}" "${f[-1]}"
done
printf '\norigin replaced (same size, new content) between two mounts, a quarter read before:\n'
for sys in "${SYSTEMS[@]}"; do
    printf '  %-10s %s\n' "$sys" "${CHANGED[$sys]}"
    CSV_ROWS+=("\"origin changed\",-,\"$sys\",\"${CHANGED[$sys]//\"/\'}\"")
done
printf '\nnotes: bifs hashes SHA-512 in-process with OpenSSL (about 1.5x sha512sum on this CPU, see src/core/verify.rs);\n'
printf 'httpdirfs runs with --cache --no-range-check; rclone with --vfs-cache-mode full; raw runs in the CSV.\n'
for k in "${!R[@]}"; do CSV_ROWS+=("\"raw $k\",-,\"${R[$k]# }\""); done
write_csv bench-compare

#!/usr/bin/env bash
# bifs against the limits of this machine (issues 2 and 11).
#
#   sudo scripts/bench.sh                 # 1 GiB image, 3 runs per figure (~10 min)
#   BENCH_QUICK=1 scripts/bench.sh        # 256 MiB, 1 run, 500 random reads (~2 min)
#
# Env: BIFS_BIN (default target/release/bifs), BENCH_RUNS, BENCH_SIZE_MIB, BENCH_BIG_MIB,
# BENCH_READS, BENCH_OUT (default target/bench), BENCH_KEEP=1 (keep the work dir),
# BIFS_LOG (RUST_LOG of the daemon, default warn), BENCH_SECTIONS (default ABCDEFG: which
# of the sections below to run; the table shows the rows of those), BENCH_PAIRS (pairs of
# reads a run in the rows that swing most with this VM kind's memory, default 5).
#
# Every figure is the median of the runs, printed beside a baseline measured in the same
# runs on the same origin. The origin is nginx on 127.0.0.1 serving from page cache (the
# page cache is dropped before each cold run and the origin file read back in, so the
# origin behaves as a fast server and the figures show bifs' own overhead).
# CSV: target/bench/bench.csv (and a timestamped copy).

source "$(dirname "$0")/bench-lib.sh"

bench_init
ensure_pkgs nginx:nginx curl:curl bc:bc python3:python3 sha512sum:coreutils pidstat:sysstat

if [ "$QUICK" = 1 ]; then
    RUNS=${BENCH_RUNS:-1}; SIZE_MIB=${BENCH_SIZE_MIB:-256}; BIG_MIB=${BENCH_BIG_MIB:-1024}; NREAD=${BENCH_READS:-500}
else
    RUNS=${BENCH_RUNS:-3}; SIZE_MIB=${BENCH_SIZE_MIB:-1024}; BIG_MIB=${BENCH_BIG_MIB:-4096}; NREAD=${BENCH_READS:-2000}
fi
SIZE=$((SIZE_MIB * MIB))
SEED=42
DATA=$TMP/origin
mkdir -p "$DATA"
log "making ${SIZE_MIB} MiB and ${BIG_MIB} MiB random images"
make_image "$DATA/img.img" "$SIZE"
make_image "$DATA/big.img" $((BIG_MIB * MIB))
SUM=$(sha512sum "$DATA/img.img" | cut -d' ' -f1)
BIGSUM=$(sha512sum "$DATA/big.img" | cut -d' ' -f1)
nginx_start "$DATA"
URL=$ORIGIN/img.img
warm_origin() { cat "$DATA/${1:-img.img}" >/dev/null; }

SECTIONS=${BENCH_SECTIONS:-ABCDEFG}
on() { [[ $SECTIONS == *"$1"* ]]; }
BIG=$((BIG_MIB * MIB))
# wait_fetching NAME: until the image's fill has fetched its first bytes (bounded).
wait_fetching() {
    local i
    for ((i = 0; i < 200; i++)); do
        [ "$(bifs_field "$1" bytesFetched)" -gt 0 ] && return 0
        sleep 0.05
    done
    die "the fill of $1 did not start"
}
# loop_attach FILE: a read-only loop device over FILE (printed); detached on exit.
LOOPS=()
loop_attach() { local d; d=$(losetup -r -f --show "$1") || die "losetup $1 failed"; LOOPS+=("$d"); echo "$d"; }
loop_detach() { losetup -d "$1"; }
trap 'rc=$?; for d in "${LOOPS[@]}"; do losetup -d "$d" 2>/dev/null; done; (exit $rc); bench_cleanup' EXIT

# Pairs of reads per run in the rows that swing most with the VM's memory (A's cold read
# against curl -o F and the first read after ready, G), default 5.
PAIRS=${BENCH_PAIRS:-5}
[ "$QUICK" = 1 ] && PAIRS=${BENCH_PAIRS:-1}
# Memory touched and freed right before each step that fills page cache, on both sides
# (bench-lib.sh: mem_warm, warm_mib): the image and 3 GiB.
WARM_MIB=$(warm_mib "$SIZE_MIB")
# a_bifs_cold TAG: a cold sequential read of img right after its create (the fill runs),
# with the daemon's CPU and the origin's requests during it; then, once ready, the first
# read (the switch to passthrough) beside its limit, the origin file in page cache (a dd
# of it varies 0.12-0.16 s per GiB from minute to minute on this VM kind). The daemon
# stays up (a_bifs_done stops it).
a_bifs_cold() {
    local mark c0 t reqs med
    drop_caches; warm_origin
    bifs_start "$TMP/mnt-a$1" "$TMP/disk-a$1"
    mem_warm "$WARM_MIB"
    bifs create img --url "$URL" --checksum "$SUM" >/dev/null
    mark=$(log_mark); c0=$(cpu_secs "$BIFS_PID")
    t=$(timed dd_read "$TMP/mnt-a$1/img"); cold+=("$t")
    cold_cpu+=("$(calc "($(cpu_secs "$BIFS_PID") - $c0) / $t * 100")")
    read -r reqs med _ < <(log_sizes "$mark"); cold_reqs+=("$reqs"); cold_req_med+=("$med")
    bifs status img --wait ready --timeout 10m >/dev/null
    warm+=("$(timed dd_read "$TMP/mnt-a$1/img")")
    local_t+=("$(timed dd_read "$DATA/img.img")")
}
a_bifs_done() { bifs_stop; rm -rf "$TMP/disk-a$1"; }
a_bifs_pair() { a_bifs_cold "$r-$p"; a_bifs_done "$r-$p"; } # pair p's bifs side (in_turn)
# The steady state's two sides (the daemon of run r still up).
a_warm2() { warm2+=("$(timed dd_read "$TMP/mnt-a$r/img")"); }
a_local2() { local2+=("$(timed dd_read "$DATA/img.img")"); }
# a_curl_file: the same bytes downloaded into a file (page cache), then made durable, as
# bifs makes every block before it says ready.
a_curl_file() {
    local t0
    drop_caches; warm_origin; mem_warm "$WARM_MIB"
    t0=$(now); curl -fsS -o "$TMP/dl.img" "$URL"; dlf_t+=("$(since "$t0")")
    sync -d "$TMP/dl.img"; dl_t+=("$(since "$t0")")
    rm -f "$TMP/dl.img"
}
# g_read mount|data: section G's read of the ready image through a restarted daemon, or
# of its data file, after the same steps.
g_read() {
    drop_caches
    bifs_start "$TMP/mnt-g$r" "$TMP/disk-g$r"
    mem_warm "$WARM_MIB"
    if [ "$1" = mount ]; then
        remount+=("$(timed dd_read "$TMP/mnt-g$r/img")")
    else
        datafile+=("$(timed dd_read "$(bifs_data_file "$TMP/disk-g$r" img)")")
    fi
    bifs_stop
}
g_read_mount() { g_read mount; }
g_read_data() { g_read data; }
declare -a fp50 fp99 fcount frate fheld xp99 nfp99 bhp99 ohp99 mp99 mampl lp99 lampl bp99 bampl remount datafile
declare -a dl_t dlf_t warm2 local2 cold curl_t warm local_t ready sha_t base_ready p50 p99 hp50 hp99 ampl fetched_ampl \
    cold_cpu cold_reqs cold_req_med ready_cpu rss1 rss4
n=0
for ((r = 1; r <= RUNS; r++)); do
    log "run $r/$RUNS"
    if on A; then
    # A. cold sequential read right after create (the fill runs alongside), then warm
    #    re-reads, against curl -o F and the local file, in PAIRS pairs a run in
    #    alternating order: both sides fill 1 GiB of page cache, whose cost on this VM
    #    kind swings with the host (mem_warm takes out most of that, not all), and a 0.13 s
    #    warm read is slowed by a quarter by a hiccup of the host (either side, 1 read in 6
    #    or so), so each row's median is over all pairs.
    a_bifs_cold "$r"
    # The steady state: PAIRS more pairs of warm reads, alternating (0.13 s each).
    for ((p = 0; p < PAIRS; p++)); do in_turn $((r + p)) a_local2 a_warm2; done
    a_bifs_done "$r"
    drop_caches; warm_origin
    curl_t[n]=$(timed curl -fsS -o /dev/null "$URL")
    sha_t[n]=$(timed sha512sum "$DATA/img.img")
    base_ready[n]=$(python3 -c "print(max(${curl_t[n]}, ${sha_t[n]}))")
    a_curl_file
    for ((p = 1; p < PAIRS; p++)); do in_turn $((r + p)) a_curl_file a_bifs_pair; done
    fi

    if on B; then
    # B. create -> ready (fetch everything, verify, flush), nothing else reading.
    drop_caches; warm_origin
    bifs_start "$TMP/mnt-b$r" "$TMP/disk-b$r"
    mem_warm "$WARM_MIB"
    c0=$(cpu_secs "$BIFS_PID"); t0=$(now)
    bifs create img --url "$URL" --checksum "$SUM" >/dev/null
    bifs status img --wait ready --timeout 10m >/dev/null
    ready[n]=$(since "$t0")
    ready_cpu[n]=$(calc "($(cpu_secs "$BIFS_PID") - $c0) / ${ready[n]} * 100")
    bifs_stop; rm -rf "$TMP/disk-b$r"
    fi

    if on C; then
    # C. 4 KiB cold random reads, no fill, against Range GETs of the same offsets.
    drop_caches; warm_origin
    bifs_start "$TMP/mnt-c$r" "$TMP/disk-c$r"
    bifs create img --url "$URL" --no-fill >/dev/null
    f0=$(bifs_field img bytesFetched); mark=$(log_mark)
    read -r p50[n] p99[n] _ < <(python3 "$TMP/randio.py" pread "$TMP/mnt-c$r/img" "$SIZE" "$NREAD" "$SEED" 4096)
    sent=$(log_bytes "$mark")
    ampl[n]=$(calc "$sent / ($NREAD * 4096)")
    fetched_ampl[n]=$(calc "($(bifs_field img bytesFetched) - $f0) / ($NREAD * 4096)")
    bifs_stop; rm -rf "$TMP/disk-c$r"
    read -r hp50[n] hp99[n] _ < <(python3 "$TMP/randio.py" rangeget "$NGINX_PORT" /img.img "$SIZE" "$NREAD" "$SEED" 4096)
    fi

    if on D; then
    # D. daemon peak RSS: fill + a full read through the mount + verify, small and big image.
    for which in img big; do
        drop_caches; warm_origin "$which.img"
        bifs_start "$TMP/mnt-d$r" "$TMP/disk-d$r"
        sum=$SUM; [ "$which" = big ] && sum=$BIGSUM
        bifs create "$which" --url "$ORIGIN/$which.img" --checksum "$sum" >/dev/null
        dd_read "$TMP/mnt-d$r/$which"
        bifs status "$which" --wait ready --timeout 20m >/dev/null
        if [ "$which" = img ]; then rss1[n]=$(peak_rss_mib "$BIFS_PID"); else rss4[n]=$(peak_rss_mib "$BIFS_PID"); fi
        bifs_stop; rm -rf "$TMP/disk-d$r"
    done
    fi

    if on E; then
    # E. 4 KiB cold random reads while the background fill runs, on the big image so the
    #    fill lasts through the reads (only reads made while it runs count), against the
    #    same reads with no fill and Range GETs of the same offsets; then reads of another
    #    image (no fill of its own) while the big image fills.
    drop_caches; warm_origin big.img
    bifs_start "$TMP/mnt-e$r" "$TMP/disk-e$r"
    bifs create big --url "$ORIGIN/big.img" --checksum "$BIGSUM" >/dev/null
    wait_fetching big
    f0=$(bifs_field big bytesFetched); h0=$(bifs_field big fillHeldMs); t0=$(now)
    read -r fp50[n] fp99[n] fcount[n] < <(python3 "$TMP/randio.py" fill "$TMP/mnt-e$r/big" "$BIG" "$NREAD" "$SEED" 4096)
    # What the fill still fetched meanwhile (it gives way to such readers): all bytes
    # fetched over the reads' time, the reads' own (16 KiB or less each) included.
    frate[n]=$(calc "($(bifs_field big bytesFetched) - $f0) / $MIB / $(since "$t0")")
    fheld[n]=$(calc "($(bifs_field big fillHeldMs) - $h0) / 10 / $(since "$t0")") # % of the time
    bifs_stop; rm -rf "$TMP/disk-e$r"
    drop_caches; warm_origin big.img
    bifs_start "$TMP/mnt-e$r" "$TMP/disk-e$r"
    bifs create big --url "$ORIGIN/big.img" --no-fill >/dev/null
    read -r _ nfp99[n] _ < <(python3 "$TMP/randio.py" pread "$TMP/mnt-e$r/big" "$BIG" "${fcount[n]}" "$SEED" 4096 far)
    bifs_stop; rm -rf "$TMP/disk-e$r"
    read -r _ bhp99[n] _ < <(python3 "$TMP/randio.py" rangeget "$NGINX_PORT" /big.img "$BIG" "${fcount[n]}" "$SEED" 4096 far)
    # The origin's own tail while a fill streams from it: the same Range GETs from outside
    # the daemon (one nginx worker serves the fill's streams and these).
    drop_caches; warm_origin big.img
    bifs_start "$TMP/mnt-e$r" "$TMP/disk-e$r"
    bifs create big --url "$ORIGIN/big.img" --checksum "$BIGSUM" >/dev/null
    wait_fetching big
    read -r _ ohp99[n] _ < <(python3 "$TMP/randio.py" rangeget "$NGINX_PORT" /big.img "$BIG" "${fcount[n]}" "$SEED" 4096 far)
    bifs_stop; rm -rf "$TMP/disk-e$r"
    # Another image's fill: reads of img (no fill of its own) while big fills on the node.
    drop_caches; warm_origin; warm_origin big.img
    bifs_start "$TMP/mnt-e$r" "$TMP/disk-e$r"
    bifs create img --url "$URL" --no-fill >/dev/null
    bifs create big --url "$ORIGIN/big.img" --checksum "$BIGSUM" >/dev/null
    wait_fetching big
    read -r _ xp99[n] _ < <(python3 "$TMP/randio.py" pread "$TMP/mnt-e$r/img" "$SIZE" "$NREAD" "$SEED" 4096)
    [ "$(bifs_field big state)" = in-progress ] || log "warning: big's fill ended before img's reads did (run $r)"
    bifs_stop; rm -rf "$TMP/disk-e$r"
    fi

    if on F; then
    # F. 4 KiB random reads through the page cache of the mount (mmap page faults) and
    #    through a loop device on the image (O_DIRECT, and buffered as a filesystem on
    #    it would read), no fill: origin bytes per read. One image each, so no reads
    #    share fetched blocks.
    drop_caches; warm_origin
    bifs_start "$TMP/mnt-f$r" "$TMP/disk-f$r"
    for im in m l b; do bifs create "$im" --url "$URL" --no-fill >/dev/null; done
    mark=$(log_mark)
    read -r _ mp99[n] _ < <(python3 "$TMP/randio.py" mmap "$TMP/mnt-f$r/m" "$SIZE" "$NREAD" "$((SEED + 1))" 4096)
    mampl[n]=$(calc "$(log_bytes "$mark") / $NREAD")
    dev=$(loop_attach "$TMP/mnt-f$r/l"); mark=$(log_mark)
    read -r _ lp99[n] _ < <(python3 "$TMP/randio.py" direct "$dev" "$SIZE" "$NREAD" "$((SEED + 2))" 4096)
    lampl[n]=$(calc "$(log_bytes "$mark") / $NREAD")
    loop_detach "$dev"
    dev=$(loop_attach "$TMP/mnt-f$r/b"); mark=$(log_mark)
    read -r _ bp99[n] _ < <(python3 "$TMP/randio.py" pread "$dev" "$SIZE" "$NREAD" "$((SEED + 3))" 4096)
    bampl[n]=$(calc "$(log_bytes "$mark") / $NREAD")
    loop_detach "$dev"
    bifs_stop; rm -rf "$TMP/disk-f$r"
    fi

    if on G; then
    # G. a ready image after the daemon restarts, caches dropped, against the data file
    #    itself read after drop_caches. The restart comes right after ready.
    drop_caches; warm_origin
    bifs_start "$TMP/mnt-g$r" "$TMP/disk-g$r"
    bifs create img --url "$URL" --checksum "$SUM" >/dev/null
    bifs status img --wait ready --timeout 10m >/dev/null
    bifs_stop
    # Then PAIRS pairs of reads, in alternating order, each after the same steps
    # (drop_caches, a daemon start, mem_warm): on this VM kind a read's page cache costs
    # more the longer after the last free it comes (the host takes back free guest
    # memory), and bifs' read comes after a start.
    for ((p = 0; p < PAIRS; p++)); do in_turn $((r + p)) g_read_data g_read_mount; done
    rm -rf "$TMP/disk-g$r"
    fi
    n=$((n + 1))
done

# --- the table --------------------------------------------------------------------------
mibs() { calc "$SIZE_MIB / $1"; }
m() { median "$@"; }
raw() { echo "$*"; }
runs="median of $RUNS"

if on A; then
# Against a download that stores the bytes, as a cache must (issue 22: >= 1.0x), with
# curl -o /dev/null (nothing stored) beside it.
b=$(mibs "$(m "${cold[@]}")"); c=$(mibs "$(m "${dlf_t[@]}")"); ra=$(calc "$b / $c")
row "cold sequential read (dd bs=1M) after create" "$(fmt "$b" 0)" MiB/s "curl -o F (page cache, no sync)" "$(fmt "$c" 0)" \
    "$(fmt "$ra")" ">= 1.00x" "$(verdict "$ra" '>=' 1)" "$PAIRS pairs a run; bifs s: $(raw "${cold[@]}"); curl -o F s: $(raw "${dlf_t[@]}")"
c=$(mibs "$(m "${curl_t[@]}")"); ra=$(calc "$b / $c")
row "  the same, against curl -o /dev/null" "$(fmt "$b" 0)" MiB/s "curl -o /dev/null (nothing stored)" "$(fmt "$c" 0)" \
    "$(fmt "$ra")" "info" "-" "curl s: $(raw "${curl_t[@]}")"
row "  daemon CPU during that read" "$(fmt "$(m "${cold_cpu[@]}")" 0)" "%" "(of 200% on 2 cores)" "-" "-" "info" "-" "$(raw "${cold_cpu[@]}")"
row "  origin requests / median request size" "$(m "${cold_reqs[@]}")" reqs "median bytes per request" "$(m "${cold_req_med[@]}")" "-" "info" "-" \
    "requests: $(raw "${cold_reqs[@]}")"

b=$(mibs "$(m "${warm[@]}")"); c=$(mibs "$(m "${local_t[@]}")"); ra=$(calc "$b / $c")
row "warm re-read (same mount, first after ready)" "$(fmt "$b" 0)" MiB/s "local file in page cache (dd)" "$(fmt "$c" 0)" \
    "$(fmt "$ra")" ">= 0.95x" "$(verdict "$ra" '>=' 0.95)" "$PAIRS a run; bifs s: $(raw "${warm[@]}"); local s: $(raw "${local_t[@]}")"

b=$(mibs "$(m "${warm2[@]}")"); c=$(mibs "$(m "${local2[@]}")"); ra=$(calc "$b / $c")
row "  second re-read (steady state)" "$(fmt "$b" 0)" MiB/s "local file in page cache (dd)" "$(fmt "$c" 0)" \
    "$(fmt "$ra")" ">= 0.95x" "$(verdict "$ra" '>=' 0.95)" "$PAIRS a run; bifs s: $(raw "${warm2[@]}"); local s: $(raw "${local2[@]}")"
fi

if on A && on B; then
b=$(m "${ready[@]}"); c=$(m "${base_ready[@]}"); ra=$(calc "$b / $c")
row "create -> ready (fetch + SHA-512 + flush)" "$(fmt "$b")" s "max(curl, sha512sum)" "$(fmt "$c")" \
    "$(fmt "$ra")" "<= 1.10x" "$(verdict "$ra" '<=' 1.1)" "bifs: $(raw "${ready[@]}"); curl: $(raw "${curl_t[@]}"); sha512sum: $(raw "${sha_t[@]}")"
c=$(python3 -c "print(max($(m "${dl_t[@]}"), $(m "${sha_t[@]}")))"); ra=$(calc "$b / $c")
row "  the same, against a durable download" "$(fmt "$b")" s "max(curl -o F + sync -d F, sha512sum)" "$(fmt "$c")" \
    "$(fmt "$ra")" "info" "-" "curl+fdatasync: $(raw "${dl_t[@]}")"
row "  daemon CPU during create -> ready" "$(fmt "$(m "${ready_cpu[@]}")" 0)" "%" "(of 200% on 2 cores)" "-" "-" "info" "-" "$(raw "${ready_cpu[@]}")"
fi

if on C; then
b=$(m "${p50[@]}"); c=$(m "${hp50[@]}"); ra=$(calc "$b / $c")
row "4 KiB cold random read p50 ($NREAD reads)" "$(fmt "$b" 3)" ms "4 KiB Range GET, keep-alive" "$(fmt "$c" 3)" \
    "$(fmt "$ra")" "info" "-" "bifs: $(raw "${p50[@]}"); http: $(raw "${hp50[@]}")"
b=$(m "${p99[@]}"); c=$(m "${hp99[@]}"); ra=$(calc "$b / $c")
row "4 KiB cold random read p99" "$(fmt "$b" 3)" ms "4 KiB Range GET, keep-alive" "$(fmt "$c" 3)" \
    "$(fmt "$ra")" "<= 2.00x" "$(verdict "$ra" '<=' 2)" "bifs: $(raw "${p99[@]}"); http: $(raw "${hp99[@]}")"
b=$(m "${ampl[@]}")
row "origin amplification (nginx bytes / asked)" "$(fmt "$b")" x "Range GETs of the same offsets" "1.00" \
    "$(fmt "$b")" "<= 16x" "$(verdict "$b" '<=' 16)" "nginx: $(raw "${ampl[@]}"); bytesFetched: $(raw "${fetched_ampl[@]}")"
fi

if on D; then
b=$(m "${rss1[@]}")
row "daemon peak RSS (VmHWM), ${SIZE_MIB} MiB image" "$(fmt "$b" 1)" MiB "limit" "64" "$(fmt "$(calc "$b / 64")")" "< 64 MiB" \
    "$(verdict "$b" '<' 64)" "$(raw "${rss1[@]}")"
c=$(m "${rss4[@]}"); ra=$(calc "$c / $b")
row "daemon peak RSS (VmHWM), ${BIG_MIB} MiB image" "$(fmt "$c" 1)" MiB "the ${SIZE_MIB} MiB image" "$(fmt "$b" 1)" \
    "$(fmt "$ra")" "+<=16, <64 MiB" "$( [ "$(verdict "$c" '<' 64)" = ok ] && verdict "$(calc "$c - $b")" '<=' 16 || echo MISS)" "$(raw "${rss4[@]}")"

fi

if on E; then
b=$(m "${fp99[@]}"); c=$(m "${bhp99[@]}"); ra=$(calc "$b / $c")
row "4 KiB random read p99 while the fill runs" "$(fmt "$b" 3)" ms "4 KiB Range GET, keep-alive" "$(fmt "$c" 3)" \
    "$(fmt "$ra")" "<= 4.00x" "$(verdict "$ra" '<=' 4)" "bifs: $(raw "${fp99[@]}"); http: $(raw "${bhp99[@]}"); reads during the fill: $(raw "${fcount[@]}")"
c=$(m "${nfp99[@]}"); ra=$(calc "$b / $c")
row "  the same reads, no fill running" "$(fmt "$c" 3)" ms "(fill on / fill off)" "-" "$(fmt "$ra")" "info" "-" \
    "no fill: $(raw "${nfp99[@]}"); p50 with fill: $(raw "${fp50[@]}")"
x=$(m "${xp99[@]}"); c=$(m "${bhp99[@]}"); ra=$(calc "$x / $c")
row "  one image read while another fills" "$(fmt "$x" 3)" ms "4 KiB Range GET, keep-alive" "$(fmt "$c" 3)" \
    "$(fmt "$ra")" "<= 4.00x" "$(verdict "$ra" '<=' 4)" "bifs: $(raw "${xp99[@]}")"
row "  fetched meanwhile (fill, and the reads' own)" "$(fmt "$(m "${frate[@]}")" 0)" MiB/s "-" "-" "-" "info" "-" \
    "MiB/s: $(raw "${frate[@]}")"
row "  fill paused for the readers (fillHeldMs)" "$(fmt "$(m "${fheld[@]}")" 0)" "%" "(of the reads' time)" "-" "-" "info" "-" \
    "%: $(raw "${fheld[@]}")"
c=$(m "${ohp99[@]}"); ra=$(calc "$b / $c")
row "  Range GET p99 from outside during a fill" "$(fmt "$c" 3)" ms "(bifs with fill / this)" "-" "$(fmt "$ra")" "info" "-" \
    "Range GET during a fill: $(raw "${ohp99[@]}")"
fi

if on F; then
kib() { calc "$1 / 1024"; }
b=$(kib "$(m "${mampl[@]}")")
pr=-; on C && pr=$(fmt "$(calc "4 * $(m "${ampl[@]}")")" 0)
row "mmap 4 KiB random read: origin KiB per read" "$(fmt "$b" 0)" KiB "pread, KiB per read (section C)" "$pr" "-" "<= 64 KiB" "$(verdict "$b" '<=' 64)" "KiB: $(raw "${mampl[@]}"); p99 ms: $(raw "${mp99[@]}")"
b=$(kib "$(m "${lampl[@]}")")
row "loop device, O_DIRECT 4 KiB: KiB per read" "$(fmt "$b" 0)" KiB "-" "-" "-" "<= 64 KiB" "$(verdict "$b" '<=' 64)" \
    "bytes: $(raw "${lampl[@]}"); p99 ms: $(raw "${lp99[@]}")"
b=$(kib "$(m "${bampl[@]}")")
row "loop device, buffered 4 KiB: KiB per read" "$(fmt "$b" 0)" KiB "-" "-" "-" "<= 64 KiB" "$(verdict "$b" '<=' 64)" \
    "bytes: $(raw "${bampl[@]}"); p99 ms: $(raw "${bp99[@]}")"
fi

if on G; then
b=$(mibs "$(m "${remount[@]}")"); c=$(mibs "$(m "${datafile[@]}")"); ra=$(calc "$b / $c")
row "read after restart, caches dropped" "$(fmt "$b" 0)" MiB/s "dd of the data file, caches dropped" "$(fmt "$c" 0)" \
    "$(fmt "$ra")" ">= 0.90x" "$(verdict "$ra" '>=' 0.9)" "$PAIRS pairs a run; bifs s: $(raw "${remount[@]}"); data file s: $(raw "${datafile[@]}")"
fi

print_table "bifs vs this machine's limits: ${SIZE_MIB} MiB random image, nginx on loopback, $runs ($(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
write_csv bench

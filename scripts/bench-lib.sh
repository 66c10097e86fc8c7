# shellcheck shell=bash
# Shared helpers for scripts/bench.sh and scripts/bench-compare.sh (sourced, not run).
#
# Everything stays on loopback: nginx listens on 127.0.0.1 with its own config in a
# temp dir, daemons bind 127.0.0.1, and `bench_cleanup` (installed as an EXIT trap by
# `bench_init`) unmounts every FUSE mount, kills every daemon and stops nginx.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIFS_BIN=${BIFS_BIN:-$REPO/target/release/bifs}
OUT_DIR=${BENCH_OUT:-$REPO/target/bench}
QUICK=${BENCH_QUICK:-0}
MIB=$((1024 * 1024))
GIB=$((1024 * MIB))

MOUNTS=()   # FUSE mountpoints to unmount on exit
PIDS=()     # daemons to kill on exit
ROWS=()     # table rows: "label|value|unit|baseline label|baseline value|ratio|target|verdict"
CSV_ROWS=() # csv lines

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- setup and teardown ---------------------------------------------------------------

need_root() { [ "$(id -u)" = 0 ] || die "run as root (drop_caches, FUSE mounts, apt-get)"; }

# ensure_pkgs CMD:PKG...  installs PKG from Debian when CMD is missing.
ensure_pkgs() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >"$TMP/apt.log" 2>&1; then
        apt-get update >>"$TMP/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >>"$TMP/apt.log" 2>&1 ||
            die "apt-get install ${missing[*]} failed; see $TMP/apt.log"
    fi
    # The Debian nginx package starts the system nginx; we only want ours.
    if [[ " ${missing[*]} " == *" nginx "* ]] && [ -f /run/nginx.pid ]; then
        nginx -s stop 2>/dev/null || true
    fi
}

bench_init() {
    need_root
    [ -x "$BIFS_BIN" ] || die "no bifs binary at $BIFS_BIN: run 'cargo build --release' or set BIFS_BIN"
    TMP=$(mktemp -d "${BENCH_TMP:-/var/tmp}/bifs-bench.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$OUT_DIR"
    write_tools
    log "work dir $TMP, bifs $BIFS_BIN"
}

bench_cleanup() {
    local rc=$? m p
    set +e
    rm -f /dev/shm/bifs-bench-warm
    for m in "${MOUNTS[@]}"; do
        mountpoint -q "$m" 2>/dev/null && { umount "$m" 2>/dev/null || umount -l "$m"; }
    done
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null && wait_gone "$p" 10
        kill -9 "$p" 2>/dev/null
    done
    for m in "${MOUNTS[@]}"; do
        mountpoint -q "$m" 2>/dev/null && umount -l "$m"
    done
    nginx_stop
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit $rc
}

wait_gone() { # pid seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    return 1
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# mem_warm MIB: touches MIB of memory and frees it, just before a timed step that fills
# page cache (the freed pages are the next ones handed out). On this VM kind the host
# takes back guest memory that stays free for 1-2 s, and a first touch of such a page
# costs about 2.3 s per GiB: a 1 GiB dd into a new file took 0.39-0.42 s right after
# this, 1.4-1.5 s 2-3 s after it, and 2.6-2.8 s after 5 s idle without it (5 rounds
# each). Whether a step got such pages followed how long after the last free
# (drop_caches, a daemon start, a mount) it began, so one side of a comparison or the
# other lost 2-7x at random. Both sides of every comparison that fills page cache get it.
# How much (warm_mib): the guest reports freed memory to the host once over 1 GiB of it
# waits (/sys/module/page_reporting/parameters/max_waiting_mib), and a step racing that
# report still got taken pages. After drop_caches and a daemon start, a 1 GiB read from
# disk (section G) took 0.57-1.73 s (7 of 12 slow: the time goes to the copy out of page
# cache, _copy_to_iter in perf, while the disk is busy 0.5 s in every one) with 2 GiB
# touched, and 0.59-0.65 s (none slow) with 4 GiB; a 1 GiB write into page cache took
# 0.52-0.88 s and 0.39-0.50 s. The larger warm-up costs 4-7 s a step.
mem_warm() {
    local f=/dev/shm/bifs-bench-warm
    head -c "${1}M" /dev/zero >"$f"
    rm -f "$f"
}
# warm_mib SIZE_MIB: what mem_warm touches before a step that fills SIZE_MIB of page cache.
warm_mib() { echo $(($1 + 3072)); }

# in_turn N F G: runs F then G when N is odd, G then F when even. The two sides of a pair
# alternate who goes first from pair to pair, so neither always inherits the other's state.
in_turn() { if (($1 % 2)); then "$2"; "$3"; else "$3"; "$2"; fi; }

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l; }

# median N...
median() {
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {
        if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'
}

calc() { echo "scale=6; $*" | bc -l; }
fmt() { printf "%.${2:-2}f" "$1"; }

# make_image PATH BYTES: random content (urandom, so nothing compresses or dedups).
make_image() {
    head -c "$2" /dev/urandom >"$1"
}

# --- nginx ----------------------------------------------------------------------------

# nginx_start ROOT: serves ROOT on 127.0.0.1:$NGINX_PORT with an access log of
# "$status $body_bytes_sent $http_range $request_time" lines.
nginx_start() {
    NGINX_DIR=$TMP/nginx
    mkdir -p "$NGINX_DIR/tmp"
    NGINX_PORT=$(free_port)
    NGINX_LOG=$NGINX_DIR/access.log
    cat >"$NGINX_DIR/nginx.conf" <<EOF
user root root; # the work dir is 0700 and only root reads it
worker_processes 1;
daemon on;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log warn;
events { worker_connections 1024; }
http {
    types { application/octet-stream img; }
    default_type application/octet-stream;
    log_format bench '\$status \$body_bytes_sent "\$http_range" \$request_time \$request_method';
    access_log $NGINX_LOG bench;
    client_body_temp_path $NGINX_DIR/tmp/body;
    proxy_temp_path $NGINX_DIR/tmp/proxy;
    fastcgi_temp_path $NGINX_DIR/tmp/fastcgi;
    uwsgi_temp_path $NGINX_DIR/tmp/uwsgi;
    scgi_temp_path $NGINX_DIR/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $1;
        autoindex on;
        limit_rate ${NGINX_LIMIT_RATE:-0};
    }
}
EOF
    nginx -c "$NGINX_DIR/nginx.conf" -p "$NGINX_DIR" || die "nginx did not start; see $NGINX_DIR/error.log"
    ORIGIN=http://127.0.0.1:$NGINX_PORT
    local i
    for ((i = 0; i < 50; i++)); do curl -fs -o /dev/null "$ORIGIN/" && return 0; sleep 0.1; done
    die "nginx does not answer on $ORIGIN"
}

nginx_stop() {
    [ -n "${NGINX_DIR:-}" ] && [ -f "$NGINX_DIR/nginx.pid" ] || return 0
    nginx -c "$NGINX_DIR/nginx.conf" -p "$NGINX_DIR" -s stop 2>/dev/null || true
    NGINX_DIR=
}

# The access log is read from a mark: `mark=$(log_mark)`, then `log_bytes $mark`.
log_mark() { wc -l <"$NGINX_LOG"; }
# nginx logs a request when it ends: read after the client closed (e.g. after unmounting).
# printf, not print: mawk prints sums over 2^31 as 1.07374e+09.
log_bytes() { sleep 0.2; tail -n +"$(($1 + 1))" "$NGINX_LOG" | awk '{s += $2} END {printf "%.0f\n", s}'; }
log_requests() { sleep 0.2; tail -n +"$(($1 + 1))" "$NGINX_LOG" | wc -l; }
# Request sizes seen since the mark: "count median_bytes max_bytes".
log_sizes() {
    tail -n +"$(($1 + 1))" "$NGINX_LOG" | awk '$2 > 0 {print $2}' | sort -n |
        awk '{a[NR]=$1} END {if (NR) print NR, a[int((NR+1)/2)], a[NR]; else print 0, 0, 0}'
}

# --- bifs -----------------------------------------------------------------------------

# bifs_start MNT DISK: runs `bifs mount` in the background; sets BIFS_PID, BIFS_SERVER.
bifs_start() {
    mkdir -p "$1" "$2"
    local port
    port=$(free_port)
    RUST_LOG=${BIFS_LOG:-warn} "$BIFS_BIN" mount --mountpoint "$1" --disk "$2" \
        --listen "127.0.0.1:$port" >>"$TMP/bifs.log" 2>&1 &
    BIFS_PID=$!
    PIDS+=("$BIFS_PID")
    MOUNTS+=("$1")
    export BIFS_SERVER=http://127.0.0.1:$port
    local i
    for ((i = 0; i < 100; i++)); do
        if curl -fs -o /dev/null "$BIFS_SERVER/healthz" && mountpoint -q "$1"; then return 0; fi
        kill -0 "$BIFS_PID" 2>/dev/null || die "bifs mount exited; see $TMP/bifs.log"
        sleep 0.1
    done
    die "bifs mount did not come up; see $TMP/bifs.log"
}

bifs_stop() { # stops the daemon started last
    kill "$BIFS_PID" 2>/dev/null || true
    wait_gone "$BIFS_PID" 20 || kill -9 "$BIFS_PID" 2>/dev/null || true
    wait "$BIFS_PID" 2>/dev/null || true
    local m=${MOUNTS[-1]}
    mountpoint -q "$m" && { umount "$m" 2>/dev/null || umount -l "$m"; }
    return 0
}

bifs() { "$BIFS_BIN" "$@"; }
bifs_field() { # NAME FIELD
    "$BIFS_BIN" status "$1" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])"
}

# Peak resident set of a process, in MiB.
peak_rss_mib() { awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
# CPU seconds (user+system) a process has used so far.
cpu_secs() { awk '{printf "%.2f", ($14 + $15) / '"$(getconf CLK_TCK)"'}' "/proc/$1/stat"; }

# timed CMD...: prints the seconds CMD took (its stdout goes to /dev/null).
timed() {
    local t0
    t0=$(now)
    "$@" >/dev/null
    since "$t0"
}

dd_read() { dd if="$1" of=/dev/null bs=1M status=none; }

# bifs_data_file DISK NAME: where a bifs disk stores the image's bytes (disk.rs: image_dir; store.rs).
bifs_data_file() { echo "$1/images/$2/data"; }

# --- python tools ---------------------------------------------------------------------

write_tools() {
    cat >"$TMP/randio.py" <<'EOF'
# randio.py MODE ...: timed reads of BS bytes at COUNT seeded aligned offsets (the same
# offsets for the same SIZE, COUNT, SEED and BS in every mode; "far": only in the image's
# second half, where a fill from block 0 has not been yet). Prints "p50_ms p99_ms X".
#   pread FILE SIZE COUNT SEED BS [far]   os.pread; X = total seconds
#   fill FILE SIZE COUNT SEED BS          pread of the far offsets while a bifs fill is in the
#                                         first half: stops at the first look, every 10 reads,
#                                         that finds user.bifs.progress >= 45 or the state not
#                                         in-progress; X = reads done
#   mmap FILE SIZE COUNT SEED BS          slices of a shared read-only mapping (page faults,
#                                         the kernel's read-around); X = total seconds
#   direct FILE SIZE COUNT SEED BS        pread with O_DIRECT into an aligned buffer (a block
#                                         device such as a loop device); X = total seconds
#   rangeget PORT PATH SIZE COUNT SEED BS [far]
#                                         Range GETs on one keep-alive connection to nginx on
#                                         127.0.0.1; X = total seconds
import http.client, mmap, os, random, sys, time

mode, args = sys.argv[1], sys.argv[2:]
if mode == "rangeget":
    port, path, args = int(args[0]), args[1], args[2:]
else:
    path, args = args[0], args[1:]
size, n, seed, bs = (int(a) for a in args[:4])
far = mode == "fill" or args[4:5] == ["far"]
rng = random.Random(seed)
if far:
    half = size // 2 // bs * bs
    offs = [half + rng.randrange(0, (size - half) // bs) * bs for _ in range(n)]
else:
    offs = [rng.randrange(0, size // bs) * bs for _ in range(n)]

if mode == "rangeget":
    conn = http.client.HTTPConnection("127.0.0.1", port)

    def read(o):
        conn.request("GET", path, headers={"Range": f"bytes={o}-{o + bs - 1}"})
        r = conn.getresponse()
        b = r.read()
        assert r.status == 206 and len(b) == bs, (r.status, len(b))
elif mode == "mmap":
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)

    def read(o):
        assert len(m[o:o + bs]) == bs
elif mode == "direct":
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, bs)

    def read(o):
        got = os.preadv(fd, [buf], o)
        assert got == bs, (o, got)
elif mode in ("pread", "fill"):
    fd = os.open(path, os.O_RDONLY)

    def read(o):
        b = os.pread(fd, bs, o)
        assert len(b) == bs, (o, len(b))
else:
    sys.exit(f"randio.py: unknown mode {mode}")


def fill_moved_on():
    return (os.getxattr(path, "user.bifs.state") != b"in-progress"
            or float(os.getxattr(path, "user.bifs.progress")) >= 45)


lat = []
t0 = time.perf_counter()
for i, o in enumerate(offs):
    if mode == "fill" and i % 10 == 0 and fill_moved_on():
        break
    t = time.perf_counter()
    read(o)
    lat.append(time.perf_counter() - t)
total = time.perf_counter() - t0
if not lat:
    print("nan nan 0")
    sys.exit()
lat.sort()
x = len(lat) if mode == "fill" else f"{total:.4f}"
print(f"{lat[len(lat) // 2] * 1e3:.4f} {lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3:.4f} {x}")
EOF
    cat >"$TMP/bootpattern.py" <<'EOF'
# bootpattern.py FILE SIZE SEED: a VM-boot-like pattern confined to the first 10% of the
# image: 1000 small random reads (4-64 KiB, 4 KiB aligned) with, after every 200 of them,
# a sequential run of 16 MiB (less on small images) read in 128 KiB chunks (kernel, initrd, a library directory).
# Prints "total_s bytes_read".
import os, random, sys, time
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
span = size // 10
run = min(16 << 20, span // 4 // 131072 * 131072)
ops = []
for i in range(1000):
    ln = rng.choice([4096, 8192, 16384, 32768, 65536])
    ops.append((rng.randrange(0, (span - ln) // 4096) * 4096, ln))
    if i % 200 == 199:
        start = rng.randrange(0, (span - run) // 4096) * 4096
        ops += [(start + k * 131072, 131072) for k in range(run // 131072)]
fd = os.open(path, os.O_RDONLY)
t0 = time.perf_counter()
got = 0
for o, ln in ops:
    got += len(os.pread(fd, ln, o))
total = time.perf_counter() - t0
os.close(fd)
print(f"{total:.4f} {got}")
EOF
    cat >"$TMP/classify.py" <<'EOF'
# classify.py READ OLD NEW: compares what a mount returned with the old and new origin
# content, per MiB. Prints "old_mib new_mib neither_mib verdict".
import sys
a, o, n = (open(p, "rb") for p in sys.argv[1:4])
old = new = neither = 0
while True:
    x, y, z = a.read(1 << 20), o.read(1 << 20), n.read(1 << 20)
    if not y:
        break
    if x == y: old += 1
    elif x == z: new += 1
    else: neither += 1
verdict = ("stale (old content, whole)" if old and not new and not neither else
           "new content, whole" if new and not old and not neither else
           "TORN (old and new mixed)" if old and new else "garbage")
print(old, new, neither, verdict.replace(" ", "_"))
EOF
}

# --- the table ------------------------------------------------------------------------

# row LABEL VALUE UNIT BASELINE_LABEL BASELINE_VALUE RATIO TARGET VERDICT [RAW]
row() {
    ROWS+=("$1|$2|$3|$4|$5|$6|$7|$8")
    CSV_ROWS+=("\"$1\",$2,$3,\"$4\",$5,$6,\"$7\",$8,\"${9:-}\"")
}

# verdict RATIO OP LIMIT: "ok" when RATIO OP LIMIT holds (OP is >= or <=), else "MISS".
verdict() {
    local ok
    ok=$(echo "$1 $2 $3" | bc -l 2>/dev/null || echo 0)
    [ "$ok" = 1 ] && echo ok || echo MISS
}

print_table() { # TITLE
    local line
    printf '\n== %s ==\n' "$1"
    printf '%-46s %12s %-6s | %-34s %12s | %7s %-14s %s\n' \
        "figure" "value" "unit" "baseline (same run)" "value" "ratio" "target" "verdict"
    printf '%s\n' "$(printf '%.0s-' {1..150})"
    for line in "${ROWS[@]}"; do
        IFS='|' read -r a b c d e f g h <<<"$line"
        printf '%-46s %12s %-6s | %-34s %12s | %7s %-14s %s\n' "$a" "$b" "$c" "$d" "$e" "$f" "$g" "$h"
    done
}

write_csv() { # NAME
    local stamp file
    stamp=$(date +%Y%m%d-%H%M%S)
    file=$OUT_DIR/$1-$stamp.csv
    {
        echo "figure,value,unit,baseline,baseline_value,ratio,target,verdict,raw_runs"
        printf '%s\n' "${CSV_ROWS[@]}"
    } >"$file"
    cp "$file" "$OUT_DIR/$1.csv"
    log "wrote $file (and $OUT_DIR/$1.csv)"
}

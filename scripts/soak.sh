#!/usr/bin/env bash
# Long runs of the harness that beats on bifs (CI runs the short versions through
# scripts/test.sh): hundreds of kill -9 restarts, the fault tests again and again, the
# parsers with many more generated inputs, and minutes of 64 concurrent readers.
# Needs root and /dev/fuse, as scripts/test.sh. Knobs (environment):
#   SOAK_ROUNDS=10       times the fault and hostile-input tests are run
#   CRASH_KILLS=300      kill -9 restarts in the crash loop
#   PARSER_CASES=20000   generated inputs per parser property
#   LOAD_SECS=120        seconds per round of the load test (4 rounds)
#   POWER_CUTS=50        power cuts of the ext4 loop disk during a fill
#   MODEL_ITERATIONS=10000  schedules per scheduler in the model tests (CI: 100; this: ~25 min)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the tests mount FUSE" >&2; exit 1; }
: "${SOAK_ROUNDS:=10}" "${CRASH_KILLS:=300}" "${PARSER_CASES:=20000}" "${LOAD_SECS:=120}" "${POWER_CUTS:=50}"
: "${MODEL_ITERATIONS:=10000}"
export CRASH_KILLS PARSER_CASES LOAD_SECS POWER_CUTS MODEL_ITERATIONS
cargo build --tests --bins --quiet --features failpoints
run() { cargo test --quiet --features failpoints --test "$@" -- --test-threads=2 --nocapture; }
start=$(date +%s)
cargo test --quiet --features shuttle --lib model_ -- --test-threads=2 --nocapture
run crash
run powerloss
run parsers
run load
for i in $(seq 1 "$SOAK_ROUNDS"); do
    echo "== fault and hostile-input round $i of $SOAK_ROUNDS"
    run faults
    run hostile
    run hostile_cli
done
echo "soak passed in $(( $(date +%s) - start )) s"

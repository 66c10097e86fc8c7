#!/usr/bin/env bash
# Runs every test of bifs: unit tests, property tests and real-FUSE-mount tests against
# a real HTTP origin on 127.0.0.1. Needs root (FUSE mounts, loop mounts) and /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
[ "$(id -u)" = 0 ] || { echo "run as root: the tests mount FUSE and loop filesystems" >&2; exit 1; }
# Build once; every test binary shares target/. The `failpoints` feature (test-only
# crash points, src/core/failpoint.rs) is on in this one build and in the run below,
# so the binary is not built twice.
cargo build --tests --bins --quiet --features failpoints
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --features failpoints --lib --tests --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
# The model tests (src/core/model_tests.rs): the lib once more, with shuttle's locks,
# atomics and spawn in place of std's and tokio's; only those tests run in that build.
# MODEL_ITERATIONS schedules per scheduler (scripts/soak.sh runs many more).
cargo test --features shuttle --lib model_ -- --test-threads=2 2>&1 | tee -a "$log"
model_rc=${PIPESTATUS[0]}
[ "$rc" != 0 ] || rc=$model_rc
set -e
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '; ([0-9]+) failed' "$log" | grep -Eo '[0-9]+' | awk '{s+=$1} END {print s+0}')
echo
echo "bifs tests: $passed passed, $failed failed"
exit "$rc"

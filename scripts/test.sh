#!/usr/bin/env bash
# Runs every test of bifs: unit tests, property tests and real-FUSE-mount tests against
# a real HTTP origin on 127.0.0.1. Needs root (FUSE mounts, loop mounts) and /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
[ "$(id -u)" = 0 ] || { echo "run as root: the tests mount FUSE and loop filesystems" >&2; exit 1; }
# Build once; every test binary shares target/.
cargo build --tests --bins --quiet
cargo test --no-fail-fast -- --test-threads=2

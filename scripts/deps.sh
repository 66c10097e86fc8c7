#!/usr/bin/env bash
# Installs what bifs's scripts and tests need on a Debian machine, skipping what is there.
# Usage: scripts/deps.sh [extra Debian packages...]
set -euo pipefail
want=(attr curl e2fsprogs qemu-utils util-linux iproute2 gzip xz-utils zstd python3 python3-venv libssl-dev pkg-config "$@")
need=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${need[@]}" >/dev/null; }
fi
# qemu's curl driver (qemu-img over HTTP, scripts/bench-qcow2.sh) lives in qemu-block-extra,
# which must be qemu-utils' own version (apt would otherwise pick the release's and
# downgrade qemu-utils). A backports qemu-utils needs backports for it.
# Only the benchmark needs it: a failure here warns and the tests go on.
curl_driver() {
  local SUDO= qv bpo o
  [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  qv=$(dpkg-query -W -f='${Version}' qemu-utils) || return 1
  $SUDO apt-get install -y -q "qemu-block-extra=$qv" >/dev/null 2>&1 && return 0
  bpo=$(mktemp -d)
  mkdir -p "$bpo/lists/partial" "$bpo/archives/partial"
  # shellcheck disable=SC1091
  . /etc/os-release
  echo "deb http://deb.debian.org/debian ${VERSION_CODENAME}-backports main" >"$bpo/sources.list"
  o=(-o "Dir::Etc::sourcelist=$bpo/sources.list" -o "Dir::State::lists=$bpo/lists" -o "Dir::Cache::archives=$bpo/archives")
  $SUDO apt-get "${o[@]}" update -q >/dev/null 2>&1 &&
    $SUDO apt-get "${o[@]}" install -y -q --no-install-recommends "qemu-block-extra=$qv" >/dev/null 2>&1
  local rc=$?
  $SUDO rm -rf "$bpo"
  return $rc
}
if [ ! -e /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ]; then
  curl_driver || echo "qemu-block-extra (qemu-utils' version) is not installable: qemu-img cannot read over HTTP (bench-qcow2.sh needs it; the tests do not)" >&2
fi
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
fi
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }
# The offline Kubernetes schema check of deploy/kubernetes (tests/deploy.rs): the PyPI
# package kubernetes-validate ships the schemas; it lives in a venv under target/.
venv="$(cd "$(dirname "$0")/.." && pwd)/target/deploy-venv"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "installing kubernetes-validate into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==1.37.0" "PyYAML>=6"
fi

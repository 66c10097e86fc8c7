#!/usr/bin/env bash
# N network namespaces on one bridge, for multi-node tests whose nodes need distinct
# addresses (as pods on a cluster network). Needs root and iproute2.
#
#   scripts/netns-cluster.sh up N [PREFIX]     nodes PREFIX-n1..nN at 10.99.0.1..N/24
#   scripts/netns-cluster.sh down [PREFIX]     removes them all (also what `up` left half made)
#
# Run a daemon on node I with `nsenter --net=/run/netns/PREFIX-nI bifs mount ...`: it gets
# the node's network but the host's mount namespace, so its FUSE mount stays visible
# (`ip netns exec` would hide it in a private mount namespace). Traffic stays inside the
# namespaces made here. `up` cleans up after itself when any step fails.
set -euo pipefail
cmd=${1:-}
case "$cmd" in
up)
    n=${2:?usage: netns-cluster.sh up N [PREFIX]}
    prefix=${3:-bifs}
    ;;
down)
    prefix=${2:-bifs}
    ;;
*)
    echo "usage: netns-cluster.sh up N [PREFIX] | down [PREFIX]" >&2
    exit 2
    ;;
esac

down() {
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}-(hub|n[0-9]+)$" || true); do
        ip netns del "$ns" 2>/dev/null || true
    done
}

if [ "$cmd" = down ]; then
    down
    exit 0
fi

[ "$n" -ge 1 ] && [ "$n" -le 200 ] || { echo "N must be 1..200" >&2; exit 2; }
trap 'down' ERR
down
hub="${prefix}-hub"
ip netns add "$hub"
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 up
for i in $(seq 1 "$n"); do
    ns="${prefix}-n$i"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # veth: one end in the node (eth0), the other on the hub's bridge.
    ip link add "${prefix:0:6}n${i}h" type veth peer name "${prefix:0:6}n${i}e"
    ip link set "${prefix:0:6}n${i}h" netns "$hub"
    ip link set "${prefix:0:6}n${i}e" netns "$ns"
    ip -n "$ns" link set "${prefix:0:6}n${i}e" name eth0
    ip -n "$ns" addr add "10.99.0.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$hub" link set "${prefix:0:6}n${i}h" master br0
    ip -n "$hub" link set "${prefix:0:6}n${i}h" up
done
trap - ERR
echo "up: $n nodes ${prefix}-n1..${prefix}-n$n at 10.99.0.1..$n"

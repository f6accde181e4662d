#!/usr/bin/env bash
# Network-namespace NAT lab for qmesh integration tests.
#
# Usage:
#   nat-lab.sh up PREFIX KIND1 KIND2     build the lab (KIND: eim | symmetric)
#   nat-lab.sh down PREFIX               delete every PREFIX-* namespace
#   nat-lab.sh block-coordinator PREFIX  drop forwarded traffic to/from 10.77.0.1
#   nat-lab.sh unblock-coordinator PREFIX
#   nat-lab.sh rebind PREFIX             NAT 1 forgets its mappings (conntrack
#                                        flushed) and maps to ports 40000-40999
#                                        from now on: LAN 1's hosts get new
#                                        public ports mid-session
#
# Topology (every namespace and interface name starts with PREFIX):
#
#   PREFIX-coord  10.77.0.1/24 ---- 10.77.0.254 PREFIX-inet ("internet", no NAT)
#                                   10.77.1.254 ---- 10.77.1.1 PREFIX-nat1 (KIND1)
#                                   10.77.2.254 ---- 10.77.2.1 PREFIX-nat2 (KIND2)
#   PREFIX-nat1 bridge 192.168.71.1/24: PREFIX-a 192.168.71.10, PREFIX-c 192.168.71.11
#   PREFIX-nat2 bridge 192.168.72.1/24: PREFIX-b 192.168.72.10
#
# NAT kinds (nftables, on the NAT's WAN interface, for packets from its LAN):
#   eim        masquerade              (source port kept when possible:
#                                       endpoint-independent mapping)
#   symmetric  masquerade fully-random (new random public port per conntrack
#                                       entry, i.e. per destination)
# Both NATs forward LAN->WAN and established/related WAN->LAN, and drop new
# WAN->LAN connections and unsolicited packets to their WAN address (except
# ICMP echo), like a home router.
#
# Nothing is configured in the caller's own network namespace: veth pairs are
# created directly inside the lab namespaces and all sysctls/nft rules are
# applied with `ip netns exec`.
set -euo pipefail

PROG=$(basename "$0")

usage() {
    cat >&2 <<EOF
usage: $PROG up PREFIX KIND1 KIND2     (KIND: eim | symmetric)
       $PROG down PREFIX
       $PROG block-coordinator PREFIX
       $PROG unblock-coordinator PREFIX
       $PROG rebind PREFIX
PREFIX: 1-8 characters from [A-Za-z0-9_] (no '-').
EOF
    exit 2
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

check_prefix() {
    # No '-' so that "PREFIX-*" never matches another prefix's namespaces;
    # at most 8 chars so "PREFIX-xxxxx" interface names stay <= 15 chars.
    [[ $1 =~ ^[A-Za-z0-9_]{1,8}$ ]] ||
        die "invalid PREFIX '$1' (want 1-8 characters from [A-Za-z0-9_])"
}

check_kind() {
    case $1 in
    eim | symmetric) ;;
    *) die "invalid NAT kind '$1' (want 'eim' or 'symmetric')" ;;
    esac
}

# Namespaces currently named PREFIX-*.
lab_namespaces() {
    local p=$1 name
    ip netns list 2>/dev/null | while read -r name _; do
        if [[ $name == "$p"-* ]]; then
            printf '%s\n' "$name"
        fi
    done
}

cmd_down() {
    local p=$1 ns left
    while read -r ns; do
        [[ -n $ns ]] || continue
        ip netns delete "$ns" 2>/dev/null || true
    done < <(lab_namespaces "$p")
    left=$(lab_namespaces "$p")
    if [[ -n $left ]]; then
        die "down $p: could not delete namespace(s): $(echo "$left" | tr '\n' ' ')"
    fi
}

# ---------------------------------------------------------------------------
# up

UP_PREFIX=""
UP_STEP=""
UP_DONE=0

# run "step description" command... : run a step of `up`; on failure tear the
# lab down and exit non-zero naming the step (stdout of the step is dropped,
# its stderr is included in the message).
run() {
    local err
    UP_STEP=$1
    shift
    if ! err=$("$@" 2>&1 >/dev/null); then
        up_failed "$UP_STEP" "$err"
    fi
}

up_failed() {
    local step=$1 err=${2:-}
    echo "$PROG: up $UP_PREFIX failed at step: $step" >&2
    if [[ -n $err ]]; then
        printf '%s\n' "$err" | sed 's/^/    /' >&2
    fi
    UP_STEP="" # reported; the EXIT trap only tears down
    exit 1
}

# EXIT trap of `up`: if `up` did not finish (failed step, unexpected error,
# signal), report and remove whatever was built.
up_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $UP_DONE -eq 1 ]]; then
        exit "$rc"
    fi
    [[ $rc -ne 0 ]] || rc=1
    if [[ -n $UP_STEP ]]; then
        echo "$PROG: up $UP_PREFIX failed (exit $rc) during step: $UP_STEP" >&2
    fi
    cmd_down "$UP_PREFIX" >/dev/null 2>&1 || true
    echo "$PROG: lab $UP_PREFIX torn down" >&2
    exit "$rc"
}

# veth NS1 IF1 NS2 IF2: create a veth pair with one end in each namespace.
veth() {
    run "create veth $2 ($1) <-> $4 ($3)" \
        ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
}

addr() { # NS IF CIDR
    run "add address $3 to $2 in $1" ip -n "$1" addr add "$3" dev "$2"
}

link_up() { # NS IF
    run "bring up $2 in $1" ip -n "$1" link set "$2" up
}

default_route() { # NS GW
    run "default route via $2 in $1" ip -n "$1" route add default via "$2"
}

sysctl_ns() { # NS KEY=VALUE
    run "sysctl $2 in $1" ip netns exec "$1" sysctl -q -w "$2"
}

# nat_router NS WAN_IF WAN_CIDR WAN_GW BRIDGE LAN_CIDR LAN_NET KIND
nat_router() {
    local ns=$1 wan=$2 wan_cidr=$3 wan_gw=$4 br=$5 lan_cidr=$6 lan_net=$7 kind=$8
    local masq
    case $kind in
    eim) masq="masquerade" ;;
    symmetric) masq="masquerade fully-random" ;;
    esac

    addr "$ns" "$wan" "$wan_cidr"
    link_up "$ns" "$wan"
    run "create bridge $br in $ns" \
        ip -n "$ns" link add "$br" type bridge stp_state 0 forward_delay 0
    addr "$ns" "$br" "$lan_cidr"
    link_up "$ns" "$br"
    default_route "$ns" "$wan_gw"
    sysctl_ns "$ns" net.ipv4.ip_forward=1
    run "nftables NAT ($kind) in $ns" ip netns exec "$ns" nft -f - <<EOF
table ip qmesh_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "$wan" ip saddr $lan_net $masq
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iifname "$br" oifname "$wan" accept
        # only seen if br_netfilter is active: LAN-internal bridged traffic
        iifname "$br" oifname "$br" accept
    }
    # Unsolicited packets to the WAN address are dropped (not rejected) in
    # the input hook, before conntrack confirms them. Otherwise an early
    # punch packet from the peer would leave an UNREPLIED conntrack entry
    # (peer -> WAN:port) that makes the NAT pick a different public port for
    # the LAN host's own later packet to that peer, breaking hole punching.
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "$wan" ct state established,related accept
        iifname "$wan" icmp type echo-request accept
        iifname "$wan" drop
    }
}
EOF
}

# lan_host NAT_NS BRIDGE PORT_IF HOST_NS HOST_IF CIDR GW
lan_host() {
    local nat=$1 br=$2 port=$3 host=$4 hif=$5 cidr=$6 gw=$7
    veth "$nat" "$port" "$host" "$hif"
    run "attach $port to $br in $nat" ip -n "$nat" link set "$port" master "$br"
    link_up "$nat" "$port"
    addr "$host" "$hif" "$cidr"
    link_up "$host" "$hif"
    default_route "$host" "$gw"
}

cmd_up() {
    local p=$1 kind1=$2 kind2=$3
    UP_PREFIX=$p
    UP_STEP="remove previous lab $p"
    # Whatever ends `up` early (failed step, unexpected error, signal) tears
    # the lab down again.
    trap up_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    cmd_down "$p"

    local coord="$p-coord" inet="$p-inet" nat1="$p-nat1" nat2="$p-nat2"
    local a="$p-a" b="$p-b" c="$p-c" ns
    for ns in "$coord" "$inet" "$nat1" "$nat2" "$a" "$b" "$c"; do
        run "create namespace $ns" ip netns add "$ns"
        link_up "$ns" lo
    done

    # coordinator <-> internet
    veth "$coord" "$p-coord" "$inet" "$p-i0"
    addr "$coord" "$p-coord" 10.77.0.1/24
    link_up "$coord" "$p-coord"
    default_route "$coord" 10.77.0.254

    # internet router
    veth "$inet" "$p-i1" "$nat1" "$p-wan1"
    veth "$inet" "$p-i2" "$nat2" "$p-wan2"
    addr "$inet" "$p-i0" 10.77.0.254/24
    addr "$inet" "$p-i1" 10.77.1.254/24
    addr "$inet" "$p-i2" 10.77.2.254/24
    link_up "$inet" "$p-i0"
    link_up "$inet" "$p-i1"
    link_up "$inet" "$p-i2"
    sysctl_ns "$inet" net.ipv4.ip_forward=1

    # NAT routers
    nat_router "$nat1" "$p-wan1" 10.77.1.1/24 10.77.1.254 "$p-br1" \
        192.168.71.1/24 192.168.71.0/24 "$kind1"
    nat_router "$nat2" "$p-wan2" 10.77.2.1/24 10.77.2.254 "$p-br2" \
        192.168.72.1/24 192.168.72.0/24 "$kind2"

    # LAN hosts
    lan_host "$nat1" "$p-br1" "$p-pa" "$a" "$p-a" 192.168.71.10/24 192.168.71.1
    lan_host "$nat1" "$p-br1" "$p-pc" "$c" "$p-c" 192.168.71.11/24 192.168.71.1
    lan_host "$nat2" "$p-br2" "$p-pb" "$b" "$p-b" 192.168.72.10/24 192.168.72.1

    UP_DONE=1
    echo "lab $p up"
}

# ---------------------------------------------------------------------------
# block / unblock the coordinator at the internet router

require_inet() {
    local inet="$1-inet"
    ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF "$inet" ||
        die "namespace $inet does not exist (is lab $1 up?)"
}

unblock() {
    local inet="$1-inet"
    if ip netns exec "$inet" nft list table ip qmesh_block >/dev/null 2>&1; then
        ip netns exec "$inet" nft delete table ip qmesh_block ||
            die "unblock-coordinator $1: could not delete nft table qmesh_block in $inet"
    fi
}

cmd_block() {
    local p=$1 inet="$1-inet"
    require_inet "$p"
    unblock "$p" # idempotent: never stack duplicate rules
    ip netns exec "$inet" nft -f - <<'EOF' ||
table ip qmesh_block {
    chain forward {
        type filter hook forward priority filter - 10; policy accept;
        ip daddr 10.77.0.1 drop
        ip saddr 10.77.0.1 drop
    }
}
EOF
        die "block-coordinator $p: could not add nft rules in $inet"
}

cmd_unblock() {
    require_inet "$1"
    unblock "$1"
}

# ---------------------------------------------------------------------------
# NAT rebinding: NAT 1 maps to other ports and forgets its old mappings

cmd_rebind() {
    local p=$1 nat1="$1-nat1"
    ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF "$nat1" ||
        die "namespace $nat1 does not exist (is lab $p up?)"
    command -v conntrack >/dev/null ||
        die "rebind $p: conntrack is not installed (Debian package conntrack)"
    ip netns exec "$nat1" nft flush chain ip qmesh_nat postrouting ||
        die "rebind $p: could not flush the NAT rule in $nat1"
    ip netns exec "$nat1" nft add rule ip qmesh_nat postrouting \
        oifname "$p-wan1" ip saddr 192.168.71.0/24 meta l4proto udp masquerade to :40000-40999 ||
        die "rebind $p: could not add the new NAT rule in $nat1"
    ip netns exec "$nat1" nft add rule ip qmesh_nat postrouting \
        oifname "$p-wan1" ip saddr 192.168.71.0/24 masquerade ||
        die "rebind $p: could not add the NAT rule for other protocols in $nat1"
    # conntrack -F exits 0 also when it deleted entries; it prints a count.
    ip netns exec "$nat1" conntrack -F >/dev/null 2>&1 ||
        die "rebind $p: could not flush conntrack in $nat1"
}

# ---------------------------------------------------------------------------

[[ $# -ge 1 ]] || usage
cmd=$1
shift
case $cmd in
up)
    [[ $# -eq 3 ]] || usage
    check_prefix "$1"
    check_kind "$2"
    check_kind "$3"
    cmd_up "$1" "$2" "$3"
    ;;
down)
    [[ $# -eq 1 ]] || usage
    check_prefix "$1"
    cmd_down "$1"
    ;;
block-coordinator)
    [[ $# -eq 1 ]] || usage
    check_prefix "$1"
    cmd_block "$1"
    ;;
unblock-coordinator)
    [[ $# -eq 1 ]] || usage
    check_prefix "$1"
    cmd_unblock "$1"
    ;;
rebind)
    [[ $# -eq 1 ]] || usage
    check_prefix "$1"
    cmd_rebind "$1"
    ;;
*)
    usage
    ;;
esac

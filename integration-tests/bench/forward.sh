#!/usr/bin/env bash
# Forwarding benchmark: other programs' traffic through qmesh expose/forward
# (direct and relayed) against no tunnel and against rathole (noise and
# plain tcp transports), all on loopback, in one run, with one table.
#
#   integration-tests/bench/forward.sh [--runs N] [--no-build]
#
# --runs N: N rounds (default 1), each running every workload through every
# path; each figure is the median over the rounds. --no-build: use the
# binaries already in target/release.
#
# Workloads, each through each path:
#   - iperf3 TCP, 5 s (Gbit/s received);
#   - redis-benchmark -t set,get -c 50 -n 200000 (ops/s and p50 per test);
#   - time to first byte over 1,000 sequential short connections to a tiny
#     python3 server (p50, p99).
# Plus, in each round, target/release/qmesh-bench --only bulk --runs 1, for
# the raw quinn bulk figure the iperf3 target is measured against.
#
# Needs: cargo, python3, iperf3, redis-server, redis-benchmark. When
# $CACHE/bin/rathole is missing, rathole is installed with `cargo install
# rathole --locked --root $CACHE`, or without --locked if that fails to
# build; CACHE defaults to ~/.cache/qmesh-bench.
# See docs/benchmarks.md, "Forwarding (protocol 6)".
set -euo pipefail
exec 3>&2  # the script's own stderr, for the exit trap (which may run
           # inside a redirected command)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${CACHE:-$HOME/.cache/qmesh-bench}
RUNS=1
BUILD=1
IPERF_SECS=5
REDIS_N=200000
REDIS_C=50
TTFB_N=1000

while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "forward.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

say() { echo "== $*" >&2; }
die() { echo "forward.sh: $*" >&2; exit 1; }

for p in cargo python3 iperf3 redis-server redis-benchmark; do
    command -v "$p" >/dev/null || die "$p is not installed"
done

HELPER=(python3 "$HERE/forward.py")
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
RATHOLE=$CACHE/bin/rathole

# ---- processes: every one started here is stopped at exit -----------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/qmesh-fwbench.XXXXXX")
PIDS=()
LAST_PID=
CURRENT=

stop() {
    # stop PID...: TERM, up to 5 s, then KILL.
    local pid i
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        for i in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    local keep=() p s
    for p in "${PIDS[@]}"; do
        s=1
        for pid in "$@"; do [ "$p" = "$pid" ] && s=0; done
        [ $s = 1 ] && keep+=("$p")
    done
    PIDS=("${keep[@]}")
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$CURRENT" ]; then stop "$CURRENT"; fi
    if [ ${#PIDS[@]} -gt 0 ]; then stop "${PIDS[@]}"; fi
    if [ $rc -ne 0 ]; then
        echo "forward.sh: stopped (status $rc); every process it started is stopped" >&3
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {
    # start NAME CMD...: run CMD in the background, stdout to $WORK/NAME.out
    # and stderr to $WORK/NAME.err; its pid in LAST_PID.
    local name=$1; shift
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

run_fg() {
    # run_fg CMD...: run CMD and wait for it. In the background and waited
    # for with `wait`, so that Ctrl-C (or SIGINT/SIGTERM to this script)
    # runs the trap at once: bash does not act on a SIGINT while a
    # foreground command runs that exits normally (as timeout(1) does).
    "$@" &
    CURRENT=$!
    local rc=0
    wait "$CURRENT" || rc=$?
    CURRENT=
    return $rc
}

wait_line() {
    # wait_line NAME FILE REGEX: until FILE has a line matching REGEX (30 s),
    # failing if the process LAST_PID ends first. Prints the line.
    local name=$1 file=$2 re=$3 i
    for i in $(seq 300); do
        if grep -Eq -- "$re" "$file" 2>/dev/null; then
            grep -E -m1 -- "$re" "$file"
            return 0
        fi
        if ! kill -0 "$LAST_PID" 2>/dev/null; then
            echo "--- $name stdout:" >&2; cat "$WORK/$name.out" >&2 || true
            echo "--- $name stderr:" >&2; cat "$WORK/$name.err" >&2 || true
            die "$name exited before printing /$re/"
        fi
        sleep 0.1
    done
    echo "--- $name stdout:" >&2; cat "$WORK/$name.out" >&2 || true
    echo "--- $name stderr:" >&2; cat "$WORK/$name.err" >&2 || true
    die "$name did not print /$re/ within 30 s"
}

# ---- build and install ----------------------------------------------------

if [ $BUILD = 1 ]; then
    say "building qmesh, qmesh-coordinator and qmesh-bench (release)"
    (cd "$ROOT" && cargo build --release --bin qmesh --bin qmesh-coordinator --bin qmesh-bench) >&2
fi
for b in qmesh qmesh-coordinator qmesh-bench; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing (run without --no-build)"
done

if [ ! -x "$RATHOLE" ]; then
    say "installing rathole into $CACHE"
    # rathole 0.5.0's lock file pins time 0.3.29, which newer compilers
    # refuse (E0282); without --locked cargo picks a time release that builds.
    cargo install rathole --locked --root "$CACHE" >&2 ||
        cargo install rathole --root "$CACHE" >&2
fi
[ -x "$RATHOLE" ] || die "no rathole at $RATHOLE"

RESULTS=$WORK/results
: >"$RESULTS"
MACHINE="$(nproc) cores, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
STARTED=$SECONDS

# ---- targets ----------------------------------------------------------------

read -r P_IPERF P_REDIS P_TTFB < <("${HELPER[@]}" ports tcp 3 | xargs)

start iperf3-server iperf3 -s -B 127.0.0.1 -p "$P_IPERF" --forceflush
wait_line iperf3-server "$WORK/iperf3-server.out" "Server listening" >/dev/null
start redis-server redis-server --port "$P_REDIS" --bind 127.0.0.1 --save '' \
    --appendonly no --dir "$WORK" --protected-mode no
wait_line redis-server "$WORK/redis-server.out" "Ready to accept connections" >/dev/null
start ttfb-server "${HELPER[@]}" serve "$P_TTFB"
wait_line ttfb-server "$WORK/ttfb-server.out" "listening" >/dev/null

# ---- paths: every route is set up first, then the rounds run ---------------

WORKLOADS=(iperf redis ttfb)
PATHS=(plain qmesh-direct qmesh-relay rathole-noise rathole-tcp)
declare -A TARGET=([iperf]=$P_IPERF [redis]=$P_REDIS [ttfb]=$P_TTFB)
declare -A PORT  # PORT[path/workload]: where the workload connects
for w in "${WORKLOADS[@]}"; do PORT[plain/$w]=${TARGET[$w]}; done

# qmesh: one coordinator; one exposer per interface (bob-iperf exposes
# iperf, ...); one forwarder per interface and mode (alice-direct-iperf, ...).
P_COORD=$("${HELPER[@]}" ports udp 1)
COORD="quic/\$4:$P_COORD"
say "qmesh: coordinator on $COORD, exposers, forwarders"
start coordinator "$BIN/qmesh-coordinator" run --state-dir "$WORK/coordinator" --listen "$COORD"
line=$(wait_line coordinator "$WORK/coordinator.out" "^clients need the CA file: ")
CA=${line#clients need the CA file: }
QMESH=("$BIN/qmesh" --coordinator "$COORD" --ca "$CA" --state-dir "$WORK/clients")
for w in "${WORKLOADS[@]}"; do
    start "bob-$w" "${QMESH[@]}" --name "bob-$w" expose "$w" "tcp/\$4:${TARGET[$w]}"
    wait_line "bob-$w" "$WORK/bob-$w.out" "^exposing " >/dev/null
done
for mode in direct relay; do
    for w in "${WORKLOADS[@]}"; do
        name=alice-$mode-$w
        port=$("${HELPER[@]}" ports tcp 1)
        start "$name" "${QMESH[@]}" --name "$name" forward --mode "$mode" \
            "tcp/\$4:$port" "mesh/bob-$w!$w"
        line=$(wait_line "$name" "$WORK/$name.out" "^route .* up: ")
        case $mode in
            direct) [[ $line == *"(direct"* ]] || die "$name: not direct: $line" ;;
            relay) [[ $line == *"(relay)"* ]] || die "$name: not relayed: $line" ;;
        esac
        say "$line"
        PORT[qmesh-$mode/$w]=$port
    done
done

# rathole: for each transport and workload, a server and a client with one
# service.
rathole_up() {
    # rathole_up TRANSPORT WORKLOAD: sets PORT[rathole-TRANSPORT/WORKLOAD],
    # the service's port on the server.
    local transport=$1 w=$2 ctrl svc keys priv pub
    read -r ctrl svc < <("${HELPER[@]}" ports tcp 2 | xargs)
    local name=rathole-$transport-$w
    local dir=$WORK/$name
    mkdir -p "$dir"
    printf '[server]\nbind_addr = "127.0.0.1:%s"\n' "$ctrl" >"$dir/server.toml"
    printf '[client]\nremote_addr = "127.0.0.1:%s"\n' "$ctrl" >"$dir/client.toml"
    if [ "$transport" = noise ]; then
        keys=$("$RATHOLE" --genkey)
        priv=$(echo "$keys" | sed -n '/^Private Key:/{n;p}')
        pub=$(echo "$keys" | sed -n '/^Public Key:/{n;p}')
        [ -n "$priv" ] && [ -n "$pub" ] || die "rathole --genkey printed: $keys"
        printf '[server.transport]\ntype = "noise"\n[server.transport.noise]\nlocal_private_key = "%s"\n' \
            "$priv" >>"$dir/server.toml"
        printf '[client.transport]\ntype = "noise"\n[client.transport.noise]\nremote_public_key = "%s"\n' \
            "$pub" >>"$dir/client.toml"
    else
        printf '[server.transport]\ntype = "tcp"\n' >>"$dir/server.toml"
        printf '[client.transport]\ntype = "tcp"\n' >>"$dir/client.toml"
    fi
    printf '[server.services.%s]\ntoken = "bench-%s"\nbind_addr = "127.0.0.1:%s"\n' \
        "$w" "$w" "$svc" >>"$dir/server.toml"
    printf '[client.services.%s]\ntoken = "bench-%s"\nlocal_addr = "127.0.0.1:%s"\n' \
        "$w" "$w" "${TARGET[$w]}" >>"$dir/client.toml"
    start "$name-server" "$RATHOLE" --server "$dir/server.toml"
    local server_pid=$LAST_PID
    wait_line "$name-server" "$WORK/$name-server.out" "Listening at 127\.0\.0\.1:$ctrl\b" >/dev/null
    start "$name-client" "$RATHOLE" --client "$dir/client.toml"
    wait_line "$name-client" "$WORK/$name-client.out" "Control channel established" >/dev/null
    # The server listens on the service's port once the client's control
    # channel is up.
    LAST_PID=$server_pid
    wait_line "$name-server" "$WORK/$name-server.out" "Listening at 127\.0\.0\.1:$svc\b" >/dev/null
    PORT[rathole-$transport/$w]=$svc
}
for transport in noise tcp; do
    say "rathole $transport: a server and a client for each workload"
    for w in "${WORKLOADS[@]}"; do rathole_up "$transport" "$w"; done
done

# ---- workloads --------------------------------------------------------------

run_once() {
    # run_once PATH WORKLOAD ROUND: one run, result lines to $RESULTS.
    local path=$1 w=$2 r=$3 port=${PORT[$1/$2]} f=$WORK/$1-$2-$3
    case $w in
        iperf)
            say "round $r, $path: iperf3 -t $IPERF_SECS"
            if run_fg timeout 60 iperf3 -c 127.0.0.1 -p "$port" -t "$IPERF_SECS" -J >"$f.json" 2>"$f.err"; then
                "${HELPER[@]}" iperf "$f.json" "$path" >>"$RESULTS"
            else
                echo "forward.sh: $path: iperf3 failed" >&2; cat "$f.json" "$f.err" >&2
            fi ;;
        redis)
            say "round $r, $path: redis-benchmark -t set,get -c $REDIS_C -n $REDIS_N"
            if run_fg timeout 600 redis-benchmark -h 127.0.0.1 -p "$port" -t set,get \
                    -c "$REDIS_C" -n "$REDIS_N" --csv >"$f.csv" 2>"$f.err"; then
                "${HELPER[@]}" redis "$f.csv" "$path" >>"$RESULTS"
            else
                echo "forward.sh: $path: redis-benchmark failed" >&2; cat "$f.csv" "$f.err" >&2
            fi ;;
        ttfb)
            say "round $r, $path: time to first byte, $TTFB_N connections"
            if ! run_fg timeout 300 "${HELPER[@]}" ttfb "$port" "$TTFB_N" "$path" >>"$RESULTS" 2>"$f.err"; then
                echo "forward.sh: $path: first-byte client failed" >&2; cat "$f.err" >&2
            fi ;;
    esac
}

# Each round runs every workload through every path, one after the other,
# so a change in the machine's load between rounds touches all paths.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$RUNS"); do
    # The raw quinn figure the iperf3 target is measured against.
    say "round $r: qmesh-bench --only bulk --runs 1 (raw quinn bulk)"
    if run_fg "$BIN/qmesh-bench" --only bulk --runs 1 --json >"$WORK/quinn-$r.json" 2>"$WORK/quinn-$r.err"; then
        "${HELPER[@]}" quinn "$WORK/quinn-$r.json" >>"$RESULTS"
    else
        echo "forward.sh: qmesh-bench failed:" >&2; cat "$WORK/quinn-$r.err" >&2
    fi
    for w in "${WORKLOADS[@]}"; do
        for path in "${PATHS[@]}"; do run_once "$path" "$w" "$r"; done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report -----------------------------------------------------------------

echo
"${HELPER[@]}" report "$RESULTS" "$MACHINE" "$RUNS"
echo "(load average before the rounds $LOAD_BEFORE, after $LOAD_AFTER)"
echo "($((SECONDS - STARTED)) s in all, rathole $("$RATHOLE" --version 2>/dev/null | sed -n 's/^Build Version: *//p'), $(iperf3 --version | head -1 | cut -d' ' -f1,2), $(redis-server --version | cut -d' ' -f1-3))"

#!/usr/bin/env bash
# A flamegraph of the coordinator while qmesh-bench runs one case.
#
#   integration-tests/bench/profile.sh CASE OUT.svg [qmesh-bench flags...]
#   integration-tests/bench/profile.sh rtt docs/bench/rtt-after.svg --runs 20
#
# Runs target/release/qmesh-bench --only CASE (build it first: cargo build
# --release -p qmesh-integration-tests --bin qmesh-bench), records the
# coordinator child with `perf record` (DWARF call graphs, 499 Hz) for the
# whole run, and draws the samples with inferno (`cargo install inferno`).
# The bench's table goes to OUT.svg's name with .txt, the symbols with the
# most samples of their own to .top.txt. Needs perf (Debian
# linux-perf) and permission to trace the child (root, or
# kernel.perf_event_paranoid <= 1).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 CASE OUT.svg [qmesh-bench flags...]" >&2
    exit 2
fi
case=$1
out=$2
shift 2
root=$(cd "$(dirname "$0")/../.." && pwd)
bench=$root/target/release/qmesh-bench
for tool in perf inferno-collapse-perf inferno-flamegraph; do
    command -v "$tool" >/dev/null || {
        echo "$0: $tool is not installed (perf: apt-get install linux-perf; inferno: cargo install inferno)" >&2
        exit 1
    }
done
[ -x "$bench" ] || {
    echo "$0: $bench is missing; cargo build --release -p qmesh-integration-tests --bin qmesh-bench" >&2
    exit 1
}

work=$(mktemp -d)
cleanup() {
    [ -n "${bench_pid:-}" ] && kill "$bench_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$bench" --only "$case" "$@" >"${out%.svg}.txt" &
bench_pid=$!
# The coordinator is the bench's child with --serve-coordinator; it prints
# its port before the bench starts measuring, so it exists within moments.
pid=
for _ in $(seq 200); do
    pid=$(pgrep -P "$bench_pid" -f -- '--serve-coordinator' | head -1 || true)
    [ -n "$pid" ] && break
    sleep 0.05
done
[ -n "$pid" ] || { echo "$0: no coordinator child appeared" >&2; exit 1; }
perf record -q -F 499 --call-graph dwarf,16384 -p "$pid" -o "$work/perf.data" 2>"$work/perf.err" &
perf_pid=$!
wait "$bench_pid"
bench_pid=
# perf stops by itself when the coordinator is killed at the bench's end.
wait "$perf_pid" || true
perf script -i "$work/perf.data" 2>/dev/null |
    inferno-collapse-perf |
    inferno-flamegraph --title "qmesh coordinator: qmesh-bench --only $case $*" >"$out"
# The symbols with the most samples of their own, beside the drawing.
perf report -i "$work/perf.data" --no-children --sort symbol --percent-limit 0.8 --stdio 2>/dev/null |
    grep -E '^ +[0-9.]+%' | sed -E 's/ +$//' >"${out%.svg}.top.txt" || true
echo "$out: $(grep -o '<title>' "$out" | wc -l) frames; table in ${out%.svg}.txt, top symbols in ${out%.svg}.top.txt"

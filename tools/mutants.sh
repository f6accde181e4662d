#!/usr/bin/env bash
# Mutation testing of qmesh's codec and decision code with cargo-mutants.
#
# Usage: tools/mutants.sh [FILE...]
#
# With no argument, runs on every file in DEFAULT_FILES below; otherwise on
# the files given (paths from the repository root, e.g.
# coordinator/src/token.rs). Each mutant is tested by the unit tests of its
# own crate only (`cargo test -p CRATE --lib`), so a score says how well
# that file's unit tests check it. Prints one row per file:
#
#   score = caught / (caught + missed + timeout)
#
# Unviable mutants (that do not compile) are not counted. A timeout counts
# against the score: a test that hangs on a broken limiter has not caught it.
# Exclusions, each with its reason, are in .cargo/mutants.toml.
#
# Environment:
#   CARGO_TARGET_DIR  build directory (default: target/mutants). Keep it
#                     apart from the one you test the working tree in: cargo
#                     names a crate's build the same in cargo-mutants' copy
#                     of the tree and in the working tree, and may then run a
#                     test binary built from the copy as if it were current.
#   MUTANTS_OUT       where the per-crate reports go (default: target/mutants-out)
#   MUTANTS_JOBS      parallel mutants (default: 1; each one builds)
#   CARGO_PROFILE_DEV_OPT_LEVEL  opt-level of the workspace crates (default 0)
#   MUTANTS_ARGS      more cargo-mutants options, split on spaces (e.g.
#                     "--re codec.rs:261" to re-test one mutant)
#
# Too slow for every CI run (about an hour for the default set on two
# shared cores, see docs/testing.md); run it before resolving a change to
# these files.
set -euo pipefail

CARGO_MUTANTS_VERSION=27.1.0

DEFAULT_FILES=(
    proto/src/address.rs
    proto/src/codec.rs
    proto/src/codes.rs
    proto/src/datagram.rs
    proto/src/envelope.rs
    proto/src/heartbeat.rs
    proto/src/ids.rs
    proto/src/limits.rs
    proto/src/logging.rs
    proto/src/manifest.rs
    proto/src/msg.rs
    proto/src/name.rs
    proto/src/untrusted.rs
    coordinator/src/registry.rs
    coordinator/src/policy.rs
    coordinator/src/limit.rs
    coordinator/src/token.rs
    coordinator/src/auth.rs
    coordinator/src/open.rs
    client/src/connect.rs
)

# Functions of these files that are not decisions but I/O (sockets, tasks,
# the network): left to the integration tests, so not mutated here.
declare -A IO_ONLY=(
    [client/src/connect.rs]='client/src/connect.rs:.*(Tasks>::drop|direct_endpoint| in join$|replace join ->|join_session)'
)

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# cargo-mutants from PATH, else from target/tools (installed there from
# crates.io when missing, as fuzz/run.sh does for cargo-fuzz).
tools="$root/target/tools"
export PATH="$PATH:$tools/bin"
if ! cargo mutants --version >/dev/null 2>&1; then
    echo "cargo-mutants not found; installing $CARGO_MUTANTS_VERSION into $tools" >&2
    cargo install cargo-mutants --locked --version "$CARGO_MUTANTS_VERSION" --root "$tools"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/mutants}"
# Every mutant is a rebuild of one crate: build the workspace crates without
# optimisation (dependencies keep the workspace's opt-level 2), which makes
# each rebuild faster and changes no test's outcome.
export CARGO_PROFILE_DEV_OPT_LEVEL="${CARGO_PROFILE_DEV_OPT_LEVEL:-0}"
out_root="${MUTANTS_OUT:-$root/target/mutants-out}"
jobs="${MUTANTS_JOBS:-1}"
# A failing test's backtrace only lengthens the logs of caught mutants.
export RUST_BACKTRACE=0

files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    files=("${DEFAULT_FILES[@]}")
fi

# The package whose unit tests check FILE: the name in the Cargo.toml of
# the file's top directory.
package_of() {
    local dir=${1%%/*}
    sed -n 's/^name *= *"\(.*\)"/\1/p' "$dir/Cargo.toml" | head -n 1
}

# Group the files by package, keeping the order of first appearance.
declare -A pkg_files=()
pkgs=()
for f in "${files[@]}"; do
    if [ ! -f "$f" ]; then
        echo "no such file: $f" >&2
        exit 2
    fi
    p=$(package_of "$f")
    if [ -z "${pkg_files[$p]+x}" ]; then
        pkgs+=("$p")
        pkg_files[$p]=""
    fi
    pkg_files[$p]+=" $f"
done

status=0
for p in "${pkgs[@]}"; do
    args=()
    for f in ${pkg_files[$p]}; do
        args+=(--file "$f")
        if [ -n "${IO_ONLY[$f]+x}" ]; then
            args+=(--exclude-re "${IO_ONLY[$f]}")
        fi
    done
    echo "== $p:${pkg_files[$p]}" >&2
    # cargo-mutants exits 2 when some mutant was missed, 3 on a timeout:
    # those are results, reported below. Anything else is a failure to run.
    mkdir -p "$out_root/$p"
    rc=0
    # --gitignore: leave target dirs (fuzz/target too) out of the copy.
    # shellcheck disable=SC2086 # MUTANTS_ARGS is split on purpose
    cargo mutants --jobs "$jobs" --package "$p" --test-package "$p" \
        --all-features --cargo-arg=--lib --no-shuffle --gitignore=true \
        --output "$out_root/$p" "${args[@]}" ${MUTANTS_ARGS:-} || rc=$?
    case $rc in
        0 | 2 | 3) ;;
        *)
            echo "cargo mutants failed on $p (exit $rc)" >&2
            status=1
            ;;
    esac
done

# Count one outcome file's lines per source file.
count() {
    local file=$1 list=$2
    if [ -f "$list" ]; then
        grep -c "^$file:" "$list" || true
    else
        echo 0
    fi
}

printf '\n%-28s %7s %7s %8s %9s %7s\n' file caught missed timeout unviable score
for f in "${files[@]}"; do
    dir="$out_root/$(package_of "$f")/mutants.out"
    c=$(count "$f" "$dir/caught.txt")
    m=$(count "$f" "$dir/missed.txt")
    t=$(count "$f" "$dir/timeout.txt")
    u=$(count "$f" "$dir/unviable.txt")
    viable=$((c + m + t))
    if [ "$viable" -eq 0 ]; then
        score="-"
    else
        score=$(awk -v c="$c" -v v="$viable" 'BEGIN { printf "%.1f%%", 100 * c / v }')
    fi
    printf '%-28s %7d %7d %8d %9d %7s\n' "$f" "$c" "$m" "$t" "$u" "$score"
done
echo >&2
echo "missed and timed-out mutants: $out_root/*/mutants.out/{missed,timeout}.txt" >&2
exit $status

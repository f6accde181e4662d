#!/usr/bin/env bash
# Build every fuzz target and run each for SECONDS seconds, as many at once
# as there are cores, with cargo-fuzz on the stable toolchain (--sanitizer none).
#
#   bash fuzz/run.sh SECONDS            all targets
#   bash fuzz/run.sh SECONDS frame ...  only the named targets
#
# Prints one summary line per target: libFuzzer's final "#N DONE cov: ..."
# line (executions, coverage, features, corpus, exec/s, rss). Exits non-zero
# when a target crashed, hung or could not run; the crashing input is in
# fuzz/artifacts/<target>/ and the whole log in fuzz/target/fuzz-run/.
#
# The committed corpus fuzz/corpus/<target> is only read: new inputs go to a
# temporary corpus under fuzz/target/, removed at the end. Nothing is written
# outside fuzz/ except cargo's target dir (and cargo's own cache in
# CARGO_HOME). If cargo-fuzz is not installed, it is installed into
# fuzz/target/tools from crates.io.
set -euo pipefail

usage() {
    echo "usage: bash fuzz/run.sh SECONDS [TARGET...]" >&2
    exit 2
}
[[ $# -ge 1 && $1 =~ ^[0-9]+$ && $1 -gt 0 ]] || usage
seconds=$1
shift

fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$fuzz_dir")
all_targets=(frame read_frame envelope address cert client_cert token config)
if [[ $# -gt 0 ]]; then
    targets=("$@")
    for t in "${targets[@]}"; do
        [[ -f $fuzz_dir/fuzz_targets/$t.rs ]] || { echo "unknown target: $t" >&2; exit 2; }
    done
else
    targets=("${all_targets[@]}")
fi

# Never read the terminal, whoever runs this.
exec </dev/null

cargo_fuzz_version=0.13.2
if ! cargo fuzz --version >/dev/null 2>&1; then
    tools=$fuzz_dir/target/tools
    if [[ ! -x $tools/bin/cargo-fuzz ]]; then
        echo "cargo-fuzz not found: installing cargo-fuzz $cargo_fuzz_version into $tools"
        cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked \
            --root "$tools" --target-dir "$tools/build"
    fi
    export PATH=$tools/bin:$PATH
fi

work=$fuzz_dir/target/fuzz-run
mkdir -p "$work"
tmp=$(mktemp -d "$work/corpus.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

cd "$root"
echo "building fuzz targets ($(cargo fuzz --version))"
build_log=$tmp/build.log
for t in "${targets[@]}"; do
    cargo fuzz build --sanitizer none "$t" >>"$build_log" 2>&1 ||
        { tail -n 60 "$build_log" >&2; echo "building $t failed" >&2; exit 1; }
done

# One target: fuzz it and write its summary line to $tmp/$t.summary.
fuzz_one() {
    local t=$1 log=$work/$1.log max_len status=0 done_line execs panic error input summary
    mkdir -p "$tmp/$t"
    case $t in
        # Room for frames up to the limit (16 KiB + prefix + control byte).
        frame | read_frame) max_len=-max_len=17000 ;;
        *) max_len=-max_len=4096 ;;
    esac
    echo "== $t: fuzzing for ${seconds}s (log: ${log#"$root"/})"
    cargo fuzz run "$t" --sanitizer none "$tmp/$t" "$fuzz_dir/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 "$max_len" \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    if [[ $status -eq 0 && -n $done_line ]]; then
        summary="$t: $done_line"
    else
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        panic=$(grep -m 1 -A 1 'panicked at' "$log" | sed 's/^thread .* panicked at //' | paste -sd ' ' || true)
        error=$(grep -m 1 -E '^==[0-9]+== ERROR: libFuzzer' "$log" | sed 's/^==[0-9]*== //' || true)
        input=$(sed -n 's/.*Test unit written to //p' "$log" | tail -n 1)
        summary="$t: FAILED (exit $status) after ${execs:-?} executions: ${panic:-${error:-see log}}${input:+; input: ${input#"$root"/}}; log: ${log#"$root"/}"
        tail -n 40 "$log" >&2
    fi
    echo "$summary" | tee "$tmp/$t.summary"
}

# Each fuzzer is one process on one core: as many at once as there are
# cores, so the whole run takes SECONDS x targets / cores.
parallel=$(nproc 2>/dev/null || echo 1)
for t in "${targets[@]}"; do
    while (($(jobs -rp | wc -l) >= parallel)); do
        wait -n || true
    done
    fuzz_one "$t" &
done
wait

failed=0
summaries=()
for t in "${targets[@]}"; do
    summary=$(cat "$tmp/$t.summary" 2>/dev/null || echo "$t: FAILED: no summary (see $work/$t.log)")
    [[ $summary == "$t: FAILED"* ]] && failed=1
    summaries+=("$summary")
done

echo
echo "summary (${seconds}s per target):"
printf '  %s\n' "${summaries[@]}"
exit "$failed"

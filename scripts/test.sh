#!/usr/bin/env bash
# README command 2: set up everything, then run the whole test suite — every test of the
# workspace (`cargo test --workspace`) and the Burn round trip (roundtrip/, its own workspace).
#
# The end-to-end tests (crate duet-tests) spend most of their time training on one core, so
# once everything is built they start first and run beside everything else: the other crates'
# tests and the round trip run on the other core meanwhile. Their output is prefixed [e2e].
#
# With arguments, runs a plain `cargo test --workspace ARGS` (e.g. `-p duet-runtime`, a filter)
# and nothing else. DUET_TEST_ALONGSIDE names a command to run once the end-to-end tests have
# started (CI's lints); DUET_TIMINGS a file that gets one "phase seconds" line per phase.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/lib/libonnxruntime.so}"
if [ $# -gt 0 ]; then
    exec cargo test --workspace "$@"
fi

last=$(date +%s)
phase() {
    local now
    now=$(date +%s)
    if [ -n "${DUET_TIMINGS:-}" ]; then echo "$1 $((now - last))" >>"$DUET_TIMINGS"; fi
    last=$now
}

# Everything is built first, in one cargo call that keeps both cores busy (one call, so that
# features unify once and nothing is compiled twice). The end-to-end tests (crate duet-tests)
# are then run directly rather than through `cargo test`, which holds the build directory's
# lock while its tests run and would keep everything else waiting. They run from the crate's
# folder, as `cargo test -p duet-tests` would run them.
artifacts=$(mktemp)
trap 'rm -f "$artifacts"' EXIT
cargo test --workspace --no-run --message-format=json-render-diagnostics >"$artifacts"
mapfile -t e2e_bins < <(python3 -c '
import json, sys
want = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and m["target"]["kind"] == ["test"] and m["manifest_path"] == want):
        print(m["executable"])' "$root/tests/Cargo.toml" <"$artifacts")
[ ${#e2e_bins[@]} -gt 0 ] || { echo "no duet-tests test binaries were built" >&2; exit 1; }
phase "build: every test of the workspace"

# One background job per binary (e2e trains for most of the run; shipped.rs is short and
# should not wait behind it), each leaving "status seconds" in $results/NAME.
results=$(mktemp -d)
trap 'rm -rf "$artifacts" "$results"' EXIT
e2e_jobs=()
for bin in "${e2e_bins[@]}"; do
    name=$(basename "$bin")
    name=${name%-*}
    (
        cd tests
        started=$(date +%s)
        status=0
        # --show-output: the measured accuracies and scores the tests print are in every log.
        "$bin" --show-output 2>&1 || status=$?
        echo "$status $(($(date +%s) - started))" >"$results/$name"
    ) | sed -u "s/^/[$name] /" &
    e2e_jobs+=($!)
done

# Everything below shares the machine with the end-to-end run; a failure here still waits for
# it, so that its result is reported too.
rest=0
if [ -n "${DUET_TEST_ALONGSIDE:-}" ]; then
    bash -c "$DUET_TEST_ALONGSIDE" || rest=$?
fi
if [ $rest -eq 0 ]; then
    cargo test --workspace --exclude duet-tests || rest=$?
    phase "tests: every other crate"
fi
if [ $rest -eq 0 ]; then
    cargo test --manifest-path roundtrip/Cargo.toml || rest=$?
    phase "tests: Burn round trip (build + run)"
fi

wait "${e2e_jobs[@]}" || true
phase "waiting for the end-to-end tests"
e2e_status=0
for bin in "${e2e_bins[@]}"; do
    name=$(basename "$bin")
    name=${name%-*}
    read -r status secs <"$results/$name" || { status=1 secs=?; }
    [ "$status" -eq 0 ] || e2e_status=1
    if [ -n "${DUET_TIMINGS:-}" ]; then
        # A test target is tests/tests/NAME.rs or, split into modules, tests/tests/NAME/.
        src="tests/tests/$name.rs"
        [ -f "$root/$src" ] || src="tests/tests/$name/"
        echo "($src, beside the above) $secs" >>"$DUET_TIMINGS"
    fi
done
echo "end-to-end tests: exit status $e2e_status; other tests: exit status $rest"
[ $e2e_status -eq 0 ] && [ $rest -eq 0 ]

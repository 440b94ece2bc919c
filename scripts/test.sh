#!/usr/bin/env bash
# README command 2: set up everything, then run the whole test suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/lib/libonnxruntime.so}"
cargo test --workspace "$@"
# The Burn round trip is its own workspace (see roundtrip/Cargo.toml); arguments meant for the
# main workspace (`-p crate`, a test filter) would not apply there, so it runs on a full run only.
if [ $# -eq 0 ]; then
    cargo test --manifest-path roundtrip/Cargo.toml
fi

#!/usr/bin/env bash
# One-time set-up on a fresh machine: the ONNX Runtime library (from the PyPI wheel) and the
# Python `onnx` package the tests use to run onnx.checker, and the Emoji-CLDR sources. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup-ort.sh"
if ! python3 -c "import onnx" 2>/dev/null; then
  python3 -m pip install --quiet "onnx==1.23.2"
fi
# valgrind checks the C ABI example for leaks and invalid accesses (ffi/tests/c_example.rs).
if ! command -v valgrind >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq valgrind >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq valgrind; }
  else
    echo "note: valgrind not found; the C ABI example test will run without it" >&2
  fi
fi
# Emoji-CLDR sources (emoji art + CLDR names) from the npm registry: `npm pack` of pinned versions.
if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -qq nodejs npm >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nodejs npm; }
fi
bash "$root/scripts/fetch-emoji.sh"
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

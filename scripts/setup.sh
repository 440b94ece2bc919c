#!/usr/bin/env bash
# One-time set-up on a fresh machine: the ONNX Runtime library (from the PyPI wheel) and the
# Python `onnx` package the tests use to run onnx.checker. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup-ort.sh"
if ! python3 -c "import onnx" 2>/dev/null; then
  python3 -m pip install --quiet "onnx==1.23.2"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

#!/usr/bin/env bash
# Fetches the pinned ONNX Runtime shared library from the `onnxruntime` wheel on PyPI (the only
# place this project may download it from), checks the wheel's sha256 and extracts
# libonnxruntime.so* into .ort/lib/, where the duet runtime looks for it (ORT_DYLIB_PATH wins).
# Idempotent: does nothing when the library is already there.
set -euo pipefail
ORT_VERSION=1.24.4
WHEEL=onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
SHA256=e54ad52e61d2d4618dcff8fa1480ac66b24ee2eab73331322db1049f11ccf330

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.ort"
lib="$dest/lib/libonnxruntime.so"
if [ -e "$lib" ] && [ -f "$dest/lib/VERSION" ] && [ "$(cat "$dest/lib/VERSION")" = "$ORT_VERSION" ]; then
  echo "onnxruntime $ORT_VERSION already in $dest/lib"
  exit 0
fi
mkdir -p "$dest/wheel" "$dest/lib"
if [ ! -f "$dest/wheel/$WHEEL" ]; then
  # The wheel is selected by explicit platform tags so the hash does not depend on the local Python.
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 \
    "onnxruntime==$ORT_VERSION" -d "$dest/wheel"
fi
echo "$SHA256  $dest/wheel/$WHEEL" | sha256sum --check --quiet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$dest/wheel/$WHEEL" "$tmp" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if "/capi/libonnxruntime" in n and ".so" in n]
    if not names:
        sys.exit("no libonnxruntime.so in " + wheel)
    for n in names:
        z.extract(n, out)
PY
for f in "$tmp"/onnxruntime/capi/libonnxruntime*.so*; do
  install -m 0755 "$f" "$dest/lib/$(basename "$f")"
done
# The runtime opens libonnxruntime.so; the wheel ships libonnxruntime.so.<version>.
real=$(ls "$dest/lib"/libonnxruntime.so.* | grep -v providers | head -n1)
ln -sf "$(basename "$real")" "$lib"
echo "$ORT_VERSION" > "$dest/lib/VERSION"
echo "onnxruntime $ORT_VERSION installed in $dest/lib"

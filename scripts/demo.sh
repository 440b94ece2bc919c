#!/usr/bin/env bash
# README command 1: set up, build, and run the shipped `shipped/duet-small` bundle — no training.
# Captions the sample images in examples/images/ (emoji and ShapeWorld), generates a PNG grid
# from several prompts (one row each), classifies a scene with the text or the image missing
# (restored in feature space), answers questions about a scene, and draws and edits through
# the dream queries. Each runs on onnxruntime (provider chain `auto`:
# TensorRT → CUDA → CPU, every skip printed with its reason) and on tract (pure Rust), and the
# tract-only edge binary, linked without onnxruntime, captions and generates too. Every
# command prints the provider of each graph and its timings on stderr.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/lib/libonnxruntime.so}"
bundle=${DUET_BUNDLE:-$root/shipped/duet-small}
out=${DUET_DEMO_DIR:-$root/out/demo}
mkdir -p "$out"
cargo build --release -p duet-runtime
# Built on its own so its duet-runtime has no onnxruntime at all (tract only).
cargo build --release -p duet-edge
bin="${CARGO_TARGET_DIR:-$root/target}/release"
"$bin/duet" info --bundle "$bundle"

images=("$root"/examples/images/*.png)
for provider in auto tract; do
    echo "== caption ($provider) =="
    "$bin/duet" caption --bundle "$bundle" --provider "$provider" "${images[@]}"
done
echo "== caption (duet-edge: tract only, no onnxruntime linked) =="
"$bin/duet-edge" caption "$bundle" "${images[@]}"
echo "(truths: examples/images/README.md)"

prompts=("grinning face" "red apple" "a large red circle at the top left"
    "a small blue square on the right and a large green triangle at the bottom")
for provider in auto tract; do
    echo "== generate ($provider): ${#prompts[@]} prompts x 4 =="
    "$bin/duet" generate --bundle "$bundle" --provider "$provider" --count 4 --seed 0 \
        -o "$out/generated-$provider.png" "${prompts[@]}"
done
"$bin/duet-edge" generate "$bundle" "$out/generated-edge.png" "${prompts[0]}"

scene="$root/examples/images/shapeworld-val-000000.png" # a large cyan diamond on the right
for provider in auto tract; do
    echo "== classify ($provider): the bundle's task (see duet info above) =="
    echo "-- image and text"
    "$bin/duet" classify --bundle "$bundle" --provider "$provider" --image "$scene" \
        --text "a large cyan diamond on the right"
    echo "-- text missing"
    "$bin/duet" classify --bundle "$bundle" --provider "$provider" --image "$scene"
    echo "-- image missing"
    "$bin/duet" classify --bundle "$bundle" --provider "$provider" \
        --text "a large cyan diamond on the right"
done
# The same decoder answers questions and, through its dream queries, conditions the denoiser:
# drawing from a prompt, and editing a picture by instruction.
scene="$root/examples/images/shapeworld-val-000001.png" # a large white square at the top left and a small yellow triangle on the right and a small cyan circle at the bottom left
for provider in auto tract; do
    echo "== ask ($provider) =="
    # Questions fixed before the model answered them, with the scene's true answers.
    for pair in "what colour is the square ?|white" "where is the triangle ?|on the right" \
        "how many cyan objects are there ?|one"; do
        printf '%s (truth: %s) -> ' "${pair%|*}" "${pair#*|}"
        "$bin/duet" ask --bundle "$bundle" --provider "$provider" --image "$scene" "${pair%|*}"
    done
done
echo "== generate through the dream queries (auto) =="
"$bin/duet" generate --bundle "$bundle" --condition dream --count 4 --seed 0 \
    -o "$out/generated-dream.png" "${prompts[@]}"
echo "== edit (auto): the scene, then one edit per instruction =="
"$bin/duet" edit --bundle "$bundle" --image "$scene" --seed 0 -o "$out/edited.png" \
    "remove the triangle" "make the square red" "add a small red circle at the top right"
echo "generations (one row per prompt): $out/generated-auto.png (onnxruntime), $out/generated-tract.png (tract), $out/generated-edge.png (duet-edge), $out/generated-dream.png (dream queries); edits: $out/edited.png"

#!/usr/bin/env bash
# Training your own, from scratch, at tiny size (about an hour on 2 cores): set up, generate
# ShapeWorld, train the tiny captioner, export it to an ONNX bundle (with parity checks) and
# caption sample images with ort and with tract; then train the tiny generator on top of it,
# score it, export all four graphs and generate a PNG grid; last, a short Unified-GRPO run
# (captioner rewarded by reconstruction, generator fine-tuned on the captioner's own captions)
# with reconstruction scores before and after.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/lib/libonnxruntime.so}"
out=${DUET_DEMO_DIR:-$root/out/tiny}
steps=${DUET_DEMO_STEPS:-2000}
gen_steps=${DUET_DEMO_GEN_STEPS:-3000}
unify_steps=${DUET_DEMO_UNIFY_STEPS:-20}
mkdir -p "$out"
cargo build --release -p duet-train -p duet-export -p duet-runtime
# Built on its own so its duet-runtime has no onnxruntime at all (tract only).
cargo build --release -p duet-edge
bin="${CARGO_TARGET_DIR:-$root/target}/release"
"$bin/duet-train" shapeworld --out "$out/data/train" --count 4000 --seed 1 --max-objects 2
"$bin/duet-train" shapeworld --out "$out/data/val" --count 300 --seed 2 --max-objects 2
"$bin/duet-train" fit --stage caption --preset tiny --data "$out/data/train" --out "$out/run" --steps "$steps" --seed 0
"$bin/duet-train" eval --run "$out/run" --data "$out/data/val"
"$bin/duet-export" --run "$out/run" --out "$out/bundle"
"$bin/duet" info --bundle "$out/bundle"
imgs=$(ls "$out"/data/val/images/*.png | head -n 4)
echo "== ort =="
"$bin/duet" caption --bundle "$out/bundle" --provider auto $imgs
echo "== tract =="
"$bin/duet" caption --bundle "$out/bundle" --provider tract $imgs
echo "== edge binary (tract only, no onnxruntime linked) =="
"$bin/duet-edge" caption "$out/bundle" $imgs
echo "== generation: tiny generator on top of the captioner =="
"$bin/duet-train" fit --stage generate --init "$out/run" --data "$out/data/train" --out "$out/gen-run" --steps "$gen_steps" --seed 0
"$bin/duet-train" eval --stage generate --run "$out/gen-run" --per-category 10 --steps 20
"$bin/duet-export" --run "$out/gen-run" --out "$out/gen-bundle"
prompt="a large red circle at the top left"
"$bin/duet" generate --bundle "$out/gen-bundle" --provider auto --count 4 --seed 0 -o "$out/generated-ort.png" "$prompt"
"$bin/duet" generate --bundle "$out/gen-bundle" --provider tract --count 4 --seed 0 -o "$out/generated-tract.png" "$prompt"
"$bin/duet-edge" generate "$out/gen-bundle" "$out/generated-edge.png" "$prompt"
echo "generations of \"$prompt\": $out/generated-ort.png (ort), $out/generated-tract.png (tract); GenEval grid: $out/gen-run/geneval.png"
echo "== unification: Unified-GRPO on the tiny pair =="
"$bin/duet-train" eval --stage reconstruct --run "$out/gen-run" --data "$out/data/val" --limit 100 --steps 20
# Temperature 2: the tiny captioner is near-certain on 1-2-object scenes, so at 1 most GRPO
# groups sample one caption G times and teach nothing (the e2e test measured 0 % vs 100 %
# informative groups).
"$bin/duet-train" fit --stage unify --init "$out/gen-run" --data "$out/data/train" --out "$out/unify-run" --steps "$unify_steps" --batch-size 8 --group 8 --temperature 2 --gen-steps 200 --seed 0
"$bin/duet-train" eval --stage reconstruct --run "$out/unify-run/stage2" --data "$out/data/val" --limit 100 --steps 20
echo "originals over rebuilds: $out/gen-run/reconstruct.png (before), $out/unify-run/stage2/reconstruct.png (after)"

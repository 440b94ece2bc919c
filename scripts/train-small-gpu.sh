#!/usr/bin/env bash
# The caption and generate stages of the `small` recipe on one CUDA GPU, each sized to a time
# budget: a 40-step probe measures seconds per step on this GPU, and the stage then runs as many
# steps as fit (capped at the preset's 6,000), at the preset's batch size and learning rate
# rather than the halved ones scripts/train-small.sh uses to fit a CPU. Two generate runs train
# side by side on the GPU from the same captioner and seed, one with Min-SNR-γ loss weighting
# (γ = 5) and one without, so the two compare at the same step budget.
#
# The later stages (unify, fusion, restore), the evaluation and the export are
# scripts/train-small.sh's, run on the CPU from these runs (DUET_SMALL_DIR pointing at $work).
#
#   DUET_BIN=target/release scripts/train-small-gpu.sh      # a build with `--features cuda`
#
# Writes $work/runs/{small,small-gen,small-gen-minsnr}, $work/steps.tsv (seconds per step of
# every probe and run) and each run's metrics.jsonl.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${DUET_SMALL_DIR:-$root/out/small}
bin=${DUET_BIN:?set DUET_BIN to the folder of a duet-train built with --features cuda}
caption_seconds=${CAPTION_SECONDS:-150}
generate_seconds=${GENERATE_SECONDS:-220}
max_steps=${MAX_STEPS:-6000}
t="$bin/duet-train"
mkdir -p "$work"
cd "$work"

[ -f data/sw-train/dataset.json ] || "$t" shapeworld --out data/sw-train --count 6000 --seed 11 --max-objects 4
[ -f data/sw-val/dataset.json ] || "$t" shapeworld --out data/sw-val --count 500 --seed 12 --max-objects 4
for style in google twitter; do
    [ -f "data/emoji-$style/dataset.json" ] || {
        echo "data/emoji-$style missing: build it with duet-train emoji (see train-small.sh)" >&2
        exit 1
    }
done
train=(--data data/sw-train --data data/emoji-google/train --data data/emoji-twitter/train)

# seconds_per_step RUN: the mean step time between the 20th and the 40th step (the first
# steps also compile the GPU kernels).
seconds_per_step() {
    python3 - "$1/metrics.jsonl" <<'EOF'
import json, sys
rows = {r["step"]: r["elapsed_s"] for r in map(json.loads, open(sys.argv[1])) if "elapsed_s" in r}
print((rows[40] - rows[20]) / 20)
EOF
}
# steps_for SECONDS SECONDS_PER_STEP: whole hundreds of steps that fit, at most $max_steps.
steps_for() {
    python3 -c "import sys; n = int(float(sys.argv[1]) / float(sys.argv[2]) // 100 * 100); print(max(100, min(n, $max_steps)))" "$1" "$2"
}
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" | tee -a steps.tsv; }

printf 'run\tsteps\tseconds_per_step\n' > steps.tsv
# Caption.
rm -rf probes/caption
"$t" fit --stage caption --preset small "${train[@]}" --out probes/caption --steps 40 --seed 0 --device cuda
sps=$(seconds_per_step probes/caption)
record probe-caption 40 "$sps"
steps=$(steps_for "$caption_seconds" "$sps")
"$t" fit --stage caption --preset small "${train[@]}" --out runs/small --steps "$steps" --seed 0 --device cuda
record caption "$steps" "$(python3 -c "import json; r=[json.loads(l) for l in open('runs/small/metrics.jsonl')]; print(r[-1]['elapsed_s']/r[-1]['step'])")"

# Generate: both probes at once, as the runs will be.
rm -rf probes/gen probes/gen-minsnr
"$t" fit --stage generate --init runs/small "${train[@]}" --out probes/gen --steps 40 --seed 0 --device cuda &
a=$!
"$t" fit --stage generate --init runs/small "${train[@]}" --out probes/gen-minsnr --steps 40 --seed 0 --device cuda --min-snr-gamma 5 &
b=$!
wait $a && wait $b
sps=$(seconds_per_step probes/gen)
record probe-generate-x2 40 "$sps"
record probe-generate-minsnr-x2 40 "$(seconds_per_step probes/gen-minsnr)"
steps=$(steps_for "$generate_seconds" "$sps")
"$t" fit --stage generate --init runs/small "${train[@]}" --out runs/small-gen --steps "$steps" --seed 0 --device cuda &
a=$!
"$t" fit --stage generate --init runs/small "${train[@]}" --out runs/small-gen-minsnr --steps "$steps" --seed 0 --device cuda --min-snr-gamma 5 &
b=$!
wait $a && wait $b
for r in small-gen small-gen-minsnr; do
    record "$r" "$steps" "$(python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(r[-1]['elapsed_s']/r[-1]['step'])" "runs/$r/metrics.jsonl")"
done

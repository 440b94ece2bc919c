#!/usr/bin/env bash
# The second half of the shipped `shipped/duet-small` recipe: the bundle `scripts/train-small.sh`
# made (commit 48b3c87, its caption + generate runs trained on an H200) imported back into a
# training run, taught to answer questions and to draw through dream queries (issue 22), then
# its restorers retrained on top and everything evaluated and exported. Runs on a 2-core CPU
# (about an hour and a half); every stage is resumable and skipped once done (`.done`).
#
# Why from the bundle and not from scratch: the caption and generate runs of the earlier bundle
# took an H200; on this CPU they would take hours more, and their training runs are not kept.
# `duet-export import` reads the graphs' weights back bit for bit (tested), so fine-tuning the
# shipped model is the same as fine-tuning its runs.
#
# DUET_SMALL_DIR (default out/small-tune) keeps the work; DUET_DEVICES (default 2) is every
# stage's --devices; DUET_DREAM_STEPS (default 1500) the dream stage's steps; DUET_BASE the bundle
# to start from (default: shipped/duet-small as of commit 48b3c87, extracted from git).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${DUET_SMALL_DIR:-$root/out/small-tune}
devices=${DUET_DEVICES:-2}
dream_steps=${DUET_DREAM_STEPS:-1500}
bundle=${DUET_SMALL_BUNDLE:-$work/bundle}
# shellcheck source=scripts/recipe.sh
source "$root/scripts/recipe.sh"
base=${DUET_BASE:-}
if [ -z "$base" ]; then
    base=$work/base/shipped/duet-small
    if [ ! -f "$base/manifest.json" ]; then
        mkdir -p "$work/base"
        git -C "$root" archive 48b3c87 shipped/duet-small | tar -x -C "$work/base"
    fi
fi

# Data: the earlier bundle's ShapeWorld scenes again (seed 11), now with two questions and two
# edit instructions each, a held-out folder of questions and edits whose scenes never occur in
# training, the caption validation scenes of train-small.sh, and both emoji art styles (their
# captions keep the decoder captioning emoji while it learns the rest).
[ -f data/sw-qa/dataset.json ] || "$t" shapeworld --out data/sw-qa --count 6000 --seed 11 --max-objects 4 --questions 2 --edits 2
[ -f data/sw-qa-val/dataset.json ] || "$t" shapeworld --out data/sw-qa-val --count 500 --seed 12 --max-objects 4 --questions 3 --edits 2 --held-out-from data/sw-qa
[ -f data/sw-val/dataset.json ] || "$t" shapeworld --out data/sw-val --count 500 --seed 12 --max-objects 4
emoji_data
train=(--data data/sw-qa --data data/emoji-google/train --data data/emoji-twitter/train)

# The bundle's captioner and generator as a generate run, then its vocabulary grown by the
# questions' and instructions' words (what, colour, how, many, remove, …) so they are not [UNK].
[ -f runs/imported/config.json ] || "$bin/duet-export" import "$base" runs/imported
[ -f runs/grown/config.json ] || "$t" extend-vocab --run runs/imported "${train[@]}" --out runs/grown
# Dream queries, with the decoder trained on captions + questions beside them (the joint model
# of issue 22); the vision encoder, text encoder and denoiser stay frozen.
stage dream runs/dream \
    "$t" fit --stage dream --init runs/grown "${train[@]}" --out runs/dream \
    --steps "$dream_steps" --batch-size 32 --lr 1e-3 --seed 0 --devices "$devices" $(resume runs/dream)
# The restorers on the (unchanged) frozen encoders, as train-small.sh trains them.
stage fusion runs/fusion \
    "$t" fit --stage fusion --init runs/dream --task colour-column --out runs/fusion --seed 0 --devices "$devices"
stage restore runs/restore \
    "$t" fit --stage restore --init runs/fusion --out runs/restore --steps 600 --seed 0 --devices "$devices"

echo "== evaluation"
final=runs/dream
"$t" eval --stage vqa --run "$final" --data data/sw-qa-val
"$t" eval --stage dream --run "$final" --data data/sw-qa-val --limit 120 --sampler dpmpp --steps 20
"$t" eval --run "$final" --data data/sw-val
eval_emoji "$final"
"$t" eval --stage restore --run runs/restore

echo "== export to $bundle"
"$bin/duet-export" --run runs/restore --out "$bundle" --name duet-small
"$bin/duet-export" quantize --bundle "$bundle" --precision fp16,int8 --eval-data data/sw-val \
    --geneval 50 --sampler dpmpp --steps 20 --restore-examples 1000

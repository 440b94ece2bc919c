# What the shipped model's two recipes (scripts/train-small.sh, scripts/tune-small.sh) share;
# sourced by both once `root` and `work` are set. Builds the binaries (unless DUET_BIN names a
# folder holding them), enters `work`, and defines `bin`, `t` (duet-train) and the helpers below.
bin=${DUET_BIN:-}
if [ -z "$bin" ]; then
    (cd "$root" && cargo build --release -p duet-train -p duet-export)
    bin="${CARGO_TARGET_DIR:-$root/target}/release"
fi
mkdir -p "$work"
cd "$work"
t="$bin/duet-train"

emoji_data() { # both Emoji-CLDR art styles into data/emoji-STYLE (from the npm sources)
    local style
    for style in google twitter; do
        [ -f "data/emoji-$style/dataset.json" ] ||
            "$t" emoji --out "data/emoji-$style" --style "$style" --source "$root/.data/emoji-src"
    done
}

stage() { # stage NAME RUN_DIR COMMAND...: runs COMMAND unless RUN_DIR/.done exists
    local name=$1 run=$2
    shift 2
    if [ -f "$run/.done" ]; then
        echo "== $name: done ($run)"
        return
    fi
    echo "== $name ($(date -u +%H:%M:%S))"
    "$@"
    touch "$run/.done"
}

resume() { [ -f "$1/state.json" ] && echo --resume || true; }

eval_emoji() { # eval_emoji RUN: the card's emoji caption reports, each in a file of its own
    local run=$1 style
    # The first-100 report is the slice tests/tests/shipped.rs recomputes through the graphs.
    "$t" eval --run "$run" --data data/emoji-google/test --limit 100
    mv "$run/eval-emoji.json" "$run/eval-emoji-google-first100.json"
    for style in google twitter; do
        "$t" eval --run "$run" --data "data/emoji-$style/test"
        mv "$run/eval-emoji.json" "$run/eval-emoji-$style.json"
    done
    "$t" eval --run "$run" --data data/emoji-google/train --limit 382
    mv "$run/eval-emoji.json" "$run/eval-emoji-google-train-first382.json"
}

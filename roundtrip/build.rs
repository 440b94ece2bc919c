//! Imports every graph of the shipped bundle with burn-onnx: each `shipped/duet-small/<graph>.onnx`
//! becomes `$OUT_DIR/onnx/<graph>.rs` (a Burn module) and `<graph>.bpk` (its weights).
//!
//! A graph burn-onnx cannot read fails this build; that failure is the finding the round trip
//! exists to report, so it is not caught.

use std::path::PathBuf;

use burn_onnx::{LoadStrategy, ModelGen};

/// Every graph of `shipped/duet-small`, in manifest order.
const GRAPHS: [&str; 8] = [
    "vision_encoder",
    "caption_decoder",
    "text_encoder",
    "denoiser",
    "dream_encoder",
    "restorer_t2i",
    "restorer_i2t",
    "fusion_head",
];

fn main() {
    let bundle = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shipped/duet-small");
    let mut gen = ModelGen::new();
    for graph in GRAPHS {
        let path = bundle.join(format!("{graph}.onnx"));
        println!("cargo:rerun-if-changed={}", path.display());
        gen.input(path.to_str().expect("the repository path is UTF-8"));
    }
    // burn-onnx's defaults, as a user would import (graph simplification on). The importer
    // turns each attention block into Burn's `attention` op (8 each in the decoder and the
    // denoiser, 4 in the vision encoder, 2 in the text encoder). `.simplify(false)` passes the
    // test as well: max |Burn - ort| 6.7e-6 there, 7.6e-6 here (2026-11-30).
    gen.out_dir("onnx/")
        .load_strategy(LoadStrategy::File)
        .run_from_script();
}

//! The shipped bundle's ONNX graphs, imported into Burn by burn-onnx when this crate builds
//! (`build.rs`): one module per graph, each with a generated `Model<B>` whose `forward` takes
//! the graph's inputs in ONNX order and returns its outputs in ONNX order.
//!
//! Nothing here is written by hand except the `include!`s: the point is that the exported graphs
//! are plain ONNX that the Burn ecosystem reads back without help. `tests/` checks the imported
//! models against onnxruntime on the same inputs.

use std::path::PathBuf;

// burn-onnx's generated code names `alloc::vec::Vec` (in `dream_encoder`'s shape arithmetic)
// as a no_std crate would; a std crate brings `alloc` into scope by name like this.
extern crate alloc;

macro_rules! imported {
    ($($graph:ident),* $(,)?) => {
        $(
            #[allow(clippy::all, clippy::pedantic, unused)]
            pub mod $graph {
                include!(concat!(env!("OUT_DIR"), "/onnx/", stringify!($graph), ".rs"));
            }
        )*
    };
}

imported!(
    vision_encoder,
    caption_decoder,
    dream_encoder,
    text_encoder,
    denoiser,
    restorer_i2t,
    restorer_t2i,
    fusion_head,
);

/// The BurnPack weights burn-onnx wrote for `graph` (e.g. `"denoiser"`).
pub fn weights(graph: &str) -> PathBuf {
    PathBuf::from(env!("OUT_DIR"))
        .join("onnx")
        .join(format!("{graph}.bpk"))
}

/// The bundle the graphs were imported from, `shipped/duet-small` in this repository.
pub fn bundle_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shipped/duet-small")
}

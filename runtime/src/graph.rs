//! The graphs a bundle can hold, as one closed set: each [`Graph`]'s name in the manifest, its
//! file name as the exporter writes it, and (through `bundle::contract`) its input/output
//! contract. The exporter names and files its graphs through this enum and checks what it wrote
//! with the runtime's own bundle check, so the two cannot drift apart; a new graph is a new
//! variant, and every `match` over it (the contract first) says what else it needs.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One graph role of a bundle. In `manifest.json` it is written as its [`Graph::name`], so a
/// manifest naming a graph this runtime does not know is refused when it is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Graph {
    /// Image → patch tokens and pooled embedding (every bundle).
    VisionEncoder,
    /// One KV-cache decoding step of the captioner (every bundle).
    CaptionDecoder,
    /// Caption tokens → text tokens and embedding (generation; with [`Graph::Denoiser`]).
    TextEncoder,
    /// One evaluation of the diffusion denoiser (generation; with [`Graph::TextEncoder`]).
    Denoiser,
    /// The caption decoder over a prompt and the dream queries → the denoiser's conditioning
    /// (DreamLLM: generation and editing by the model that understands; with
    /// [`Graph::VisionEncoder`], [`Graph::Denoiser`] and [`Graph::TextEncoder`] for the
    /// unconditional branch).
    DreamEncoder,
    /// Feature restorer text embedding → image embedding (restoration, with the next two).
    RestorerT2i,
    /// Feature restorer image embedding → text embedding.
    RestorerI2t,
    /// Task head over `[image ‖ text]` embeddings.
    FusionHead,
}

impl Graph {
    /// Every graph, in the order a bundle lists them.
    pub const ALL: [Graph; 8] = [
        Graph::VisionEncoder,
        Graph::CaptionDecoder,
        Graph::TextEncoder,
        Graph::Denoiser,
        Graph::DreamEncoder,
        Graph::RestorerT2i,
        Graph::RestorerI2t,
        Graph::FusionHead,
    ];

    /// The graph's name in `manifest.json` (and the ONNX graph's own name).
    pub const fn name(self) -> &'static str {
        match self {
            Graph::VisionEncoder => "vision_encoder",
            Graph::CaptionDecoder => "caption_decoder",
            Graph::TextEncoder => "text_encoder",
            Graph::Denoiser => "denoiser",
            Graph::DreamEncoder => "dream_encoder",
            Graph::RestorerT2i => "restorer_t2i",
            Graph::RestorerI2t => "restorer_i2t",
            Graph::FusionHead => "fusion_head",
        }
    }

    /// The file the exporter writes it to (a bundle's manifest may name another; the runtime
    /// reads whatever the manifest says).
    pub const fn file(self) -> &'static str {
        match self {
            Graph::VisionEncoder => "vision_encoder.onnx",
            Graph::CaptionDecoder => "caption_decoder.onnx",
            Graph::TextEncoder => "text_encoder.onnx",
            Graph::Denoiser => "denoiser.onnx",
            Graph::DreamEncoder => "dream_encoder.onnx",
            Graph::RestorerT2i => "restorer_t2i.onnx",
            Graph::RestorerI2t => "restorer_i2t.onnx",
            Graph::FusionHead => "fusion_head.onnx",
        }
    }

    /// The graph called `name` in a manifest, if it is one duet knows.
    pub fn from_name(name: &str) -> Option<Graph> {
        Graph::ALL.into_iter().find(|g| g.name() == name)
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_files_are_distinct_and_round_trip() {
        let mut names: Vec<_> = Graph::ALL.iter().map(|g| g.name()).collect();
        let mut files: Vec<_> = Graph::ALL.iter().map(|g| g.file()).collect();
        names.sort();
        names.dedup();
        files.sort();
        files.dedup();
        assert_eq!((names.len(), files.len()), (8, 8));
        for g in Graph::ALL {
            assert_eq!(Graph::from_name(g.name()), Some(g));
            assert_eq!(g.file(), format!("{g}.onnx"));
        }
        assert_eq!(Graph::from_name("decoder"), None);
        // serde writes and reads each graph as its manifest name.
        for g in Graph::ALL {
            let json = serde_json::to_string(&g).unwrap();
            assert_eq!(json, format!("\"{}\"", g.name()));
            assert_eq!(serde_json::from_str::<Graph>(&json).unwrap(), g);
        }
        let err = serde_json::from_str::<Graph>("\"decoder\"").unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `decoder`"),
            "{err}"
        );
    }
}

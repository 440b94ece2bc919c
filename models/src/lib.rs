//! Burn module definitions of the duet model family.
//!
//! The exact shapes, formulas and parameter names are the contract in `docs/ARCHITECTURE.md`:
//! the exporter rebuilds these modules as ONNX graphs from the same weights and checks parity,
//! so any change here must be mirrored there.

pub mod activation;
pub mod attention;
pub mod caption;
pub mod conv;
pub mod denoiser;
pub mod dream;
pub mod generation;
pub mod init;
pub mod params;
pub mod position;
pub mod restorer;
pub mod text;
pub mod vision;
pub mod vocab;

pub use caption::{CaptionDecoder, CaptionModel, KvCache};
pub use denoiser::Denoiser;
pub use dream::{DreamModel, DreamQueries};
/// The model family's dimensions live in `duet-spec` (no Burn), shared with the runtime.
pub use duet_spec::{
    timestep_frequencies, ImageFit, ModelSpec, Preset, SpecError, MAX_DREAM_QUERIES,
    MAX_IMAGE_SIZE, TIMESTEP_MAX_PERIOD,
};
pub use generation::GenerationModel;
pub use restorer::{FeatureRestorer, FusionHead, MissingTokens, RestoreConfig, Restorers};
pub use text::TextEncoder;
pub use vision::VisionEncoder;

/// Special token ids shared by the tokenizer, the models and the runtime.
pub mod tokens {
    pub const PAD_ID: u32 = 0;
    pub const BOS_ID: u32 = 1;
    pub const EOS_ID: u32 = 2;
    pub const UNK_ID: u32 = 3;
}

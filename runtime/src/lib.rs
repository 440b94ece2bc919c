//! duet runtime: verified bundle loading and inference on onnxruntime (`ort`) or tract.
//!
//! - [`manifest`]: the bundle manifest schema, shared with the exporter.
//! - [`bundle`]: opening a bundle and refusing anything that does not match (hashes, schema
//!   version, graph I/O contract).
//! - [`engine`]: one graph on one backend, with provider selection and honest skip reasons.
//! - [`engine_set`]: each graph of a bundle loaded once and shared by the pipelines.
//! - [`preprocess`]: image loading and normalisation.
//! - [`caption`]: the captioning pipeline (vision encoder + KV-cache decoder).
//! - [`decode`]: how the decoder's tokens are chosen (greedy, sampling, beam search).
//! - [`bench`]: `duet bench`'s measurements and table.
//! - [`generate`]: the generation pipeline (text encoder + denoiser driven by the shared
//!   samplers, classifier-free guidance as one batch).
//! - [`dream`]: generation and instruction editing through the dream queries (the caption
//!   decoder conditioning the denoiser).
//! - [`embed`]: image and text embeddings in the encoders' shared space.
//! - [`classify`]: image + text classification that restores a missing modality's embedding
//!   with the feature-space diffusion restorers.
//!
//! This crate never depends on Burn: a bundle is everything it needs.

pub mod bench;
pub mod bundle;
/// Schedule and samplers (the `duet-diffusion` crate, shared with the trainer).
pub use duet_diffusion as diffusion;
pub mod caption;
pub mod classify;
pub mod decode;
pub mod display;
pub mod dream;
pub mod embed;
pub mod engine;
pub mod engine_set;
pub mod error_kind;
pub mod generate;
pub mod graph;
pub mod manifest;
pub mod panic_guard;
pub mod preprocess;

pub use bundle::{Bundle, BundleError};
pub use caption::{CaptionError, Captioner, Decoded, OnToken};
pub use classify::{Classification, Classifier, ClassifyError, Modality};
pub use decode::{DecodeOptions, Decoding, Sampling};
pub use dream::Dreamer;
pub use embed::{EmbedError, Embedder};
pub use engine::{
    Engine, EngineError, EngineOptions, Provider, ProviderChoice, ProviderReport, Value, ValueView,
};
pub use engine_set::EngineSet;
pub use error_kind::ErrorKind;
pub use generate::{GenerateError, GenerateOptions, Generator};
pub use manifest::{Manifest, SCHEMA_VERSION};
pub use preprocess::ImageError;

/// Any runtime error, for callers that do not care which stage failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Caption(#[from] CaptionError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
}

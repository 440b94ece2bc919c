//! The embedding pipeline: pooled image embeddings from the vision encoder and pooled text
//! embeddings from the text encoder, in the shared space the two were contrastively aligned in
//! (so `cosine(image, text)` ranks captions for an image and images for a caption).
//!
//! Every bundle embeds images (its vision encoder); texts need the text encoder, which bundles
//! exported from a generate run (or later) carry.

use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;
use ndarray::Array2;
use thiserror::Error;
use tokenizers::Tokenizer;

use crate::bundle::{Bundle, BundleError};
use crate::engine::{Engine, EngineError, EngineOptions, ProviderChoice, ProviderReport, Value};
use crate::engine_set::EngineSet;
use crate::generate::{prompt_ids, GenerateError};
use crate::manifest::{Graph, ImageSpec, TokenizerSpec};
use crate::preprocess::{self, ImageError};

/// Inputs per encoder call: bounds the memory of one call whatever the caller passes.
const CHUNK: usize = 64;

/// Embedding failures.
#[derive(Debug, Error)]
pub enum EmbedError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot load tokenizer {}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("this bundle has no `{}` graph, so it embeds images only; export a generate run (or later) to embed texts", Graph::TextEncoder)]
    NoTextEncoder,
    /// A text the model cannot read: empty, too long, or with words it never saw (the same
    /// rules as generation prompts; `index` counts from 0).
    #[error(transparent)]
    Text(GenerateError),
    #[error("graph `{graph}`: {reason}")]
    Shape { graph: String, reason: String },
    #[error("graph `{graph}` returned a non-finite value (NaN or infinity) in `{output}`")]
    NonFinite { graph: String, output: String },
}

/// A bundle's encoders, loaded once and reused for every input.
pub struct Embedder {
    vision: Arc<Engine>,
    /// The text encoder and the tokenizer it reads, when the bundle has one.
    text: Option<(Arc<Engine>, Tokenizer)>,
    image: ImageSpec,
    tok: TokenizerSpec,
    embed_dim: usize,
    reports: Vec<ProviderReport>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("vision", &self.vision)
            .field("has_text", &self.text.is_some())
            .field("reports", &self.reports)
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads the vision encoder of `bundle`, and its text encoder and tokenizer when it has
    /// them, each on the first provider of `choice` that works.
    pub fn new(
        bundle: &Bundle,
        choice: ProviderChoice,
        options: &EngineOptions,
    ) -> Result<Self, EmbedError> {
        Self::with_engines(&mut EngineSet::new(bundle, choice, options))
    }

    /// Like [`Embedder::new`], sharing graphs already loaded into `engines`.
    pub fn with_engines(engines: &mut EngineSet<'_>) -> Result<Self, EmbedError> {
        let bundle = engines.bundle();
        let m = bundle.manifest();
        let (vision, report) = engines.get::<EmbedError>(Graph::VisionEncoder)?;
        let mut reports = vec![report];
        let text = if bundle.graph(Graph::TextEncoder).is_some() {
            let tokenizer = bundle
                .load_tokenizer()
                .map_err(|(path, reason)| EmbedError::Tokenizer { path, reason })?;
            let (engine, report) = engines.get::<EmbedError>(Graph::TextEncoder)?;
            reports.push(report);
            Some((engine, tokenizer))
        } else {
            None
        };
        Ok(Self {
            vision,
            text,
            image: m.image.clone(),
            tok: m.tokenizer.clone(),
            embed_dim: m.model.embed_dim,
            reports,
        })
    }

    /// Which provider runs each graph, and why any earlier choice was skipped.
    pub fn reports(&self) -> &[ProviderReport] {
        &self.reports
    }

    /// Width `E` of the embeddings.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Whether this bundle embeds texts (has a text encoder).
    pub fn embeds_text(&self) -> bool {
        self.text.is_some()
    }

    /// The pooled embedding `[E]` of each RGB image (of any size: resized to the model's input
    /// size if needed, logged), in input order.
    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(CHUNK) {
            let resized: Vec<RgbImage> = chunk
                .iter()
                .map(|img| preprocess::resize_for(img, &self.image))
                .collect();
            let pixels = preprocess::to_pixels_batch(&resized, &self.image)?;
            let outs = self
                .vision
                .run(&[("pixels", Value::F32(pixels.into_dyn()))])?;
            out.extend(self.rows(outs, Graph::VisionEncoder.name(), "embedding", chunk.len())?);
        }
        Ok(out)
    }

    /// The pooled embedding `[E]` of each text, padded to `max_len` as in training, in input
    /// order. Empty texts, texts longer than the model reads and unknown words are errors
    /// naming the text; a bundle without a text encoder is [`EmbedError::NoTextEncoder`].
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let (engine, tokenizer) = self.text.as_ref().ok_or(EmbedError::NoTextEncoder)?;
        let seqs = texts
            .iter()
            .enumerate()
            .map(|(i, t)| prompt_ids(tokenizer, &self.tok, i, t).map_err(EmbedError::Text))
            .collect::<Result<Vec<_>, _>>()?;
        let l = self.tok.max_len;
        let pad = i64::from(self.tok.pad_id);
        let mut out = Vec::with_capacity(texts.len());
        for chunk in seqs.chunks(CHUNK) {
            let ids = Array2::from_shape_fn((chunk.len(), l), |(i, j)| {
                chunk[i].get(j).copied().unwrap_or(pad)
            });
            let mask = Array2::from_shape_fn((chunk.len(), l), |(i, j)| {
                f32::from(u8::from(j < chunk[i].len()))
            });
            let outs = engine.run(&[
                ("input_ids", Value::I64(ids.into_dyn())),
                ("attn_mask", Value::F32(mask.into_dyn())),
            ])?;
            out.extend(self.rows(
                outs,
                Graph::TextEncoder.name(),
                "text_embedding",
                chunk.len(),
            )?);
        }
        Ok(out)
    }

    /// Output `name` of `graph` as `n` rows of `E` finite values.
    fn rows(
        &self,
        mut outs: std::collections::HashMap<String, Value>,
        graph: &str,
        name: &str,
        n: usize,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let shape_err = |reason: String| EmbedError::Shape {
            graph: graph.to_owned(),
            reason,
        };
        let a = match outs.remove(name) {
            Some(Value::F32(a)) => a,
            _ => return Err(shape_err(format!("output `{name}` missing or not f32"))),
        };
        if a.shape() != [n, self.embed_dim] {
            return Err(shape_err(format!(
                "`{name}` should be [{n}, {}], got {:?}",
                self.embed_dim,
                a.shape()
            )));
        }
        if !a.iter().all(|v| v.is_finite()) {
            return Err(EmbedError::NonFinite {
                graph: graph.to_owned(),
                output: name.to_owned(),
            });
        }
        Ok(a.rows().into_iter().map(|r| r.to_vec()).collect())
    }
}

/// Cosine similarity of two embeddings (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

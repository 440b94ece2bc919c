//! Classification of an image + text pair that works with either modality missing.
//!
//! The pipeline (see `docs/RESTORE.md`): the vision and text encoders give pooled embeddings;
//! when one modality is absent, its embedding is *restored* from the present one by the
//! bundle's feature-space diffusion model (`restorer_t2i` / `restorer_i2t`), sampled with the
//! shared `duet_diffusion::sample` (deterministic DDIM, the rule the trainer unrolls); the
//! `fusion_head` then classifies `[image ‖ text]`.
//!
//! The start noise comes from a `ChaCha8Rng` seeded with the caller's seed, so a bundle, a seed
//! and an input give the same answer on ort and tract (up to float rounding) and the same
//! restored embedding as the trainer's Burn sampler fed the same noise.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;
use ndarray::{Array1, ArrayD, Axis, IxDyn};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::bundle::{Bundle, BundleError};
use crate::diffusion::{self, DiffusionError, NoiseSchedule, Sampler, SamplerConfig};
use crate::embed::{EmbedError, Embedder};
use crate::engine::{Engine, EngineError, EngineOptions, ProviderChoice, ProviderReport, Value};
use crate::engine_set::EngineSet;
use crate::generate::GenerateError;
use crate::manifest::{Graph, RestoreSpec};
use crate::preprocess::ImageError;

/// Classification failures.
#[derive(Debug, Error)]
pub enum ClassifyError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Diffusion(#[from] DiffusionError),
    #[error("this bundle has no restoration graphs (`{}`, `{}`, `{}`); export a restore run to get them", Graph::RestorerT2i, Graph::RestorerI2t, Graph::FusionHead)]
    NoRestorer,
    #[error("neither an image nor a text was given: classification needs at least one of them (the missing one is restored from it)")]
    NothingGiven,
    #[error("the text is empty (leave it out to have it restored from the image)")]
    EmptyText,
    #[error("the text is {tokens} tokens with [BOS]/[EOS]; the model reads at most {max}")]
    TextTooLong { tokens: usize, max: usize },
    #[error("the text has words the model never saw in training: {words:?} (they would be read as [UNK])")]
    UnknownWords { words: Vec<String> },
    #[error("cannot load tokenizer {}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("the text cannot be tokenized: {reason}")]
    Encode { reason: String },
    #[error("graph `{graph}`: {reason}")]
    Shape { graph: String, reason: String },
    /// A NaN or infinite value out of a graph (reported, not classified on).
    #[error("graph `{graph}` returned a non-finite value (NaN or infinity) in `{output}`")]
    NonFinite { graph: String, output: String },
}

impl From<EmbedError> for ClassifyError {
    fn from(e: EmbedError) -> Self {
        match e {
            EmbedError::Bundle(e) => ClassifyError::Bundle(e),
            EmbedError::Engine(e) => ClassifyError::Engine(e),
            EmbedError::Image(e) => ClassifyError::Image(e),
            EmbedError::Tokenizer { path, reason } => ClassifyError::Tokenizer { path, reason },
            EmbedError::Text(e) => e.into(),
            EmbedError::Shape { graph, reason } => ClassifyError::Shape { graph, reason },
            EmbedError::NoTextEncoder => ClassifyError::Shape {
                graph: Graph::TextEncoder.name().to_owned(),
                reason: EmbedError::NoTextEncoder.to_string(),
            },
            // Said as what it is: a non-finite output, not a shape problem.
            EmbedError::NonFinite { graph, output } => ClassifyError::NonFinite { graph, output },
        }
    }
}

impl From<GenerateError> for ClassifyError {
    fn from(e: GenerateError) -> Self {
        match e {
            GenerateError::EmptyPrompt { .. } => ClassifyError::EmptyText,
            GenerateError::PromptTooLong { tokens, max, .. } => {
                ClassifyError::TextTooLong { tokens, max }
            }
            GenerateError::UnknownWords { words, .. } => ClassifyError::UnknownWords { words },
            GenerateError::Tokenizer { path, reason } => ClassifyError::Tokenizer { path, reason },
            GenerateError::Encode { reason, .. } => ClassifyError::Encode { reason },
            GenerateError::Engine(e) => ClassifyError::Engine(e),
            GenerateError::Bundle(e) => ClassifyError::Bundle(e),
            GenerateError::Diffusion(e) => ClassifyError::Diffusion(e),
            GenerateError::NonFinite { graph, output } => {
                ClassifyError::NonFinite { graph, output }
            }
            other => ClassifyError::Shape {
                graph: Graph::TextEncoder.name().to_owned(),
                reason: other.to_string(),
            },
        }
    }
}

fn shape_err(graph: &str, reason: impl Into<String>) -> ClassifyError {
    ClassifyError::Shape {
        graph: graph.to_owned(),
        reason: reason.into(),
    }
}

/// One of the two input modalities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    Image,
    Text,
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Modality::Image => "image",
            Modality::Text => "text",
        })
    }
}

/// A restored embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Restoration {
    /// Which modality was missing and restored.
    pub modality: Modality,
    /// The embedding handed to the head `[E]` (trust gate applied).
    pub embedding: Vec<f32>,
    /// The trust gate `τ` in `(0, 1)`: how much of the restoration the head sees (the rest is
    /// the training mean of the modality); 1 when the bundle has no trust gate.
    pub trust: f32,
}

/// The answer for one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// Index of the most probable class.
    pub class: usize,
    /// Its name.
    pub label: String,
    /// Softmax of the head's logits, in class order.
    pub probabilities: Vec<f32>,
    pub logits: Vec<f32>,
    /// The restored modality, if one was missing.
    pub restored: Option<Restoration>,
}

impl Classification {
    /// The `k` most probable classes as `(index, probability)`, most probable first.
    pub fn top(&self, k: usize) -> Vec<(usize, f32)> {
        let mut order: Vec<usize> = (0..self.probabilities.len()).collect();
        order.sort_by(|&a, &b| self.probabilities[b].total_cmp(&self.probabilities[a]));
        order
            .into_iter()
            .take(k)
            .map(|i| (i, self.probabilities[i]))
            .collect()
    }
}

/// A bundle's classification pipeline, loaded once and reused.
pub struct Classifier {
    /// The two encoders (and the tokenizer) that embed what is given.
    embedder: Embedder,
    t2i: Arc<Engine>,
    i2t: Arc<Engine>,
    head: Arc<Engine>,
    schedule: NoiseSchedule,
    spec: RestoreSpec,
    embed_dim: usize,
    reports: Vec<ProviderReport>,
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("task", &self.spec.task)
            .field("classes", &self.spec.classes.len())
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

impl Classifier {
    /// Loads the tokenizer, both encoders, both restorers and the head of `bundle`, each on the
    /// first provider of `choice` that works. Errors with [`ClassifyError::NoRestorer`] on a
    /// bundle without restoration.
    pub fn new(
        bundle: &Bundle,
        choice: ProviderChoice,
        options: &EngineOptions,
    ) -> Result<Self, ClassifyError> {
        Self::with_engines(&mut EngineSet::new(bundle, choice, options))
    }

    /// Like [`Classifier::new`], sharing graphs already loaded into `engines` (the encoders of
    /// a captioner or generator built from the same set).
    pub fn with_engines(engines: &mut EngineSet<'_>) -> Result<Self, ClassifyError> {
        let bundle = engines.bundle();
        let m = bundle.manifest();
        let spec = m.restore.clone().ok_or(ClassifyError::NoRestorer)?;
        let schedule = NoiseSchedule::from_alphas_cumprod(spec.alphas_cumprod.clone())?;
        let embed_dim = m.model.embed_dim;
        // Those the bundle has, in parallel; a missing one is refused below with its own error.
        let present: Vec<Graph> = [
            Graph::VisionEncoder,
            Graph::TextEncoder,
            Graph::RestorerT2i,
            Graph::RestorerI2t,
            Graph::FusionHead,
        ]
        .into_iter()
        .filter(|&g| bundle.graph(g).is_some())
        .collect();
        engines.preload::<ClassifyError>(&present)?;
        let embedder = Embedder::with_engines(engines)?;
        if !embedder.embeds_text() {
            return Err(EmbedError::NoTextEncoder.into());
        }
        let mut reports = embedder.reports().to_vec();
        let mut load = |graph: Graph| -> Result<Arc<Engine>, ClassifyError> {
            let (engine, report) = engines.get::<ClassifyError>(graph)?;
            reports.push(report);
            Ok(engine)
        };
        let t2i = load(Graph::RestorerT2i)?;
        let i2t = load(Graph::RestorerI2t)?;
        let head = load(Graph::FusionHead)?;
        Ok(Self {
            embedder,
            t2i,
            i2t,
            head,
            schedule,
            spec,
            embed_dim,
            reports,
        })
    }

    /// Which provider runs each graph, and why any earlier choice was skipped.
    pub fn reports(&self) -> &[ProviderReport] {
        &self.reports
    }

    /// The restoration settings and class names of the bundle.
    pub fn spec(&self) -> &RestoreSpec {
        &self.spec
    }

    /// Width `E` of the embeddings.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// The pooled image embedding `[E]` of an RGB image of any size (resized to the model's
    /// input size if needed, logged).
    pub fn embed_image(&self, image: &RgbImage) -> Result<Vec<f32>, ClassifyError> {
        let mut rows = self.embedder.embed_images(std::slice::from_ref(image))?;
        Ok(rows.remove(0))
    }

    /// The pooled text embedding `[E]`, the text padded to `max_len` as in training. Empty
    /// text, text longer than the model reads and unknown words are errors.
    pub fn embed_text(&self, text: &str) -> Result<Vec<f32>, ClassifyError> {
        let mut rows = self.embedder.embed_texts(&[text])?;
        Ok(rows.remove(0))
    }

    /// Output `name` of `graph` as one row of `E` values.
    fn row(
        &self,
        outs: &mut std::collections::HashMap<String, Value>,
        graph: &str,
        name: &str,
    ) -> Result<Vec<f32>, ClassifyError> {
        match outs.remove(name) {
            Some(Value::F32(a)) if a.shape() == [1, self.embed_dim] => {
                Ok(a.into_raw_vec_and_offset().0)
            }
            Some(Value::F32(a)) => Err(shape_err(
                graph,
                format!(
                    "`{name}` should be [1, {}], got {:?}",
                    self.embed_dim,
                    a.shape()
                ),
            )),
            _ => Err(shape_err(
                graph,
                format!("output `{name}` missing or not f32"),
            )),
        }
    }

    /// The start noise `[1, E]` of a restoration with `seed`.
    pub fn start_noise(&self, seed: u64) -> ArrayD<f32> {
        diffusion::gaussian(&[1, self.embed_dim], &mut ChaCha8Rng::seed_from_u64(seed))
    }

    /// Restores the embedding of `missing` from the present modality's embedding `condition`
    /// `[E]`, starting from [`Classifier::start_noise`]`(seed)`.
    pub fn restore(
        &self,
        missing: Modality,
        condition: &[f32],
        seed: u64,
    ) -> Result<Restoration, ClassifyError> {
        self.restore_from(missing, condition, self.start_noise(seed))
    }

    /// [`Classifier::restore`] from an explicit start noise `[1, E]` (the standardised space
    /// the restorer samples in).
    pub fn restore_from(
        &self,
        missing: Modality,
        condition: &[f32],
        noise: ArrayD<f32>,
    ) -> Result<Restoration, ClassifyError> {
        let (engine, graph) = match missing {
            Modality::Image => (&self.t2i, Graph::RestorerT2i.name()),
            Modality::Text => (&self.i2t, Graph::RestorerI2t.name()),
        };
        let e = self.embed_dim;
        if condition.len() != e || noise.shape() != [1, e] {
            return Err(shape_err(
                graph,
                format!(
                    "condition has {} values and the noise shape {:?}; both must be one row of {e}",
                    condition.len(),
                    noise.shape()
                ),
            ));
        }
        let cond = ArrayD::from_shape_vec(IxDyn(&[1, e]), condition.to_vec())
            .map_err(|err| shape_err(graph, err.to_string()))?;
        let call = |x: &ArrayD<f32>, t: usize| {
            engine.run(&[
                ("x", Value::F32(x.clone())),
                (
                    "timestep",
                    Value::F32(Array1::from_elem(1, t as f32).into_dyn()),
                ),
                ("condition", Value::F32(cond.clone())),
            ])
        };
        let config = SamplerConfig {
            sampler: Sampler::Ddim { eta: 0.0 },
            steps: self.spec.sampler_steps,
            // The trainer's unrolled sampler never clips: features are not bounded like pixels.
            clip_x0: false,
        };
        // eta = 0 draws no extra noise; the generator is only there for the signature.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let z = diffusion::sample(
            &self.schedule,
            self.spec.prediction,
            &config,
            noise,
            &mut rng,
            |x, t| -> Result<ArrayD<f32>, ClassifyError> {
                let mut outs = call(x, t)?;
                match outs.remove("prediction") {
                    Some(Value::F32(a)) => Ok(a),
                    _ => Err(shape_err(graph, "output `prediction` missing or not f32")),
                }
            },
        )?;
        // One more call on the final sample reads the embedding the head gets (statistics and
        // trust gate live in the graph; its prediction output is unused here).
        let mut outs = call(&z, 0)?;
        let embedding = self.row(&mut outs, graph, "restored")?;
        let trust = match outs.remove("trust") {
            Some(Value::F32(a)) if a.shape() == [1, 1] => a[[0, 0]],
            _ => return Err(shape_err(graph, "output `trust` missing or not [1, 1]")),
        };
        Ok(Restoration {
            modality: missing,
            embedding,
            trust,
        })
    }

    /// Logits `[C]` of the head for one pair of embeddings.
    pub fn head_logits(&self, image: &[f32], text: &[f32]) -> Result<Vec<f32>, ClassifyError> {
        let e = self.embed_dim;
        let row = |v: &[f32]| {
            ArrayD::from_shape_vec(IxDyn(&[1, e]), v.to_vec())
                .map_err(|err| shape_err(Graph::FusionHead.name(), err.to_string()))
        };
        let mut outs = self.head.run(&[
            ("image_embedding", Value::F32(row(image)?)),
            ("text_embedding", Value::F32(row(text)?)),
        ])?;
        let c = self.spec.classes.len();
        match outs.remove("logits") {
            // A NaN would turn every probability into NaN and still "win" a class.
            Some(Value::F32(a)) if a.shape() == [1, c] && a.iter().all(|x| x.is_finite()) => {
                Ok(a.into_raw_vec_and_offset().0)
            }
            Some(Value::F32(a)) if a.shape() == [1, c] => Err(shape_err(
                Graph::FusionHead.name(),
                format!("`logits` are not finite: {a}"),
            )),
            _ => Err(shape_err(
                Graph::FusionHead.name(),
                format!("output `logits` missing or not [1, {c}]"),
            )),
        }
    }

    /// Classifies a pair; either side may be missing (it is restored from the other, with
    /// start noise from `seed`), not both.
    pub fn classify(
        &self,
        image: Option<&RgbImage>,
        text: Option<&str>,
        seed: u64,
    ) -> Result<Classification, ClassifyError> {
        let image = image.map(|i| self.embed_image(i)).transpose()?;
        let text = text.map(|t| self.embed_text(t)).transpose()?;
        let (image, text, restored) = match (image, text) {
            (None, None) => return Err(ClassifyError::NothingGiven),
            (Some(i), Some(t)) => (i, t, None),
            (None, Some(t)) => {
                let r = self.restore(Modality::Image, &t, seed)?;
                (r.embedding.clone(), t, Some(r))
            }
            (Some(i), None) => {
                let r = self.restore(Modality::Text, &i, seed)?;
                (i, r.embedding.clone(), Some(r))
            }
        };
        let logits = self.head_logits(&image, &text)?;
        let probabilities = softmax(&logits);
        let class = (0..probabilities.len())
            .max_by(|&a, &b| probabilities[a].total_cmp(&probabilities[b]))
            .unwrap_or(0);
        Ok(Classification {
            class,
            label: self.spec.classes.get(class).cloned().unwrap_or_default(),
            probabilities,
            logits,
            restored,
        })
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let a = Array1::from_vec(logits.to_vec());
    let max = a.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let e = a.mapv(|v| (v - max).exp());
    let sum = e.sum_axis(Axis(0)).into_scalar();
    e.mapv(|v| v / sum).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 3.0, -2.0, 3.5]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[3] > p[1] && p[1] > p[0] && p[0] > p[2]);
        // Large logits do not overflow.
        let p = softmax(&[1000.0, 0.0]);
        assert!((p[0] - 1.0).abs() < 1e-6 && p[1] >= 0.0);
    }

    #[test]
    fn top_orders_by_probability() {
        let c = Classification {
            class: 2,
            label: "c".into(),
            probabilities: vec![0.2, 0.1, 0.6, 0.1],
            logits: vec![0.0; 4],
            restored: None,
        };
        assert_eq!(c.top(2), vec![(2, 0.6), (0, 0.2)]);
        assert_eq!(c.top(10).len(), 4);
    }
}

//! Text-to-image generation: text encoder → a diffusion sampler driving the denoiser graph,
//! with classifier-free guidance run as one batch of `2N` (conditional rows, then
//! unconditional rows on the empty caption).
//!
//! The samplers are `duet-diffusion`'s, the very code the trainer samples with, and the noise
//! comes from a `ChaCha8Rng` seeded with the caller's seed, so a bundle, a seed and a prompt
//! give the same image on ort and on tract (up to float rounding) and the same image the
//! trainer's `LoadedGenerator::generate` makes from the Burn weights.

use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;
use ndarray::{concatenate, s, Array1, Array2, ArrayD, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;
use tokenizers::Tokenizer;

use crate::bundle::{Bundle, BundleError};
use crate::diffusion::{self, DiffusionError, NoiseSchedule, Prediction, Sampler, SamplerConfig};
use crate::engine::{Engine, EngineError, EngineOptions, ProviderChoice, ProviderReport, Value};
use crate::engine_set::EngineSet;
use crate::manifest::{Graph, ModelSpec, TokenizerSpec};

/// Most images one call generates (each costs `steps` denoiser evaluations).
pub const MAX_BATCH: usize = 64;

/// The longest prompt handed to the tokenizer, in bytes. A prompt that fits the model
/// (`tokenizer.max_len` tokens, 48 in the shipped bundle) is far shorter; the bound keeps a
/// megabytes-long prompt from costing the tokenizer gigabytes before it is refused.
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;

/// Generation failures.
#[derive(Debug, Error)]
pub enum GenerateError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Diffusion(#[from] DiffusionError),
    #[error(
        "this bundle has no generator (`{}` and `{}` graphs); export a generate run to get one",
        Graph::TextEncoder,
        Graph::Denoiser
    )]
    NoGenerator,
    #[error(
        "this bundle has no `{}` graph; export a dream run (`duet-train fit --stage dream`) to \
         generate or edit through the dream queries",
        Graph::DreamEncoder
    )]
    NoDream,
    /// The captioner half of the dream pipeline (the vision encoder, its image handling).
    #[error(transparent)]
    Caption(Box<crate::CaptionError>),
    #[error("cannot load tokenizer {}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("no prompt given")]
    NoPrompts,
    #[error("{count} images requested; at most {MAX_BATCH} per call")]
    TooMany { count: usize },
    #[error("prompt {index} is empty")]
    EmptyPrompt { index: usize },
    #[error("prompt {index} is {tokens} tokens with [BOS]/[EOS]; the model reads at most {max}")]
    PromptTooLong {
        index: usize,
        tokens: usize,
        max: usize,
    },
    #[error("prompt {index} has words the model never saw in training: {words:?} (they would be read as [UNK])")]
    UnknownWords { index: usize, words: Vec<String> },
    #[error("prompt {index} cannot be tokenized: {reason}")]
    Encode { index: usize, reason: String },
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("graph `{graph}`: {reason}")]
    Shape { graph: String, reason: String },
    /// A NaN or infinite prediction: a broken graph or weights, or a provider computing in too
    /// low a precision (TensorRT fp16). Reported rather than sampled on, since the image would
    /// come out black or noisy and look like a result.
    #[error("graph `{graph}` returned a non-finite value (NaN or infinity) in `{output}`")]
    NonFinite { graph: String, output: String },
}

/// How to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    pub sampler: Sampler,
    pub steps: usize,
    /// Classifier-free guidance scale; 1 uses the conditional prediction alone (and skips the
    /// unconditional half of the batch), 0 the unconditional one.
    pub guidance: f32,
    pub seed: u64,
}

/// A bundle's generation pipeline, loaded once and reused.
pub struct Generator {
    tokenizer: Tokenizer,
    text: Arc<Engine>,
    denoiser: Arc<Engine>,
    schedule: NoiseSchedule,
    prediction: Prediction,
    defaults: (usize, f32),
    model: ModelSpec,
    tok: TokenizerSpec,
    reports: Vec<ProviderReport>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("text", &self.text)
            .field("denoiser", &self.denoiser)
            .field("prediction", &self.prediction)
            .finish_non_exhaustive()
    }
}

fn shape_err(graph: &str, reason: impl Into<String>) -> GenerateError {
    GenerateError::Shape {
        graph: graph.to_string(),
        reason: reason.into(),
    }
}

/// Token ids `[N, L]` and their 1/0 mask, `L` = the tokenizer's `max_len`.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPrompts {
    pub ids: Array2<i64>,
    pub mask: Array2<f32>,
    /// Longest prompt in tokens (BOS and EOS included).
    pub longest: usize,
}

impl Generator {
    /// Loads the tokenizer and the text-encoder and denoiser graphs of `bundle`, each on the
    /// first provider of `choice` that works. Errors with [`GenerateError::NoGenerator`] on a
    /// caption-only bundle.
    pub fn new(
        bundle: &Bundle,
        choice: ProviderChoice,
        options: &EngineOptions,
    ) -> Result<Self, GenerateError> {
        Self::with_engines(&mut EngineSet::new(bundle, choice, options))
    }

    /// Like [`Generator::new`], sharing graphs already loaded into `engines`.
    pub fn with_engines(engines: &mut EngineSet<'_>) -> Result<Self, GenerateError> {
        let bundle = engines.bundle();
        let m = bundle.manifest();
        let spec = m.diffusion.as_ref().ok_or(GenerateError::NoGenerator)?;
        let tokenizer = bundle
            .load_tokenizer()
            .map_err(|(path, reason)| GenerateError::Tokenizer { path, reason })?;
        let schedule = NoiseSchedule::from_alphas_cumprod(spec.alphas_cumprod.clone())?;
        engines.preload::<GenerateError>(&[Graph::TextEncoder, Graph::Denoiser])?;
        let (text, r1) = engines.get::<GenerateError>(Graph::TextEncoder)?;
        let (denoiser, r2) = engines.get::<GenerateError>(Graph::Denoiser)?;
        Ok(Generator {
            tokenizer,
            text,
            denoiser,
            schedule,
            prediction: spec.prediction,
            defaults: (spec.default_steps, spec.default_guidance),
            model: m.model.clone(),
            tok: m.tokenizer.clone(),
            reports: vec![r1, r2],
        })
    }

    /// Which provider runs each graph and why the others were skipped.
    pub fn reports(&self) -> &[ProviderReport] {
        &self.reports
    }

    pub fn text_engine(&self) -> &Engine {
        &self.text
    }

    pub fn denoiser_engine(&self) -> &Engine {
        &self.denoiser
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    pub fn image_size(&self) -> usize {
        self.model.image_size
    }

    /// The bundle's defaults: deterministic DDIM with the manifest's steps and guidance.
    pub fn default_options(&self) -> GenerateOptions {
        GenerateOptions {
            sampler: Sampler::Ddim { eta: 0.0 },
            steps: self.defaults.0,
            guidance: self.defaults.1,
            seed: 0,
        }
    }

    /// Tokenizes prompts to `[BOS] … [EOS] [PAD]…` rows of `max_len`. An empty prompt, one
    /// longer than the model reads, or one with words outside the vocabulary is an error (an
    /// unknown word would silently become `[UNK]` and the image would ignore it).
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<EncodedPrompts, GenerateError> {
        Ok(self.rows(&self.prompt_seqs(prompts)?))
    }

    /// `[BOS] … [EOS]` of each prompt (see [`Generator::encode_prompts`]).
    fn prompt_seqs(&self, prompts: &[&str]) -> Result<Vec<Vec<i64>>, GenerateError> {
        prompts
            .iter()
            .enumerate()
            .map(|(index, p)| prompt_ids(&self.tokenizer, &self.tok, index, p))
            .collect()
    }

    fn rows(&self, seqs: &[Vec<i64>]) -> EncodedPrompts {
        let l = self.tok.max_len;
        let pad = i64::from(self.tok.pad_id);
        let ids = Array2::from_shape_fn((seqs.len(), l), |(i, j)| {
            seqs[i].get(j).copied().unwrap_or(pad)
        });
        let mask = Array2::from_shape_fn((seqs.len(), l), |(i, j)| {
            f32::from(u8::from(j < seqs[i].len()))
        });
        EncodedPrompts {
            ids,
            mask,
            longest: seqs.iter().map(Vec::len).max().unwrap_or(0),
        }
    }

    /// Runs the text encoder and returns `text_tokens` cut to `longest` positions: padding is
    /// masked everywhere, so trailing padding only costs time in every denoiser step.
    fn encode_text(
        &self,
        enc: &EncodedPrompts,
        longest: usize,
    ) -> Result<(ArrayD<f32>, ArrayD<f32>), GenerateError> {
        let mut outs = self.text.run(&[
            ("input_ids", Value::I64(enc.ids.clone().into_dyn())),
            ("attn_mask", Value::F32(enc.mask.clone().into_dyn())),
        ])?;
        let tokens = match outs.remove("text_tokens") {
            Some(Value::F32(a)) => a,
            _ => {
                return Err(shape_err(
                    Graph::TextEncoder.name(),
                    "output `text_tokens` missing or not f32",
                ))
            }
        };
        let want = [enc.ids.nrows(), self.tok.max_len, self.model.d_model];
        if tokens.shape() != want {
            return Err(shape_err(
                Graph::TextEncoder.name(),
                format!("text_tokens should be {want:?}, got {:?}", tokens.shape()),
            ));
        }
        let tokens = tokens.slice(s![.., ..longest, ..]).to_owned().into_dyn();
        let mask = enc.mask.slice(s![.., ..longest]).to_owned().into_dyn();
        Ok((tokens, mask))
    }

    fn check_options(&self, opts: &GenerateOptions) -> Result<(), GenerateError> {
        let t = self.schedule.train_steps();
        if opts.steps == 0 || opts.steps > t {
            return Err(GenerateError::InvalidOption(format!(
                "steps must be 1 ..= {t} (the training timesteps), got {}",
                opts.steps
            )));
        }
        if !(opts.guidance.is_finite() && opts.guidance >= 0.0) {
            return Err(GenerateError::InvalidOption(format!(
                "guidance must be a finite number >= 0, got {}",
                opts.guidance
            )));
        }
        if let Sampler::Ddim { eta } = opts.sampler {
            if !(eta.is_finite() && eta >= 0.0) {
                return Err(GenerateError::InvalidOption(format!(
                    "eta must be a finite number >= 0, got {eta}"
                )));
            }
        }
        Ok(())
    }

    /// Generates one image per prompt; returns `[N, 3, S, S]` in `[-1, 1]`. Prompts may repeat
    /// (the noise differs per row).
    pub fn generate(
        &self,
        prompts: &[&str],
        opts: &GenerateOptions,
    ) -> Result<ArrayD<f32>, GenerateError> {
        if prompts.is_empty() {
            return Err(GenerateError::NoPrompts);
        }
        if prompts.len() > MAX_BATCH {
            return Err(GenerateError::TooMany {
                count: prompts.len(),
            });
        }
        self.check_options(opts)?;
        let n = prompts.len();
        let mut seqs = self.prompt_seqs(prompts)?;
        let guided = opts.guidance != 1.0;
        if guided {
            // Conditional rows, then N copies of the empty caption `[BOS] [EOS]`.
            let empty = vec![i64::from(self.tok.bos_id), i64::from(self.tok.eos_id)];
            seqs.extend(std::iter::repeat_n(empty, n));
        }
        let enc = self.rows(&seqs);
        let (tokens, mask) = self.encode_text(&enc, enc.longest)?;
        self.sample(n, tokens, mask, guided, opts)
    }

    /// Generates one image per row of `cond` `[N, L, D]` (conditioning tokens in the text
    /// encoder's place, e.g. the dream encoder's) with key mask `cond_mask` `[N, L]`, guided
    /// against the text encoder's empty caption like [`Generator::generate`]; returns
    /// `[N, 3, S, S]` in `[-1, 1]`.
    pub fn generate_conditioned(
        &self,
        cond: ArrayD<f32>,
        cond_mask: ArrayD<f32>,
        opts: &GenerateOptions,
    ) -> Result<ArrayD<f32>, GenerateError> {
        let n = cond.shape().first().copied().unwrap_or(0);
        let d = self.model.d_model;
        if cond.ndim() != 3 || cond.shape()[2] != d || n == 0 {
            return Err(shape_err(
                Graph::Denoiser.name(),
                format!("conditioning must be [N>0, L, {d}], got {:?}", cond.shape()),
            ));
        }
        if n > MAX_BATCH {
            return Err(GenerateError::TooMany { count: n });
        }
        let l = cond.shape()[1];
        if cond_mask.shape() != [n, l] {
            return Err(shape_err(
                Graph::Denoiser.name(),
                format!(
                    "conditioning mask must be [{n}, {l}], got {:?}",
                    cond_mask.shape()
                ),
            ));
        }
        self.check_options(opts)?;
        let guided = opts.guidance != 1.0;
        if !guided {
            return self.sample(n, cond, cond_mask, false, opts);
        }
        // The unconditional rows: the empty caption's two tokens, both sides padded with masked
        // rows to one width (a masked key changes nothing).
        let empty = vec![i64::from(self.tok.bos_id), i64::from(self.tok.eos_id)];
        let enc = self.rows(&vec![empty; n]);
        let (uncond, uncond_mask) = self.encode_text(&enc, 2)?;
        let width = l.max(2);
        let pad = |t: &ArrayD<f32>, m: &ArrayD<f32>| -> (ArrayD<f32>, ArrayD<f32>) {
            let len = t.shape()[1];
            let mut tp = ArrayD::zeros(vec![n, width, d]);
            tp.slice_mut(s![.., ..len, ..]).assign(t);
            let mut mp = ArrayD::zeros(vec![n, width]);
            mp.slice_mut(s![.., ..len]).assign(m);
            (tp, mp)
        };
        let (c, cm) = pad(&cond, &cond_mask);
        let (u, um) = pad(&uncond, &uncond_mask);
        let join = |a: &ArrayD<f32>, b: &ArrayD<f32>| {
            concatenate(Axis(0), &[a.view(), b.view()])
                .map_err(|e| shape_err(Graph::Denoiser.name(), e.to_string()))
        };
        self.sample(n, join(&c, &u)?, join(&cm, &um)?, true, opts)
    }

    /// The sampling loop over `n` images whose denoiser conditioning is `tokens` / `mask`
    /// (`2n` rows, conditional then unconditional, when `guided`).
    fn sample(
        &self,
        n: usize,
        tokens: ArrayD<f32>,
        mask: ArrayD<f32>,
        guided: bool,
        opts: &GenerateOptions,
    ) -> Result<ArrayD<f32>, GenerateError> {
        let rows = tokens.shape()[0];
        let size = self.model.image_size;
        let c = self.model.channels;
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let x = diffusion::gaussian(&[n, c, size, size], &mut rng);
        let config = SamplerConfig {
            sampler: opts.sampler,
            steps: opts.steps,
            clip_x0: true,
        };
        let denoise = |x: &ArrayD<f32>, t: usize| -> Result<ArrayD<f32>, GenerateError> {
            let xb = if guided {
                concatenate(Axis(0), &[x.view(), x.view()])
                    .map_err(|e| shape_err(Graph::Denoiser.name(), e.to_string()))?
            } else {
                x.clone()
            };
            let tb = Array1::from_elem(rows, t as f32).into_dyn();
            let mut outs = self.denoiser.run(&[
                ("x", Value::F32(xb)),
                ("timestep", Value::F32(tb)),
                ("text_tokens", Value::F32(tokens.clone())),
                ("text_mask", Value::F32(mask.clone())),
            ])?;
            let out = match outs.remove("prediction") {
                Some(Value::F32(a)) => a,
                _ => {
                    return Err(shape_err(
                        Graph::Denoiser.name(),
                        "output `prediction` missing or not f32",
                    ))
                }
            };
            if out.shape() != [rows, c, size, size] {
                return Err(shape_err(
                    Graph::Denoiser.name(),
                    format!(
                        "prediction should be {:?}, got {:?}",
                        [rows, c, size, size],
                        out.shape()
                    ),
                ));
            }
            if !out.iter().all(|v| v.is_finite()) {
                return Err(GenerateError::NonFinite {
                    graph: Graph::Denoiser.name().to_string(),
                    output: "prediction".to_string(),
                });
            }
            if !guided {
                return Ok(out);
            }
            let cond = out.slice_axis(Axis(0), (0..n).into()).to_owned();
            let uncond = out.slice_axis(Axis(0), (n..2 * n).into()).to_owned();
            Ok(diffusion::guide(&uncond, &cond, opts.guidance))
        };
        diffusion::sample(
            &self.schedule,
            self.prediction,
            &config,
            x,
            &mut rng,
            denoise,
        )
    }

    /// [`Generator::generate`] as RGB images.
    pub fn generate_images(
        &self,
        prompts: &[&str],
        opts: &GenerateOptions,
    ) -> Result<Vec<RgbImage>, GenerateError> {
        let x = self.generate(prompts, opts)?;
        Ok(diffusion::to_images(&x)?)
    }
}

/// `[BOS] … [EOS]` ids of one prompt. An empty prompt, one longer than the model reads, or one
/// with words outside the vocabulary is an error (an unknown word would silently become
/// `[UNK]` and the model would ignore it). `index` names the prompt in errors.
pub(crate) fn prompt_ids(
    tokenizer: &Tokenizer,
    tok: &TokenizerSpec,
    index: usize,
    prompt: &str,
) -> Result<Vec<i64>, GenerateError> {
    if prompt.trim().is_empty() {
        return Err(GenerateError::EmptyPrompt { index });
    }
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(GenerateError::Encode {
            index,
            reason: format!(
                "it is {} bytes; at most {MAX_PROMPT_BYTES} are read",
                prompt.len()
            ),
        });
    }
    let enc = tokenizer
        .encode(prompt, false)
        .map_err(|e| GenerateError::Encode {
            index,
            reason: e.to_string(),
        })?;
    let special = [tok.pad_id, tok.bos_id, tok.eos_id];
    let unknown: Vec<String> = enc
        .get_ids()
        .iter()
        .zip(enc.get_offsets())
        .filter(|(&id, _)| id == tok.unk_id || special.contains(&id))
        .map(|(_, &(a, b))| prompt.get(a..b).unwrap_or("?").to_owned())
        .collect();
    if !unknown.is_empty() {
        return Err(GenerateError::UnknownWords {
            index,
            words: unknown,
        });
    }
    let tokens = enc.get_ids().len() + 2;
    if tokens > tok.max_len {
        return Err(GenerateError::PromptTooLong {
            index,
            tokens,
            max: tok.max_len,
        });
    }
    let mut seq = Vec::with_capacity(tokens);
    seq.push(i64::from(tok.bos_id));
    seq.extend(enc.get_ids().iter().map(|&t| i64::from(t)));
    seq.push(i64::from(tok.eos_id));
    Ok(seq)
}

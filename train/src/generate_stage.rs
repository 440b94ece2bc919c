//! The generate stage: trains the text encoder and the diffusion denoiser on top of a trained
//! captioner, whose vision encoder stays frozen.
//!
//! Loss = diffusion loss (MSE of the v- or ε-prediction at a uniformly drawn timestep) +
//! `contrastive_weight` × a CLIP-style loss that pulls each caption's pooled text embedding
//! towards its image's embedding from the frozen vision encoder (locked-image tuning), so text
//! and image share one embedding space without touching the captioner. A fraction
//! `cond_dropout` of the captions is replaced by the empty caption so one model learns both
//! the conditional and the unconditional prediction that classifier-free guidance mixes.
//!
//! The run directory holds the whole model: `vision.*` and `decoder.*` copied unchanged from
//! the `--init` caption run, plus the trained `text.*` and `denoiser.*`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use duet_diffusion::{gaussian, guide, sample, NoiseSchedule, Prediction, SamplerConfig};
use duet_models::params::{load_named_tensors, named_tensors, NamedTensors};
use duet_models::tokens::{BOS_ID, EOS_ID, PAD_ID};
use duet_models::{Denoiser, ModelSpec, Preset, TextEncoder, VisionEncoder};
use ndarray::ArrayD;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::caption_stage::{
    batch_indices, load_records, prepare, save_checkpoint, warmup_cosine_lr, with_prefixes,
    CaptionTrainConfig, PreparedData, CONFIG_FILE, METRICS_FILE, TOKENIZER_FILE,
};
use crate::checkpoint::{
    load_weights, read_json, write_json, TrainState, STATE_FILE, WEIGHTS_FILE,
};
use crate::datasets::{folders_display, load_folders};
use crate::ema::Ema;
use crate::tokenizer::{encode_caption, load_tokenizer, save_tokenizer};

/// The trained part of the generation direction.
#[derive(Module, Debug)]
pub struct Generator<B: Backend> {
    pub text: TextEncoder<B>,
    pub denoiser: Denoiser<B>,
}

impl<B: Backend> Generator<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        Self {
            text: TextEncoder::new(cfg, device),
            denoiser: Denoiser::new(cfg, device),
        }
    }
}

/// Diffusion and contrastive settings of a generate run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffusionSettings {
    pub prediction: Prediction,
    /// Training timesteps `T` of the cosine schedule.
    pub train_timesteps: usize,
    /// Fraction of captions replaced by the empty caption (classifier-free guidance).
    pub cond_dropout: f64,
    pub contrastive_weight: f64,
    /// Softmax temperature of the contrastive loss.
    pub temperature: f64,
    /// Decay of the weight average that is published (see [`crate::ema`]).
    #[serde(default = "default_ema_decay")]
    pub ema_decay: f64,
    /// Min-SNR-γ loss weighting (Hang et al. 2023): sample i's squared error is weighted by
    /// `min(SNR_i, γ) / (SNR_i + 1)` for v-prediction (`min(SNR_i, γ) / SNR_i` for ε), which
    /// stops the nearly-clean timesteps (huge SNR, little to learn) from dominating the
    /// gradient. `None`: uniform weights (every run written before it existed).
    #[serde(default)]
    pub min_snr_gamma: Option<f64>,
}

impl DiffusionSettings {
    /// The loss weight of a sample at cumulative signal level `alpha_bar`.
    pub fn loss_weight(&self, alpha_bar: f64) -> f64 {
        let Some(gamma) = self.min_snr_gamma else {
            return 1.0;
        };
        // Clamped so the ends of the schedule (ᾱ = 1 or 0) stay finite.
        let ab = alpha_bar.clamp(1e-8, 1.0 - 1e-8);
        let snr = ab / (1.0 - ab);
        match self.prediction {
            Prediction::V => snr.min(gamma) / (snr + 1.0),
            Prediction::Epsilon => snr.min(gamma) / snr,
        }
    }
}

fn default_ema_decay() -> f64 {
    0.999
}

impl Default for DiffusionSettings {
    fn default() -> Self {
        Self {
            prediction: Prediction::V,
            train_timesteps: 1000,
            cond_dropout: 0.1,
            contrastive_weight: 0.1,
            temperature: 0.07,
            ema_decay: default_ema_decay(),
            min_snr_gamma: None,
        }
    }
}

/// Everything that defines a generate run; written to `RUN/config.json`. Its fields are a
/// superset of [`CaptionTrainConfig`]'s so tools that only need the model read either.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateTrainConfig {
    pub stage: crate::stage::Stage,
    pub preset: Preset,
    pub model: ModelSpec,
    /// The caption run whose vision encoder (frozen) and decoder this run carries.
    pub init: PathBuf,
    /// The training folders, in order (one path in runs made before several were accepted).
    #[serde(deserialize_with = "crate::datasets::one_or_many_paths")]
    pub data: Vec<PathBuf>,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f32,
    pub grad_clip: f32,
    pub seed: u64,
    pub checkpoint_every: usize,
    pub log_every: usize,
    pub device: String,
    pub command: String,
    pub diffusion: DiffusionSettings,
}

impl GenerateTrainConfig {
    /// `(steps, batch_size, lr)` defaults per preset. The tiny denoiser takes a high rate:
    /// on ShapeWorld at 3e-3 (with the pooled-text conditioning) its diffusion loss is 0.024
    /// after 380 steps where 1e-3 was still at 0.15 after 300, and 1,000 steps draw the asked
    /// colour better than 3,000 did at 1e-3 without it (`docs/RESULTS.md`).
    pub fn for_preset(preset: Preset) -> (usize, usize, f64) {
        match preset {
            Preset::Tiny => (1500, 32, 3e-3),
            Preset::Small => (6000, 64, 5e-4),
        }
    }

    /// Denoiser and text-encoder dimensions come from the preset, the rest from the
    /// captioner the run starts from.
    pub fn model_for(preset: Preset, captioner: &ModelSpec) -> ModelSpec {
        let p = ModelSpec::preset(preset, captioner.vocab_size, captioner.image_size);
        ModelSpec {
            text_layers: p.text_layers,
            denoiser_layers: p.denoiser_layers,
            denoiser_patch_size: p.denoiser_patch_size,
            denoiser_pooled_text: p.denoiser_pooled_text,
            ..captioner.clone()
        }
    }
}

/// Denoiser architecture options of a new generate run (`ModelSpec::denoiser_long_skips`,
/// `ModelSpec::denoiser_conv_head`); the default is the preset's plain DiT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DenoiserOptions {
    pub long_skips: bool,
    pub conv_head: Option<usize>,
}

impl DenoiserOptions {
    fn apply(self, model: ModelSpec) -> ModelSpec {
        ModelSpec {
            denoiser_long_skips: self.long_skips,
            denoiser_conv_head: self.conv_head,
            ..model
        }
    }

    fn of(model: &ModelSpec) -> Self {
        Self {
            long_skips: model.denoiser_long_skips,
            conv_head: model.denoiser_conv_head,
        }
    }
}

/// Options of `duet-train fit --stage generate`.
#[derive(Debug, Clone)]
pub struct GenerateFitArgs {
    pub init: PathBuf,
    /// Training folders: ShapeWorld folders and Emoji-CLDR splits, in any mix.
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    /// Min-SNR-γ loss weighting ([`DiffusionSettings::min_snr_gamma`]); `None`: uniform.
    pub min_snr_gamma: Option<f64>,
    /// Denoiser options beside the preset's (a new run only).
    pub denoiser: DenoiserOptions,
    pub seed: u64,
    pub resume: bool,
    pub device: String,
    pub command: String,
    pub quiet: bool,
}

/// Summary of a finished generate run.
#[derive(Debug, Clone)]
pub struct GenerateOutcome {
    pub steps_done: usize,
    pub final_loss: f64,
    pub final_diffusion_loss: f64,
    pub seconds: f64,
}

/// Token ids and 1/0 mask rows `[n, L]` of the empty caption (`[BOS] [EOS] [PAD]…`).
fn empty_caption(seq_len: usize) -> (Vec<i64>, Vec<f32>) {
    let mut ids = vec![PAD_ID as i64; seq_len];
    let mut mask = vec![0.0; seq_len];
    ids[0] = BOS_ID as i64;
    ids[1] = EOS_ID as i64;
    mask[0] = 1.0;
    mask[1] = 1.0;
    (ids, mask)
}

/// Per-step rng: a pure function of (seed, step), so a resumed run draws the same timesteps,
/// noise and dropout as an uninterrupted one.
fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0xD1FF_u64.wrapping_mul(step as u64 + 1).rotate_left(17))
}

/// Image embeddings of the frozen vision encoder, computed the first time a sample is drawn:
/// the encoder never changes during this stage, so every later epoch reuses them.
pub struct ImageEmbeddings<B: Backend> {
    vision: VisionEncoder<B>,
    dim: usize,
    rows: Vec<Option<Vec<f32>>>,
}

impl<B: Backend> ImageEmbeddings<B> {
    pub fn new(vision: VisionEncoder<B>, cfg: &ModelSpec, n: usize) -> Self {
        Self {
            vision,
            dim: cfg.embed_dim,
            rows: vec![None; n],
        }
    }

    /// `[idx.len(), E]` embeddings of the samples `idx`.
    pub fn batch(
        &mut self,
        data: &PreparedData,
        idx: &[usize],
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let mut missing: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|&i| self.rows[i].is_none())
            .collect();
        missing.dedup();
        if !missing.is_empty() {
            let emb = self
                .vision
                .forward(data.pixels_batch::<B>(&missing, device))
                .embedding
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap_or_default();
            for (k, &i) in missing.iter().enumerate() {
                self.rows[i] = Some(emb[k * self.dim..(k + 1) * self.dim].to_vec());
            }
        }
        let flat: Vec<f32> = idx
            .iter()
            .flat_map(|&i| self.rows[i].as_deref().unwrap_or(&[]).iter().copied())
            .collect();
        Tensor::from_data(TensorData::new(flat, [idx.len(), self.dim]), device)
    }
}

/// Diffusion + contrastive loss of one batch. Returns `(total, diffusion)`.
#[allow(clippy::too_many_arguments)]
pub fn generate_loss<B: AutodiffBackend>(
    cfg: &ModelSpec,
    settings: &DiffusionSettings,
    schedule: &NoiseSchedule,
    generator: &Generator<B>,
    image_emb: Tensor<B::InnerBackend, 2>,
    data: &PreparedData,
    idx: &[usize],
    rng: &mut ChaCha8Rng,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let b = idx.len();
    let s = data.image_size;
    // Only as many text positions as the batch's longest caption: padding positions are
    // masked anyway, and the text encoder and cross-attention cost scales with L.
    let stride = data.seq_len;
    let l = idx
        .iter()
        .map(|&i| {
            let row = &data.tokens[i * stride..(i + 1) * stride];
            row.iter()
                .rposition(|&t| t != PAD_ID as i64)
                .map_or(0, |p| p + 1)
        })
        .max()
        .unwrap_or(0)
        .max(2);
    // Captions of the batch plus one empty caption (row b) for the dropped ones.
    let mut ids = Vec::with_capacity((b + 1) * l);
    let mut mask = Vec::with_capacity((b + 1) * l);
    for &i in idx {
        let row = &data.tokens[i * stride..i * stride + l];
        ids.extend_from_slice(row);
        mask.extend(
            row.iter()
                .map(|&t| if t == PAD_ID as i64 { 0.0f32 } else { 1.0 }),
        );
    }
    let (empty_ids, empty_mask) = empty_caption(l);
    ids.extend(empty_ids);
    mask.extend(empty_mask);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b + 1, l]), device);
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b + 1, l]), device);
    let text = generator.text.forward(ids, mask.clone());

    // Classifier-free guidance dropout: row i conditions on caption i or on the empty one.
    let rows: Vec<i64> = (0..b)
        .map(|i| {
            if rng.random::<f64>() < settings.cond_dropout {
                b as i64
            } else {
                i as i64
            }
        })
        .collect();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b]), device);
    let cond_tokens = text.tokens.clone().select(0, rows.clone());
    let cond_mask = mask.select(0, rows);

    // Forward process on the host rng: timesteps and noise.
    let t: Vec<usize> = (0..b)
        .map(|_| rng.random_range(0..schedule.train_steps()))
        .collect();
    let noise = gaussian(&[b, 3, s, s], rng);
    let coef = |f: &dyn Fn(f64) -> f64| {
        let v: Vec<f32> = t
            .iter()
            .map(|&t| f(schedule.alpha_bar(Some(t))) as f32)
            .collect();
        Tensor::<B, 4>::from_data(TensorData::new(v, [b, 1, 1, 1]), device)
    };
    let a = coef(&|ab| ab.sqrt());
    let sg = coef(&|ab| (1.0 - ab).sqrt());
    let x0 = data.pixels_batch::<B>(idx, device);
    let noise = Tensor::<B, 4>::from_data(
        TensorData::new(noise.into_raw_vec_and_offset().0, [b, 3, s, s]),
        device,
    );
    let xt = x0.clone() * a.clone() + noise.clone() * sg.clone();
    let target = match settings.prediction {
        Prediction::Epsilon => noise,
        Prediction::V => noise * a - x0 * sg,
    };
    let tt: Vec<f32> = t.iter().map(|&t| t as f32).collect();
    let tt = Tensor::<B, 1>::from_data(TensorData::new(tt, [b]), device);
    let pred = generator
        .denoiser
        .forward(cfg, xt, tt, cond_tokens, cond_mask);
    // Per-sample mean squared error, then the batch mean under the loss weights. The plain
    // (unweighted) mean is what is reported, so runs with and without weighting compare.
    let per_sample = (pred - target)
        .powi_scalar(2)
        .reshape([b, 3 * s * s])
        .mean_dim(1);
    let diffusion = per_sample.clone().mean();
    let objective = if settings.min_snr_gamma.is_some() {
        let w: Vec<f32> = t
            .iter()
            .map(|&t| settings.loss_weight(schedule.alpha_bar(Some(t))) as f32)
            .collect();
        let w = Tensor::<B, 2>::from_data(TensorData::new(w, [b, 1]), device);
        (per_sample * w).mean()
    } else {
        diffusion.clone()
    };

    // Contrastive (text → frozen image embedding and back), real captions only.
    let image_emb = Tensor::<B, 2>::from_inner(image_emb);
    let e = text.embedding.dims()[1];
    let text_emb = text.embedding.slice([0..b, 0..e]);
    let logits = text_emb
        .matmul(image_emb.transpose())
        .div_scalar(settings.temperature);
    let eye = Tensor::<B, 2>::from_data(
        TensorData::new(
            (0..b * b)
                .map(|k| if k / b == k % b { 1.0f32 } else { 0.0 })
                .collect::<Vec<_>>(),
            [b, b],
        ),
        device,
    );
    let t2i = (log_softmax(logits.clone(), 1) * eye.clone())
        .sum()
        .div_scalar(b as f64);
    let i2t = (log_softmax(logits, 0) * eye).sum().div_scalar(b as f64);
    let contrastive = (t2i + i2t).neg().div_scalar(2.0);
    let total = objective + contrastive.mul_scalar(settings.contrastive_weight);
    (total, diffusion)
}

/// Trains the generate stage; see the module docs.
pub fn fit_generate<B: AutodiffBackend>(
    args: &GenerateFitArgs,
    device: &B::Device,
) -> anyhow::Result<GenerateOutcome> {
    let run = &args.out;
    std::fs::create_dir_all(run)?;
    let config_path = run.join(CONFIG_FILE);
    let samples = load_folders(&args.data)?;

    let (cfg, mut state) = if args.resume && run.join(STATE_FILE).exists() {
        let mut cfg: GenerateTrainConfig = read_json(&config_path)?;
        if let Some(s) = args.steps {
            cfg.steps = s;
        }
        if args.denoiser != DenoiserOptions::default()
            && args.denoiser != DenoiserOptions::of(&cfg.model)
        {
            anyhow::bail!(
                "--long-skips / --conv-head differ from the run being resumed ({:?}); a resumed \
                 run keeps its denoiser",
                DenoiserOptions::of(&cfg.model)
            );
        }
        if args.min_snr_gamma.is_some() && args.min_snr_gamma != cfg.diffusion.min_snr_gamma {
            anyhow::bail!(
                "--min-snr-gamma {:?} differs from the run being resumed ({:?}); a resumed run \
                 keeps its loss",
                args.min_snr_gamma,
                cfg.diffusion.min_snr_gamma
            );
        }
        let state: TrainState = read_json(&run.join(STATE_FILE))?;
        tracing::info!(step = state.step, "resuming from {}", run.display());
        (cfg, Some(state))
    } else {
        let init: CaptionTrainConfig = read_json(&args.init.join(CONFIG_FILE)).map_err(|e| {
            anyhow::anyhow!("--init {} is not a caption run: {e}", args.init.display())
        })?;
        let (steps, batch, lr) = GenerateTrainConfig::for_preset(init.preset);
        let cfg = GenerateTrainConfig {
            stage: crate::stage::Stage::Generate,
            preset: init.preset,
            model: args
                .denoiser
                .apply(GenerateTrainConfig::model_for(init.preset, &init.model)),
            init: args.init.clone(),
            data: args.data.clone(),
            steps: args.steps.unwrap_or(steps),
            batch_size: args.batch_size.unwrap_or(batch),
            lr: args.lr.unwrap_or(lr),
            warmup_steps: 100,
            weight_decay: 0.01,
            grad_clip: 1.0,
            seed: args.seed,
            checkpoint_every: 200,
            log_every: 10,
            device: args.device.clone(),
            command: args.command.clone(),
            diffusion: DiffusionSettings {
                min_snr_gamma: args.min_snr_gamma,
                ..DiffusionSettings::default()
            },
        };
        let _ = std::fs::remove_file(run.join(METRICS_FILE));
        (cfg, None)
    };
    cfg.model.validate().map_err(anyhow::Error::msg)?;
    if let Some(g) = cfg.diffusion.min_snr_gamma {
        if !(g.is_finite() && g > 0.0) {
            anyhow::bail!("--min-snr-gamma must be a positive number, got {g}");
        }
    }
    if cfg.batch_size < 2 {
        anyhow::bail!("the contrastive loss needs --batch-size >= 2");
    }
    let image_size = samples[0].image.width() as usize;
    if cfg.model.image_size != image_size {
        anyhow::bail!(
            "{}: images are {image_size}px but the captioner in {} is {}px",
            folders_display(&args.data),
            cfg.init.display(),
            cfg.model.image_size
        );
    }
    // The captioner's tokenizer and weights, carried unchanged.
    let tokenizer = load_tokenizer(&cfg.init.join(TOKENIZER_FILE))?;
    save_tokenizer(&tokenizer, &run.join(TOKENIZER_FILE))?;
    let frozen = with_prefixes(
        &load_weights(&cfg.init.join(WEIGHTS_FILE))?,
        &["vision", "decoder"],
    );
    let vision = load_named_tensors(
        VisionEncoder::<B::InnerBackend>::new(&cfg.model, device),
        &with_prefixes(&frozen, &["vision"])
            .into_iter()
            .map(|(k, v)| (k["vision.".len()..].to_string(), v))
            .collect(),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.init.display()))?;
    write_json(&config_path, &cfg)?;

    B::seed(device, cfg.seed);
    let schedule = NoiseSchedule::cosine(cfg.diffusion.train_timesteps)?;
    let data = prepare(&samples, &tokenizer, image_size, cfg.model.max_len)?;
    let mut model = Generator::<B>::new(&cfg.model, device);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(
            cfg.grad_clip,
        )))
        .init::<B, Generator<B>>();
    let start_step = match &state {
        Some(s) => {
            (model, optim) = load_records(run, model, optim, device)?;
            s.step
        }
        None => 0,
    };
    // The average starts from the published weights of the checkpoint being resumed (its EMA)
    // or from the fresh model.
    let mut weight_avg = Ema::new(
        cfg.diffusion.ema_decay,
        match &state {
            Some(_) => with_prefixes(
                &load_weights(&run.join(WEIGHTS_FILE))?,
                &["text", "denoiser"],
            ),
            None => named_tensors(&model.valid()),
        },
    );
    let mut image_embeddings = ImageEmbeddings::new(vision, &cfg.model, data.n);

    let pb = crate::progress::stage_bar(args.quiet, cfg.steps, "generate");
    pb.set_position(start_step as u64);
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.join(METRICS_FILE))?;
    let t0 = Instant::now();
    let mut last_loss = state.as_ref().map(|s| s.last_loss).unwrap_or(f64::NAN);
    let mut last_diffusion = f64::NAN;
    let mut ema: Option<f64> = None;
    for step in start_step..cfg.steps {
        let idx = batch_indices(data.n, cfg.batch_size, step, cfg.seed);
        let mut rng = step_rng(cfg.seed, step);
        let image_emb = image_embeddings.batch(&data, &idx, device);
        let (loss, diffusion) = generate_loss(
            &cfg.model,
            &cfg.diffusion,
            &schedule,
            &model,
            image_emb,
            &data,
            &idx,
            &mut rng,
            device,
        );
        let loss_value = loss.clone().into_scalar().elem::<f64>();
        let diffusion_value = diffusion.into_scalar().elem::<f64>();
        if !loss_value.is_finite() {
            anyhow::bail!("loss became {loss_value} at step {step}; lower --lr");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = warmup_cosine_lr(cfg.lr, cfg.warmup_steps, cfg.steps, step);
        model = optim.step(lr, model, grads);
        weight_avg.update(&model.valid(), step);
        last_loss = loss_value;
        last_diffusion = diffusion_value;
        let e = ema.map_or(diffusion_value, |e| 0.95 * e + 0.05 * diffusion_value);
        ema = Some(e);
        pb.set_position(step as u64 + 1);
        pb.set_message(format!("diffusion {e:.3}"));
        if (step + 1) % cfg.log_every == 0 || step + 1 == cfg.steps {
            let line = serde_json::json!({
                "step": step + 1, "loss": loss_value, "diffusion_loss": diffusion_value,
                "diffusion_loss_ema": e, "lr": lr, "elapsed_s": t0.elapsed().as_secs_f64(),
            });
            writeln!(metrics, "{line}")?;
        }
        if (step + 1) % cfg.checkpoint_every == 0 || step + 1 == cfg.steps {
            let saved = TrainState {
                step: step + 1,
                seed: cfg.seed,
                last_loss,
            };
            save_checkpoint(
                run,
                &model,
                Some(weight_avg.weights()),
                &frozen,
                &optim,
                &saved,
            )?;
            state = Some(saved);
        }
    }
    pb.finish_and_clear();
    if state.is_none() {
        let saved = TrainState {
            step: start_step,
            seed: cfg.seed,
            last_loss,
        };
        save_checkpoint(
            run,
            &model,
            Some(weight_avg.weights()),
            &frozen,
            &optim,
            &saved,
        )?;
    }
    Ok(GenerateOutcome {
        steps_done: cfg.steps,
        final_loss: last_loss,
        final_diffusion_loss: last_diffusion,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A trained generate run loaded for inference.
pub struct LoadedGenerator<B: Backend> {
    pub config: GenerateTrainConfig,
    pub tokenizer: Tokenizer,
    pub generator: Generator<B>,
    pub schedule: NoiseSchedule,
}

/// Loads a generate run. With `untrained`, the generator keeps its seeded initial weights (the
/// baseline that evaluation compares against).
pub fn load_generator<B: Backend>(
    run: &Path,
    untrained: bool,
    device: &B::Device,
) -> anyhow::Result<LoadedGenerator<B>> {
    // The stage is checked before the rest is parsed, so a caption run is named as such
    // rather than reported as a config with missing fields.
    #[derive(serde::Deserialize)]
    struct StageOnly {
        stage: crate::stage::Stage,
    }
    let StageOnly { stage } = read_json(&run.join(CONFIG_FILE))?;
    // A unify run carries a (fine-tuned) generator in the same layout.
    if !matches!(
        stage,
        crate::stage::Stage::Generate | crate::stage::Stage::Unify
    ) {
        anyhow::bail!(
            "{} is a '{stage}' run, not a generate or unify run",
            run.display()
        );
    }
    let config: GenerateTrainConfig = read_json(&run.join(CONFIG_FILE))?;
    let tokenizer = load_tokenizer(&run.join(TOKENIZER_FILE))?;
    B::seed(device, config.seed);
    let generator = if untrained {
        Generator::<B>::new(&config.model, device)
    } else {
        load_generator_weights(run, &config.model, device)?
    };
    let schedule = NoiseSchedule::cosine(config.diffusion.train_timesteps)?;
    Ok(LoadedGenerator {
        config,
        tokenizer,
        generator,
        schedule,
    })
}

/// The generator (`text.*`, `denoiser.*`) of any run that carries one, built for `model`.
pub fn load_generator_weights<B: Backend>(
    run: &Path,
    model: &ModelSpec,
    device: &B::Device,
) -> anyhow::Result<Generator<B>> {
    let weights: NamedTensors = with_prefixes(
        &load_weights(&run.join(WEIGHTS_FILE))?,
        &["text", "denoiser"],
    );
    load_named_tensors(Generator::<B>::new(model, device), &weights)
        .map_err(|e| anyhow::anyhow!("{}: {e}", run.join(WEIGHTS_FILE).display()))
}

fn to_ndarray<B: Backend>(t: Tensor<B, 4>) -> anyhow::Result<ArrayD<f32>> {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading a tensor: {e:?}"))?;
    Ok(ArrayD::from_shape_vec(shape, data)?)
}

impl<B: Backend> LoadedGenerator<B> {
    /// Generates one image per prompt with classifier-free guidance, sampling in the shared
    /// `duet-diffusion` samplers (the runtime uses the same code behind ort/tract). Returns
    /// `[N, 3, S, S]` in `[-1, 1]`.
    pub fn generate(
        &self,
        prompts: &[String],
        sampler: &SamplerConfig,
        guidance: f32,
        seed: u64,
        device: &B::Device,
    ) -> anyhow::Result<ArrayD<f32>> {
        let l = self.config.model.max_len;
        let seqs = prompts
            .iter()
            .map(|p| encode_caption(&self.tokenizer, p, l))
            .collect::<Result<Vec<_>, _>>()?;
        let s = self.config.model.image_size;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = gaussian(&[prompts.len(), 3, s, s], &mut rng);
        self.generate_tokens(&seqs, x, sampler, guidance, &mut rng, device)
    }

    /// [`Self::generate`] from token sequences (`[BOS] … [EOS]`, cut at `max_len`) and a given
    /// start noise `x` `[N, 3, S, S]`: the unify stage rebuilds a group of sampled captions of
    /// one image from the same noise, so their rewards differ only by what the captions say.
    pub fn generate_tokens<R: Rng + ?Sized>(
        &self,
        seqs: &[Vec<u32>],
        x: ArrayD<f32>,
        sampler: &SamplerConfig,
        guidance: f32,
        rng: &mut R,
        device: &B::Device,
    ) -> anyhow::Result<ArrayD<f32>> {
        let cfg = &self.config.model;
        let n = seqs.len();
        let s = cfg.image_size;
        if x.shape() != [n, 3, s, s] {
            anyhow::bail!(
                "start noise is {:?}, expected [{n}, 3, {s}, {s}]",
                x.shape()
            );
        }
        // Padded to `max_len` like the exported graphs' callers, so Burn and the runtime see
        // the same inputs.
        let l = cfg.max_len;
        // Rows 0..n: the captions; rows n..2n: the empty caption (unconditional branch).
        let mut ids = Vec::with_capacity(2 * n * l);
        let mut mask = Vec::with_capacity(2 * n * l);
        for seq in seqs {
            for k in 0..l {
                ids.push(seq.get(k).map_or(PAD_ID as i64, |&t| t as i64));
                mask.push(if k < seq.len() { 1.0f32 } else { 0.0 });
            }
        }
        let (empty_ids, empty_mask) = empty_caption(l);
        for _ in 0..n {
            ids.extend_from_slice(&empty_ids);
            mask.extend_from_slice(&empty_mask);
        }
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2 * n, l]), device);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [2 * n, l]), device);
        let text = self.generator.text.forward(ids, mask.clone()).tokens;
        let denoise = |x: &ArrayD<f32>, t: usize| -> anyhow::Result<ArrayD<f32>> {
            let flat: Vec<f32> = x.iter().copied().collect();
            let xb = Tensor::<B, 4>::from_data(TensorData::new(flat, [n, 3, s, s]), device);
            let xb = Tensor::cat(vec![xb.clone(), xb], 0);
            let tb =
                Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32; 2 * n], [2 * n]), device);
            let out = self
                .generator
                .denoiser
                .forward(cfg, xb, tb, text.clone(), mask.clone());
            let cond = to_ndarray(out.clone().slice([0..n, 0..3, 0..s, 0..s]))?;
            let uncond = to_ndarray(out.slice([n..2 * n, 0..3, 0..s, 0..s]))?;
            Ok(guide(&uncond, &cond, guidance))
        };
        sample(
            &self.schedule,
            self.config.diffusion.prediction,
            sampler,
            x,
            rng,
            denoise,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_snr_weights_cap_the_clean_end_and_keep_the_noisy_end() {
        let uniform = DiffusionSettings::default();
        assert_eq!(uniform.loss_weight(0.999), 1.0);
        let v = DiffusionSettings {
            min_snr_gamma: Some(5.0),
            ..DiffusionSettings::default()
        };
        // SNR = 1 (ᾱ = 0.5) is under γ: weight SNR / (SNR + 1) = 0.5.
        assert!((v.loss_weight(0.5) - 0.5).abs() < 1e-12);
        // SNR = 99 (ᾱ = 0.99) is capped at γ = 5: 5 / 100.
        assert!((v.loss_weight(0.99) - 0.05).abs() < 1e-9);
        // The ends of the schedule stay finite.
        assert!(v.loss_weight(1.0).is_finite() && v.loss_weight(0.0) >= 0.0);
        let eps = DiffusionSettings {
            prediction: Prediction::Epsilon,
            ..v
        };
        // ε: min(SNR, γ) / SNR, 1 below γ and γ / SNR above it.
        assert!((eps.loss_weight(0.5) - 1.0).abs() < 1e-12);
        assert!((eps.loss_weight(0.99) - 5.0 / 99.0).abs() < 1e-9);
    }
}

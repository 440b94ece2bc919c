//! Missing-modality restoration, trained in two stages on top of a generate run's frozen
//! vision and text encoders:
//!
//! - `fit --stage fusion`: a [`FusionHead`] on complete image + text pairs of a [`PairTask`];
//! - `fit --stage restore`: with the backbones *and* the head frozen, the prompt-style
//!   baseline ([`MissingTokens`]) and the feature-space diffusion [`Restorers`] — the full
//!   model (dynamic modality gating + cross-modal mutual learning) and the two ablations
//!   (without gating, without mutual learning), so `eval --stage restore` can compare them.
//!
//! Both stages work on pooled embeddings computed once up front (the encoders never change),
//! so they train in minutes on a CPU. A run directory carries the whole model: the generate
//! run's tensors plus `head.*` (and, after `restore`, `restorer.*`, `ablation_no_gate.*`,
//! `ablation_no_mutual.*`, `missing_token.*`), so it exports to one bundle.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use duet_diffusion::NoiseSchedule;
use duet_models::params::{load_named_tensors, named_tensors, NamedTensors};
use duet_models::tokens::PAD_ID;
use duet_models::{
    FeatureRestorer, FusionHead, MissingTokens, ModelSpec, Preset, RestoreConfig, Restorers,
    TextEncoder, VisionEncoder,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::caption_stage::{
    batch_indices, image_to_chw, with_prefixes, CONFIG_FILE, METRICS_FILE, TOKENIZER_FILE,
};
use crate::checkpoint::{
    load_weights, read_json, save_weights, write_json, TrainState, STATE_FILE, WEIGHTS_FILE,
};
use crate::pair_tasks::{PairExample, PairTask};
use crate::stage::Stage;
use crate::tokenizer::{encode_caption, load_tokenizer, save_tokenizer};

/// Tensor-name prefixes of the restore run's modules.
pub const HEAD: &str = "head";
pub const MISSING_TOKEN: &str = "missing_token";

/// A restorer variant: the full model and its two ablations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// Tensor-name prefix in the run.
    pub prefix: &'static str,
    /// Method name in tables and plots.
    pub method: &'static str,
    pub gating: bool,
    pub mutual: bool,
}

impl Variant {
    /// Whether the head's input blends the restoration with μ through the trust gate. The gate
    /// learns only from the agreement loss, so without mutual learning it has no training
    /// signal and stays out (τ = 1) instead of blending at its random initial value.
    pub fn trusts(self) -> bool {
        self.gating && self.mutual
    }
}

pub const VARIANTS: [Variant; 3] = [
    Variant {
        prefix: "restorer",
        method: "restorer",
        gating: true,
        mutual: true,
    },
    Variant {
        prefix: "ablation_no_gate",
        method: "restorer w/o gating",
        gating: false,
        mutual: true,
    },
    Variant {
        prefix: "ablation_no_mutual",
        method: "restorer w/o mutual",
        gating: true,
        mutual: false,
    },
];

/// Diffusion and loss settings of the restore stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreSettings {
    /// Steps of the cosine noise schedule the restorers are trained on.
    pub train_timesteps: usize,
    /// DDIM (eta 0) steps that restore a feature, in training (unrolled) and at inference.
    pub sampler_steps: usize,
    /// Steps of the missing-token baseline.
    pub token_steps: usize,
    /// Weight of the head-agreement loss (KL from the complete-pair prediction).
    pub agreement_weight: f64,
    /// Weight of the cycle-consistency loss.
    pub cycle_weight: f64,
}

impl Default for RestoreSettings {
    fn default() -> Self {
        Self {
            train_timesteps: 1000,
            sampler_steps: 4,
            token_steps: 600,
            agreement_weight: 1.0,
            cycle_weight: 0.5,
        }
    }
}

/// Everything that defines a fusion or restore run; written to `RUN/config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairTrainConfig {
    pub stage: Stage,
    pub preset: Preset,
    pub model: ModelSpec,
    pub restore: RestoreConfig,
    pub task: PairTask,
    /// The generate run (fusion) or fusion run (restore) this run starts from.
    pub init: PathBuf,
    /// Training examples, drawn from `data_seed`; the held-out test set is drawn from
    /// `data_seed + 1` (fresh draws: the scene space is small, so many test images and texts
    /// also occur in training — the hidden view is what is new).
    pub train_examples: usize,
    pub test_examples: usize,
    pub data_seed: u64,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// The diffusion settings of the generate run the backbones came from (its denoiser rides
    /// along in the run, so an export of this run ships the whole generator). `None` in runs
    /// written before this field existed: such runs cannot be exported.
    #[serde(default)]
    pub generator_diffusion: Option<crate::generate_stage::DiffusionSettings>,
    pub device: String,
    pub command: String,
    /// Restore stage only.
    #[serde(default)]
    pub settings: Option<RestoreSettings>,
}

/// Options of `fit --stage fusion|restore`.
#[derive(Debug, Clone)]
pub struct PairFitArgs {
    /// Generate run (fusion) or fusion run (restore).
    pub init: PathBuf,
    pub out: PathBuf,
    /// Fusion only (restore takes the fusion run's).
    pub task: Option<PairTask>,
    pub train_examples: Option<usize>,
    pub test_examples: Option<usize>,
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    pub seed: u64,
    /// Restore only; `None` = defaults.
    pub settings: Option<RestoreSettings>,
    pub device: String,
    pub command: String,
    pub quiet: bool,
}

/// The frozen encoders of a run and what they need.
pub struct Backbones<B: Backend> {
    pub preset: Preset,
    pub model: ModelSpec,
    pub tokenizer: Tokenizer,
    pub vision: VisionEncoder<B>,
    pub text: TextEncoder<B>,
}

#[derive(Deserialize)]
struct RunHeader {
    stage: Stage,
    preset: Preset,
    model: ModelSpec,
}

/// Strips `prefix.` from the names of the tensors under `prefix`.
pub fn under(weights: &NamedTensors, prefix: &str) -> NamedTensors {
    with_prefixes(weights, &[prefix])
        .into_iter()
        .map(|(k, v)| (k[prefix.len() + 1..].to_string(), v))
        .collect()
}

/// Puts `prefix.` in front of every name.
pub fn prefixed(weights: NamedTensors, prefix: &str) -> NamedTensors {
    weights
        .into_iter()
        .map(|(k, v)| (format!("{prefix}.{k}"), v))
        .collect()
}

fn load_module<B: Backend, M: Module<B>>(
    module: M,
    weights: &NamedTensors,
    prefix: &str,
    run: &Path,
) -> anyhow::Result<M> {
    load_named_tensors(module, &under(weights, prefix))
        .map_err(|e| anyhow::anyhow!("{} ({prefix}.*): {e}", run.join(WEIGHTS_FILE).display()))
}

/// Loads the vision and text encoders of a generate, unify, fusion or restore run.
pub fn load_backbones<B: Backend>(run: &Path, device: &B::Device) -> anyhow::Result<Backbones<B>> {
    let header: RunHeader = read_json(&run.join(CONFIG_FILE))?;
    if !header.stage.has_generator() {
        anyhow::bail!(
            "{} is a '{}' run; restoration needs both encoders (a generate run or later)",
            run.display(),
            header.stage
        );
    }
    let weights = load_weights(&run.join(WEIGHTS_FILE))?;
    let vision = load_module(
        VisionEncoder::new(&header.model, device),
        &weights,
        "vision",
        run,
    )?;
    let text = load_module(
        TextEncoder::new(&header.model, device),
        &weights,
        "text",
        run,
    )?;
    Ok(Backbones {
        preset: header.preset,
        model: header.model,
        tokenizer: load_tokenizer(&run.join(TOKENIZER_FILE))?,
        vision,
        text,
    })
}

impl<B: Backend> Backbones<B> {
    /// Pooled image embeddings `[N, E]` of RGB images of the model's size.
    pub fn embed_images(
        &self,
        images: &[&image::RgbImage],
        device: &B::Device,
    ) -> anyhow::Result<Tensor<B, 2>> {
        let s = self.model.image_size;
        let mut pixels = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            if img.dimensions() != (s as u32, s as u32) {
                anyhow::bail!(
                    "image is {}x{}, the model expects {s}x{s}",
                    img.width(),
                    img.height()
                );
            }
            pixels.extend(image_to_chw(img));
        }
        let x = Tensor::from_data(TensorData::new(pixels, [images.len(), 3, s, s]), device);
        Ok(self.vision.forward(x).embedding)
    }

    /// Pooled text embeddings `[N, E]`, each text padded to `max_len` as the runtime does.
    pub fn embed_texts(&self, texts: &[&str], device: &B::Device) -> anyhow::Result<Tensor<B, 2>> {
        let l = self.model.max_len;
        let mut ids = Vec::with_capacity(texts.len() * l);
        let mut mask = Vec::with_capacity(texts.len() * l);
        for text in texts {
            let seq = encode_caption(&self.tokenizer, text, l)?;
            for k in 0..l {
                ids.push(seq.get(k).map_or(PAD_ID as i64, |&t| t as i64));
                mask.push(if k < seq.len() { 1.0f32 } else { 0.0 });
            }
        }
        let n = texts.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, l]), device);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [n, l]), device);
        Ok(self.text.forward(ids, mask).embedding)
    }
}

/// Embeddings and labels of a set of examples, as plain rows.
#[derive(Debug, Clone)]
pub struct PairFeatures {
    pub n: usize,
    pub dim: usize,
    /// `[n, dim]` row-major.
    pub image: Vec<f32>,
    pub text: Vec<f32>,
    pub labels: Vec<usize>,
}

/// A tensor's values as plain `f32`s.
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> anyhow::Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading a tensor: {e:?}"))
}

/// Embeds every example with the frozen encoders, in batches.
pub fn extract_features<B: Backend>(
    bb: &Backbones<B>,
    examples: &[PairExample],
    device: &B::Device,
) -> anyhow::Result<PairFeatures> {
    let dim = bb.model.embed_dim;
    let mut image = Vec::with_capacity(examples.len() * dim);
    let mut text = Vec::with_capacity(examples.len() * dim);
    for chunk in examples.chunks(256) {
        let imgs: Vec<&image::RgbImage> = chunk.iter().map(|e| &e.image).collect();
        image.extend(to_vec(bb.embed_images(&imgs, device)?)?);
        let txts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
        text.extend(to_vec(bb.embed_texts(&txts, device)?)?);
    }
    Ok(PairFeatures {
        n: examples.len(),
        dim,
        image,
        text,
        labels: examples.iter().map(|e| e.label).collect(),
    })
}

fn rows<B: Backend>(data: &[f32], dim: usize, idx: &[usize], device: &B::Device) -> Tensor<B, 2> {
    let mut out = Vec::with_capacity(idx.len() * dim);
    for &i in idx {
        out.extend_from_slice(&data[i * dim..(i + 1) * dim]);
    }
    Tensor::from_data(TensorData::new(out, [idx.len(), dim]), device)
}

impl PairFeatures {
    pub fn image_rows<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 2> {
        rows(&self.image, self.dim, idx, device)
    }
    pub fn text_rows<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 2> {
        rows(&self.text, self.dim, idx, device)
    }
    pub fn label_rows<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
        let l: Vec<i64> = idx.iter().map(|&i| self.labels[i] as i64).collect();
        Tensor::from_data(TensorData::new(l, [idx.len()]), device)
    }
    /// Column means (the mean-fill vector) and standard deviations of `data` `[n, dim]`; the
    /// deviations are floored at 1e-4 so a constant dimension cannot divide by zero.
    pub fn mean_std(data: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
        let n = (data.len() / dim).max(1) as f64;
        let mut m = vec![0.0f64; dim];
        let mut sq = vec![0.0f64; dim];
        for row in data.chunks_exact(dim) {
            for ((a, q), &v) in m.iter_mut().zip(sq.iter_mut()).zip(row) {
                *a += f64::from(v);
                *q += f64::from(v) * f64::from(v);
            }
        }
        let mean: Vec<f64> = m.iter().map(|v| v / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, mu)| ((q / n - mu * mu).max(0.0).sqrt().max(1e-4)) as f32)
            .collect();
        (mean.into_iter().map(|v| v as f32).collect(), std)
    }
}

/// Mean cross-entropy of `logits` `[B, C]` against integer labels.
fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let [b, _] = logits.dims();
    log_softmax(logits, 1)
        .gather(1, labels.reshape([b, 1]))
        .mean()
        .neg()
}

/// `KL(p ‖ softmax(logits))` per batch, `p` given as probabilities (no gradient).
fn kl_from<B: Backend>(p: Tensor<B, 2>, logits: Tensor<B, 2>) -> Tensor<B, 1> {
    let [b, _] = p.dims();
    let logp = p.clone().clamp_min(1e-8).log();
    (p * (logp - log_softmax(logits, 1)))
        .sum()
        .div_scalar(b as f64)
        .reshape([1])
}

/// Fraction of rows of `logits` whose argmax is the label.
pub fn accuracy<B: Backend>(logits: Tensor<B, 2>, labels: &[usize]) -> anyhow::Result<f64> {
    let pred = to_vec(logits.argmax(1).float())?;
    let right = pred
        .iter()
        .zip(labels)
        .filter(|(p, &l)| **p as usize == l)
        .count();
    Ok(right as f64 / labels.len().max(1) as f64)
}

/// Accuracy of `head` on the complete pairs of `features`.
fn complete_accuracy<B: Backend>(
    head: &FusionHead<B>,
    features: &PairFeatures,
    device: &B::Device,
) -> anyhow::Result<f64> {
    let all: Vec<usize> = (0..features.n).collect();
    accuracy(
        head.forward(
            features.image_rows(&all, device),
            features.text_rows(&all, device),
        ),
        &features.labels,
    )
}

/// The outcome of a fusion or restore run.
#[derive(Debug, Clone, Serialize)]
pub struct PairOutcome {
    /// Held-out accuracy of the head on complete pairs.
    pub complete_accuracy: f64,
    pub final_loss: f64,
    pub seconds: f64,
}

fn resolve_config(
    args: &PairFitArgs,
    stage: Stage,
    preset: Preset,
    model: ModelSpec,
    task: PairTask,
    from: Option<&PairTrainConfig>,
    generator_diffusion: Option<crate::generate_stage::DiffusionSettings>,
) -> PairTrainConfig {
    // The same defaults for both stages today; a stage of its own gets its own row here.
    let (steps, batch, lr) = (1500, 128, 1e-3);
    let (train_n, test_n) = match preset {
        Preset::Tiny => (3000, 1000),
        Preset::Small => (8000, 2000),
    };
    PairTrainConfig {
        stage,
        preset,
        restore: from.map_or_else(
            || RestoreConfig::new(model.embed_dim, task.classes()),
            |f| f.restore.clone(),
        ),
        model,
        task,
        init: args.init.clone(),
        train_examples: from.map_or(args.train_examples.unwrap_or(train_n), |f| f.train_examples),
        test_examples: from.map_or(args.test_examples.unwrap_or(test_n), |f| f.test_examples),
        data_seed: from.map_or(args.seed.wrapping_add(100), |f| f.data_seed),
        steps: args.steps.unwrap_or(steps),
        batch_size: args.batch_size.unwrap_or(batch),
        lr: args.lr.unwrap_or(lr),
        seed: args.seed,
        device: args.device.clone(),
        command: args.command.clone(),
        settings: (stage == Stage::Restore).then(|| args.settings.clone().unwrap_or_default()),
        generator_diffusion,
    }
}

/// Rejects options the stages cannot honour, before anything is loaded or written (the
/// defaults are always valid).
fn validate_args(args: &PairFitArgs) -> anyhow::Result<()> {
    if args.steps == Some(0) || args.batch_size == Some(0) {
        anyhow::bail!("--steps and --batch-size must be at least 1");
    }
    if args.train_examples == Some(0) || args.test_examples == Some(0) {
        anyhow::bail!("the task needs at least one training and one held-out example");
    }
    if let Some(lr) = args.lr {
        if lr.is_nan() || lr <= 0.0 {
            anyhow::bail!("--lr must be positive, got {lr}");
        }
    }
    if let Some(s) = &args.settings {
        if s.sampler_steps == 0 || s.sampler_steps > s.train_timesteps {
            anyhow::bail!(
                "sampler steps must be in 1..={}, got {}",
                s.train_timesteps,
                s.sampler_steps
            );
        }
    }
    Ok(())
}

/// Creates `out` and refuses to overwrite a finished run.
fn prepare_out(out: &Path) -> anyhow::Result<()> {
    if out.join(STATE_FILE).exists() {
        anyhow::bail!(
            "{} already holds a finished run; choose another --out",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

fn append_metric(out: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join(METRICS_FILE))?;
    writeln!(f, "{value}")?;
    crate::curves::write_run_curves(out)?;
    Ok(())
}

/// `fit --stage fusion`: trains the fusion head on complete pairs.
pub fn fit_fusion<B: AutodiffBackend>(
    args: &PairFitArgs,
    device: &B::Device,
) -> anyhow::Result<PairOutcome> {
    let t0 = Instant::now();
    validate_args(args)?;
    let task = args
        .task
        .context("--stage fusion needs --task colour-column|shape-count")?;
    let bb = load_backbones::<B::InnerBackend>(&args.init, device)?;
    let generator: crate::generate_stage::GenerateTrainConfig =
        read_json(&args.init.join(CONFIG_FILE)).with_context(|| {
            format!(
                "--stage fusion starts from a generate or unify run; {} is not one",
                args.init.display()
            )
        })?;
    let cfg = resolve_config(
        args,
        Stage::Fusion,
        bb.preset,
        bb.model.clone(),
        task,
        None,
        Some(generator.diffusion),
    );
    prepare_out(&args.out)?;
    write_json(&args.out.join(CONFIG_FILE), &cfg)?;
    save_tokenizer(&bb.tokenizer, &args.out.join(TOKENIZER_FILE))?;
    let size = cfg.model.image_size as u32;
    let train = extract_features(
        &bb,
        &task.examples(cfg.train_examples, cfg.data_seed, size),
        device,
    )?;
    let test = extract_features(
        &bb,
        &task.examples(cfg.test_examples, cfg.data_seed.wrapping_add(1), size),
        device,
    )?;

    B::seed(device, cfg.seed);
    let mut head = FusionHead::<B>::new(&cfg.restore, device);
    let mut optim = AdamWConfig::new().with_weight_decay(1e-4).init();
    let pb = crate::progress::stage_bar(args.quiet, cfg.steps, "fusion head");
    let mut last = f64::NAN;
    for step in 0..cfg.steps {
        let idx = batch_indices(train.n, cfg.batch_size, step, cfg.seed);
        let logits = head.forward(
            train.image_rows(&idx, device),
            train.text_rows(&idx, device),
        );
        let loss = cross_entropy(logits, train.label_rows(&idx, device));
        last = loss.clone().into_scalar().elem::<f64>();
        let grads = GradientsParams::from_grads(loss.backward(), &head);
        let lr = crate::caption_stage::warmup_cosine_lr(cfg.lr, 50, cfg.steps, step);
        head = optim.step(lr, head, grads);
        if step % 50 == 0 || step + 1 == cfg.steps {
            pb.set_message(format!("loss {last:.4}"));
            append_metric(
                &args.out,
                &serde_json::json!({"stage": Stage::Fusion, "step": step, "loss": last}),
            )?;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let head = head.valid();
    let complete_accuracy = complete_accuracy(&head, &test, device)?;
    let mut weights = load_weights(&args.init.join(WEIGHTS_FILE))?;
    weights.retain(|k, _| !k.starts_with("head."));
    weights.extend(prefixed(named_tensors(&head), HEAD));
    save_weights(&args.out.join(WEIGHTS_FILE), &weights)?;
    write_json(
        &args.out.join("fusion.json"),
        &serde_json::json!({"complete_accuracy": complete_accuracy, "task": task}),
    )?;
    write_json(
        &args.out.join(STATE_FILE),
        &TrainState {
            step: cfg.steps,
            seed: cfg.seed,
            last_loss: last,
        },
    )?;
    tracing::info!(complete_accuracy, "fusion head trained");
    Ok(PairOutcome {
        complete_accuracy,
        final_loss: last,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `[B, 1]` column of `f(ᾱ_t)` for per-example timesteps.
fn per_example<B: Backend>(
    schedule: &NoiseSchedule,
    ts: &[usize],
    f: impl Fn(f64) -> f64,
    device: &B::Device,
) -> Tensor<B, 2> {
    let v: Vec<f32> = ts
        .iter()
        .map(|&t| f(schedule.alpha_bar(Some(t))) as f32)
        .collect();
    Tensor::from_data(TensorData::new(v, [ts.len(), 1]), device)
}

fn gaussian<B: Backend, R: Rng>(
    rng: &mut R,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2> {
    let v: Vec<f32> = (0..shape[0] * shape[1])
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Restores features with DDIM (eta 0, `v`-prediction) from the start noise `x` (in the
/// standardised space) and returns them as embeddings (`μ + σ z`): the same update rule as
/// `duet_diffusion::sample` (checked in a test), written on Burn tensors so the training losses
/// can differentiate through the whole sampler.
pub fn ddim_restore<B: Backend>(
    restorer: &FeatureRestorer<B>,
    schedule: &NoiseSchedule,
    steps: usize,
    cond: Tensor<B, 2>,
    x: Tensor<B, 2>,
    gating: bool,
) -> anyhow::Result<Tensor<B, 2>> {
    let ts = schedule.timesteps(steps)?;
    let [b, _] = x.dims();
    let device = x.device();
    let mut x = x;
    for (i, &t) in ts.iter().enumerate() {
        let ab = schedule.alpha_bar(Some(t));
        let ab_next = schedule.alpha_bar(ts.get(i + 1).copied());
        let tt = Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32; b], [b]), &device);
        let v = restorer.forward(x.clone(), tt, cond.clone(), gating);
        let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
        let x0 = x.clone().mul_scalar(a) - v.clone().mul_scalar(s);
        let eps = x.mul_scalar(s) + v.mul_scalar(a);
        x = x0.mul_scalar(ab_next.sqrt()) + eps.mul_scalar((1.0 - ab_next).sqrt());
    }
    Ok(restorer.unstandardise(x))
}

/// `1 − cos(a, b)` averaged over rows.
fn cosine_distance<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 1> {
    let dot = (a.clone() * b.clone()).sum_dim(1);
    let na = a.powi_scalar(2).sum_dim(1).add_scalar(1e-12).sqrt();
    let nb = b.powi_scalar(2).sum_dim(1).add_scalar(1e-12).sqrt();
    (dot / (na * nb)).neg().add_scalar(1.0).mean()
}

/// Losses of one restorer step.
struct RestoreLosses<B: Backend> {
    total: Tensor<B, 1>,
    diffusion: f64,
    agreement: f64,
    cycle: f64,
}

#[allow(clippy::too_many_arguments)]
fn restore_loss<B: AutodiffBackend>(
    model: &Restorers<B>,
    head: &FusionHead<B>,
    variant: Variant,
    settings: &RestoreSettings,
    schedule: &NoiseSchedule,
    image: Tensor<B, 2>,
    text: Tensor<B, 2>,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<RestoreLosses<B>> {
    let [b, e] = image.dims();
    let device = image.device();
    let t_max = schedule.train_steps();
    // Denoising: each direction predicts `v` of its own modality at a random timestep.
    let mut diffusion = Tensor::<B, 1>::zeros([1], &device);
    for (restorer, x0, cond) in [
        (
            &model.t2i,
            model.t2i.standardise(image.clone()),
            text.clone(),
        ),
        (
            &model.i2t,
            model.i2t.standardise(text.clone()),
            image.clone(),
        ),
    ] {
        let ts: Vec<usize> = (0..b).map(|_| rng.random_range(0..t_max)).collect();
        let a = per_example::<B>(schedule, &ts, f64::sqrt, &device);
        let s = per_example::<B>(schedule, &ts, |ab| (1.0 - ab).sqrt(), &device);
        let noise = gaussian::<B, _>(rng, [b, e], &device);
        let x_t = x0.clone() * a.clone() + noise.clone() * s.clone();
        let target = noise * a - x0 * s;
        let tt = Tensor::<B, 1>::from_data(
            TensorData::new(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), [b]),
            &device,
        );
        let v = restorer.forward(x_t, tt, cond, variant.gating);
        diffusion = diffusion + (v - target).powi_scalar(2).mean();
    }
    let diffusion_value = diffusion.clone().into_scalar().elem::<f64>();
    if !variant.mutual {
        return Ok(RestoreLosses {
            total: diffusion,
            diffusion: diffusion_value,
            agreement: 0.0,
            cycle: 0.0,
        });
    }
    // Cross-modal mutual learning, through the whole (unrolled) sampler.
    let k = settings.sampler_steps;
    let r_image = ddim_restore(
        &model.t2i,
        schedule,
        k,
        text.clone(),
        gaussian::<B, _>(rng, [b, e], &device),
        variant.gating,
    )?;
    let r_text = ddim_restore(
        &model.i2t,
        schedule,
        k,
        image.clone(),
        gaussian::<B, _>(rng, [b, e], &device),
        variant.gating,
    )?;
    // Agreement: the head's prediction with a restored (gated) feature should match its
    // prediction on the real pair.
    let target = softmax(head.forward(image.clone(), text.clone()), 1).detach();
    let f_image = model
        .t2i
        .blend(r_image.clone(), text.clone(), variant.trusts());
    let f_text = model
        .i2t
        .blend(r_text.clone(), image.clone(), variant.trusts());
    let agreement = kl_from(target.clone(), head.forward(f_image, text.clone()))
        + kl_from(target, head.forward(image.clone(), f_text));
    // Cycle consistency: restoring back from a restored feature should land on the real
    // feature of the start modality (raw cosine distance). The cycle's second leg is the
    // sampler's first x0 estimate from pure noise (one step, not the unrolled sampler, to keep
    // a step cheap).
    let t_last = t_max - 1;
    let ab = schedule.alpha_bar(Some(t_last));
    let one_step = |r: &FeatureRestorer<B>, cond: Tensor<B, 2>, rng: &mut ChaCha8Rng| {
        let x = gaussian::<B, _>(rng, [b, e], &device);
        let tt = Tensor::<B, 1>::from_data(TensorData::new(vec![t_last as f32; b], [b]), &device);
        let v = r.forward(x.clone(), tt, cond, variant.gating);
        r.unstandardise(x.mul_scalar(ab.sqrt()) - v.mul_scalar((1.0 - ab).sqrt()))
    };
    let back_text = one_step(&model.i2t, r_image, rng);
    let back_image = one_step(&model.t2i, r_text, rng);
    let cycle = cosine_distance(back_text, text) + cosine_distance(back_image, image);
    let agreement_value = agreement.clone().into_scalar().elem::<f64>();
    let cycle_value = cycle.clone().into_scalar().elem::<f64>();
    Ok(RestoreLosses {
        total: diffusion
            + agreement.mul_scalar(settings.agreement_weight)
            + cycle.mul_scalar(settings.cycle_weight),
        diffusion: diffusion_value,
        agreement: agreement_value,
        cycle: cycle_value,
    })
}

/// The restore stage's trained modules (inference backend).
pub struct RestoreModels<B: Backend> {
    pub head: FusionHead<B>,
    pub tokens: MissingTokens<B>,
    /// In the order of [`VARIANTS`].
    pub restorers: Vec<Restorers<B>>,
}

/// `fit --stage restore`: the missing-token baseline and the three restorer variants, with the
/// backbones and the fusion head frozen.
pub fn fit_restore<B: AutodiffBackend>(
    args: &PairFitArgs,
    device: &B::Device,
) -> anyhow::Result<PairOutcome> {
    let t0 = Instant::now();
    validate_args(args)?;
    let fusion: PairTrainConfig = read_json(&args.init.join(CONFIG_FILE))?;
    if fusion.stage != Stage::Fusion {
        anyhow::bail!(
            "{} is a '{}' run; --stage restore starts from a fusion run",
            args.init.display(),
            fusion.stage
        );
    }
    if args.task.is_some_and(|t| t != fusion.task) {
        anyhow::bail!(
            "--task differs from the fusion run's task '{}'",
            fusion.task
        );
    }
    let bb = load_backbones::<B::InnerBackend>(&args.init, device)?;
    let cfg = resolve_config(
        args,
        Stage::Restore,
        fusion.preset,
        fusion.model.clone(),
        fusion.task,
        Some(&fusion),
        fusion.generator_diffusion.clone(),
    );
    let settings = cfg.settings.clone().unwrap_or_default();
    prepare_out(&args.out)?;
    write_json(&args.out.join(CONFIG_FILE), &cfg)?;
    save_tokenizer(&bb.tokenizer, &args.out.join(TOKENIZER_FILE))?;
    let init_weights = load_weights(&args.init.join(WEIGHTS_FILE))?;
    // The frozen head, without gradients: only the restorers' optimisers step.
    let head = load_module(
        FusionHead::<B>::new(&cfg.restore, device),
        &init_weights,
        HEAD,
        &args.init,
    )?
    .no_grad();
    let train = extract_features(
        &bb,
        &cfg.task.examples(
            cfg.train_examples,
            cfg.data_seed,
            cfg.model.image_size as u32,
        ),
        device,
    )?;
    let schedule = NoiseSchedule::cosine(settings.train_timesteps)?;
    let e = train.dim;
    let stats = |data: &[f32]| {
        let (m, s) = PairFeatures::mean_std(data, e);
        (
            Tensor::<B, 1>::from_data(TensorData::new(m, [e]), device),
            Tensor::<B, 1>::from_data(TensorData::new(s, [e]), device),
        )
    };
    let (image_stats, text_stats) = (stats(&train.image), stats(&train.text));

    // The prompt-style baseline: a learned vector per modality, trained on the task loss with
    // the other modality present.
    B::seed(device, cfg.seed);
    let mut tokens = MissingTokens::<B>::new(e, device);
    let mut token_optim = AdamWConfig::new().init();
    let pb = crate::progress::stage_bar(args.quiet, settings.token_steps, "missing token");
    for step in 0..settings.token_steps {
        let idx = batch_indices(train.n, cfg.batch_size, step, cfg.seed);
        let b = idx.len();
        let labels = train.label_rows(&idx, device);
        let ti = tokens.image.val().reshape([1, e]).expand([b, e]);
        let tt = tokens.text.val().reshape([1, e]).expand([b, e]);
        let loss = cross_entropy(
            head.forward(ti, train.text_rows(&idx, device)),
            labels.clone(),
        ) + cross_entropy(head.forward(train.image_rows(&idx, device), tt), labels);
        let grads = GradientsParams::from_grads(loss.backward(), &tokens);
        tokens = token_optim.step(cfg.lr, tokens, grads);
        pb.inc(1);
    }
    pb.finish_and_clear();

    let mut restorers = Vec::new();
    let mut last = f64::NAN;
    for variant in VARIANTS {
        B::seed(device, cfg.seed);
        let mut model = Restorers::<B> {
            t2i: FeatureRestorer::new(&cfg.restore, device)
                .with_statistics(image_stats.clone(), text_stats.clone()),
            i2t: FeatureRestorer::new(&cfg.restore, device)
                .with_statistics(text_stats.clone(), image_stats.clone()),
        };
        let mut optim = AdamWConfig::new()
            .with_weight_decay(1e-4)
            .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
            .init();
        let pb = crate::progress::stage_bar(args.quiet, cfg.steps, variant.method);
        for step in 0..cfg.steps {
            let idx = batch_indices(train.n, cfg.batch_size, step, cfg.seed);
            let mut rng = ChaCha8Rng::seed_from_u64(
                cfg.seed ^ 0x5EED_u64.wrapping_mul(step as u64 + 1).rotate_left(23),
            );
            let losses = restore_loss(
                &model,
                &head,
                variant,
                &settings,
                &schedule,
                train.image_rows(&idx, device),
                train.text_rows(&idx, device),
                &mut rng,
            )?;
            last = losses.total.clone().into_scalar().elem::<f64>();
            if !last.is_finite() {
                anyhow::bail!("{}: loss became {last} at step {step}", variant.method);
            }
            let grads = GradientsParams::from_grads(losses.total.backward(), &model);
            let lr = crate::caption_stage::warmup_cosine_lr(cfg.lr, 50, cfg.steps, step);
            model = optim.step(lr, model, grads);
            if step % 50 == 0 || step + 1 == cfg.steps {
                pb.set_message(format!(
                    "diffusion {:.4} agree {:.4} cycle {:.4}",
                    losses.diffusion, losses.agreement, losses.cycle
                ));
                append_metric(
                    &args.out,
                    &serde_json::json!({
                        "stage": Stage::Restore, "variant": variant.prefix, "step": step,
                        "loss": last, "diffusion": losses.diffusion,
                        "agreement": losses.agreement, "cycle": losses.cycle,
                    }),
                )?;
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
        tracing::info!(variant = variant.method, loss = last, "restorer trained");
        restorers.push(model.valid());
    }

    // The run: the init run's tensors, with the frozen modules written from the very
    // instances this stage used (so a test can prove they did not move), and the new ones.
    let mut weights = init_weights;
    weights.retain(|k, _| {
        !(k.starts_with("vision.") || k.starts_with("text.") || k.starts_with("head."))
    });
    weights.extend(prefixed(named_tensors(&bb.vision), "vision"));
    weights.extend(prefixed(named_tensors(&bb.text), "text"));
    let head = head.valid();
    weights.extend(prefixed(named_tensors(&head), HEAD));
    weights.extend(prefixed(named_tensors(&tokens.valid()), MISSING_TOKEN));
    for (variant, model) in VARIANTS.iter().zip(&restorers) {
        weights.extend(prefixed(named_tensors(model), variant.prefix));
    }
    save_weights(&args.out.join(WEIGHTS_FILE), &weights)?;
    write_json(
        &args.out.join(STATE_FILE),
        &TrainState {
            step: cfg.steps,
            seed: cfg.seed,
            last_loss: last,
        },
    )?;
    let test = extract_features(
        &bb,
        &cfg.task.examples(
            cfg.test_examples,
            cfg.data_seed.wrapping_add(1),
            cfg.model.image_size as u32,
        ),
        device,
    )?;
    let complete_accuracy = complete_accuracy(&head, &test, device)?;
    Ok(PairOutcome {
        complete_accuracy,
        final_loss: last,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A trained restore run loaded for evaluation.
pub struct LoadedRestore<B: Backend> {
    pub config: PairTrainConfig,
    pub backbones: Backbones<B>,
    pub models: RestoreModels<B>,
}

pub fn load_restore<B: Backend>(
    run: &Path,
    device: &B::Device,
) -> anyhow::Result<LoadedRestore<B>> {
    let config: PairTrainConfig = read_json(&run.join(CONFIG_FILE))?;
    if config.stage != Stage::Restore {
        anyhow::bail!(
            "{} is a '{}' run, not a restore run",
            run.display(),
            config.stage
        );
    }
    let backbones = load_backbones(run, device)?;
    let weights = load_weights(&run.join(WEIGHTS_FILE))?;
    let head = load_module(
        FusionHead::new(&config.restore, device),
        &weights,
        HEAD,
        run,
    )?;
    let tokens = load_module(
        MissingTokens::new(config.restore.embed_dim, device),
        &weights,
        MISSING_TOKEN,
        run,
    )?;
    let restorers = VARIANTS
        .iter()
        .map(|v| {
            load_module(
                Restorers::new(&config.restore, device),
                &weights,
                v.prefix,
                run,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(LoadedRestore {
        config,
        backbones,
        models: RestoreModels {
            head,
            tokens,
            restorers,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use duet_diffusion::{sample, Prediction, Sampler, SamplerConfig};
    use ndarray::ArrayD;

    type B = NdArray<f32>;

    #[test]
    fn burn_ddim_unroll_matches_the_shared_sampler() {
        let dev = Default::default();
        let cfg = RestoreConfig::new(8, 3);
        B::seed(&dev, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // Real (non-trivial) statistics, so the standardised space differs from the raw one.
        let stat = |rng: &mut ChaCha8Rng, lo: f32| {
            let v: Vec<f32> = (0..8).map(|_| lo + rng.random::<f32>()).collect();
            Tensor::<B, 1>::from_data(TensorData::new(v, [8]), &dev)
        };
        let r = FeatureRestorer::<B>::new(&cfg, &dev).with_statistics(
            (stat(&mut rng, -0.5), stat(&mut rng, 0.1)),
            (stat(&mut rng, -0.5), stat(&mut rng, 0.1)),
        );
        let schedule = NoiseSchedule::cosine(1000).unwrap();
        let cond = gaussian::<B, _>(&mut rng, [2, 8], &dev);
        let x = gaussian::<B, _>(&mut rng, [2, 8], &dev);
        let ours =
            to_vec(ddim_restore(&r, &schedule, 4, cond.clone(), x.clone(), true).unwrap()).unwrap();
        let start = ArrayD::from_shape_vec(vec![2, 8], to_vec(x).unwrap()).unwrap();
        let theirs = sample(
            &schedule,
            Prediction::V,
            &SamplerConfig {
                sampler: Sampler::Ddim { eta: 0.0 },
                steps: 4,
                clip_x0: false,
            },
            start,
            &mut rng,
            |x: &ArrayD<f32>, t: usize| -> anyhow::Result<ArrayD<f32>> {
                let xb = Tensor::<B, 2>::from_data(
                    TensorData::new(x.iter().copied().collect::<Vec<_>>(), [2, 8]),
                    &dev,
                );
                let tb = Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32; 2], [2]), &dev);
                let v = r.forward(xb, tb, cond.clone(), true);
                Ok(ArrayD::from_shape_vec(vec![2, 8], to_vec(v)?)?)
            },
        )
        .unwrap();
        // The shared sampler walks the standardised space; map its result back to embeddings.
        let theirs = to_vec(r.unstandardise(Tensor::<B, 2>::from_data(
            TensorData::new(theirs.iter().copied().collect::<Vec<_>>(), [2, 8]),
            &dev,
        )))
        .unwrap();
        for (a, b) in ours.iter().zip(theirs.iter()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}

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
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use duet_diffusion::NoiseSchedule;
use duet_models::init::seeded;
use duet_models::params::{load_named_tensors, named_tensors};
use duet_models::GenerationModel;
use duet_models::{ModelSpec, VisionEncoder};
use duet_run::{empty_caption, DiffusionSettings, GenerateTrainConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::ema::Ema;
use crate::parallel::{ParallelError, Peer};
use crate::stages::caption::PreparedData;
use crate::stages::caption::{batch_indices, begin_run, load_records, prepare, save_checkpoint};
use duet_datasets::folders::{load_folders, ImageTarget};
use duet_datasets::tokenizer::load_tokenizer;
use duet_run::checkpoint::{load_weights, read_json, TrainState, STATE_FILE, WEIGHTS_FILE};
use duet_run::{warmup_cosine_lr, with_prefixes, CaptionTrainConfig, CONFIG_FILE, TOKENIZER_FILE};

mod loss;
#[cfg(test)]
mod tests;

pub use loss::*;

/// Denoiser architecture options of a new generate run (`ModelSpec::denoiser_long_skips`,
/// `denoiser_conv_head`, `denoiser_layers`, `denoiser_patch_size`); the default is the
/// preset's plain DiT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DenoiserOptions {
    pub long_skips: bool,
    pub conv_head: Option<usize>,
    /// `None`: the preset's block count.
    pub layers: Option<usize>,
    /// `None`: the preset's patch side.
    pub patch_size: Option<usize>,
}

impl DenoiserOptions {
    fn apply(self, model: ModelSpec) -> ModelSpec {
        ModelSpec {
            denoiser_long_skips: self.long_skips,
            denoiser_conv_head: self.conv_head,
            denoiser_layers: self.layers.unwrap_or(model.denoiser_layers),
            denoiser_patch_size: self.patch_size.unwrap_or(model.denoiser_patch_size),
            ..model
        }
    }

    /// Whether `model` (a run being resumed) was built with these options; options left to
    /// the preset match whatever the run has.
    fn matches(self, model: &ModelSpec) -> bool {
        self.long_skips == model.denoiser_long_skips
            && self.conv_head == model.denoiser_conv_head
            && self.layers.is_none_or(|l| l == model.denoiser_layers)
            && self
                .patch_size
                .is_none_or(|p| p == model.denoiser_patch_size)
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
    /// Data-parallel peers ([`crate::parallel`]); 1: one device.
    pub devices: usize,
    /// This process's rank of a multi-process group (`--peers`, `--rank`); `None`: the
    /// peers, if any, are `devices` threads of this process.
    pub network: Option<crate::parallel::NetworkSpec>,
    pub command: String,
    pub quiet: bool,
}

impl GenerateFitArgs {
    /// A run from the caption run `init` on `data` into `out` with every stage default (see
    /// [`crate::stages::caption::FitArgs::new`]).
    pub fn new(init: impl Into<PathBuf>, data: Vec<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            init: init.into(),
            data,
            out: out.into(),
            steps: None,
            batch_size: None,
            lr: None,
            min_snr_gamma: None,
            denoiser: DenoiserOptions::default(),
            seed: 0,
            resume: false,
            device: "cpu".into(),
            devices: 1,
            network: None,
            command: String::new(),
            quiet: false,
        }
    }
}

/// Summary of a finished generate run.
#[derive(Debug, Clone)]
pub struct GenerateOutcome {
    pub steps_done: usize,
    pub final_loss: f64,
    pub final_diffusion_loss: f64,
    pub seconds: f64,
}

/// Per-step rng: a pure function of (seed, step), so a resumed run draws the same timesteps,
/// noise and dropout as an uninterrupted one.
fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0xD1FF_u64.wrapping_mul(step as u64 + 1).rotate_left(17))
}

/// Trains the generate stage on `device`, data-parallel over `args.devices` peers there; see
/// the module docs.
pub fn fit_generate<B: AutodiffBackend>(
    args: &GenerateFitArgs,
    device: &B::Device,
) -> anyhow::Result<GenerateOutcome> {
    fit_generate_on::<B>(args, &vec![device.clone(); args.devices])
}

/// Trains the generate stage data-parallel, one peer on each of `devices` (`args.devices` is
/// not read).
pub fn fit_generate_on<B: AutodiffBackend>(
    args: &GenerateFitArgs,
    devices: &[B::Device],
) -> anyhow::Result<GenerateOutcome> {
    let device = devices.first().ok_or(ParallelError::NoDevices)?;
    let run = &args.out;
    let config_path = run.join(CONFIG_FILE);
    let (cfg, state) = if args.resume && run.join(STATE_FILE).exists() {
        let mut cfg: GenerateTrainConfig = read_json(&config_path)?;
        if let Some(s) = args.steps {
            cfg.steps = s;
        }
        if args.denoiser != DenoiserOptions::default() && !args.denoiser.matches(&cfg.model) {
            anyhow::bail!(
                "--long-skips / --conv-head / --denoiser-layers / --denoiser-patch differ from \
                 the run being resumed (long skips {}, conv head {:?}, {} layers, {} px \
                 patches); a resumed run keeps its denoiser",
                cfg.model.denoiser_long_skips,
                cfg.model.denoiser_conv_head,
                cfg.model.denoiser_layers,
                cfg.model.denoiser_patch_size
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
            stage: duet_run::Stage::Generate,
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
            weight_decay: duet_run::WEIGHT_DECAY,
            grad_clip: duet_run::GRAD_CLIP,
            seed: args.seed,
            checkpoint_every: 200,
            log_every: 10,
            device: args.device.clone(),
            command: args.command.clone(),
            diffusion: DiffusionSettings {
                min_snr_gamma: args.min_snr_gamma,
                ..DiffusionSettings::default()
            },
            tokenizer: Some(init.tokenizer.clone()),
        };
        (cfg, None)
    };
    cfg.model.validate().map_err(anyhow::Error::msg)?;
    if cfg.model.denoiser_layers == 0 {
        anyhow::bail!("--denoiser-layers must be at least 1 (the denoiser needs a block)");
    }
    if let Some(g) = cfg.diffusion.min_snr_gamma {
        if !(g.is_finite() && g > 0.0) {
            anyhow::bail!("--min-snr-gamma must be a positive number, got {g}");
        }
    }
    if cfg.batch_size < 2 {
        anyhow::bail!("the contrastive loss needs --batch-size >= 2");
    }
    let network = args.network.as_ref();
    let writes = crate::parallel::writes_run(network);
    crate::parallel::check(
        crate::parallel::group_size(devices.len(), network)?,
        cfg.batch_size,
    )?;
    // The captioner's tokenizer and weights, carried unchanged; the images fitted as it saw
    // them.
    let tokenizer = load_tokenizer(&cfg.init.join(TOKENIZER_FILE))?;
    let samples = load_folders(&args.data, &ImageTarget::of(&cfg.model, Some(&tokenizer)))
        .with_context(|| format!("the captioner in {}", cfg.init.display()))?;
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

    let schedule = NoiseSchedule::cosine(cfg.diffusion.train_timesteps)?;
    let data = prepare(
        &samples,
        &tokenizer,
        cfg.model.image_size,
        cfg.model.max_len,
    )?;
    let shared = Shared {
        args,
        cfg: &cfg,
        schedule: &schedule,
        data: &data,
        vision: &vision,
        frozen: &frozen,
    };
    let digest = || -> anyhow::Result<[u8; 32]> {
        // What must match across processes: the settings (not where each keeps its files or
        // which device it names), the tokenizer, the frozen captioner and the prepared rows.
        Ok(crate::parallel::digest_of(&[
            &crate::parallel::settings_bytes(&cfg)?,
            tokenizer
                .to_string(false)
                .map_err(anyhow::Error::msg)?
                .as_bytes(),
            &crate::parallel::weights_digest(&vision),
            &data.digest(),
            // The checkpoint being resumed, if any (its weights are compared once loaded).
            &serde_json::to_vec(&state)?,
        ]))
    };
    let group = crate::parallel::Group::<B>::join(devices, network, digest)?;
    if writes {
        begin_run(run, state.is_none(), Some(&tokenizer), &cfg)?;
    }
    group
        .run(|peer, device| train_peer::<B>(&shared, state.clone(), peer, device))
        .map_err(crate::parallel::with_resume_hint)
}

/// What every peer of a generate run reads.
struct Shared<'a, B: AutodiffBackend> {
    args: &'a GenerateFitArgs,
    cfg: &'a GenerateTrainConfig,
    schedule: &'a NoiseSchedule,
    data: &'a PreparedData,
    vision: &'a VisionEncoder<B::InnerBackend>,
    /// The captioner's weights, carried into every checkpoint.
    frozen: &'a duet_models::params::NamedTensors,
}

/// The generate training loop of one data-parallel peer: the same model, optimizer and
/// batches on every peer, each computing its shard's part of the loss; the leader keeps the
/// weight average and writes checkpoints, metrics and progress.
fn train_peer<B: AutodiffBackend>(
    shared: &Shared<'_, B>,
    mut state: Option<TrainState>,
    peer: Peer,
    device: &B::Device,
) -> anyhow::Result<GenerateOutcome> {
    let Shared {
        args,
        cfg,
        schedule,
        data,
        vision,
        frozen,
    } = *shared;
    let run = &args.out;
    let leader = peer.is_leader();
    let mut model = seeded(device, cfg.seed, || {
        GenerationModel::<B>::new(&cfg.model, device)
    });
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(
            cfg.grad_clip,
        )))
        .init::<B, GenerationModel<B>>();
    let start_step = match &state {
        Some(s) => {
            (model, optim) = load_records(run, model, optim, device)?;
            s.step
        }
        None => 0,
    };
    peer.agree_on_start(&model, start_step)?;
    // The average starts from the published weights of the checkpoint being resumed (its EMA)
    // or from the fresh model; only the leader, which writes it, keeps one.
    let mut weight_avg = if leader {
        Some(Ema::new(
            cfg.diffusion.ema_decay,
            match &state {
                Some(_) => with_prefixes(
                    &load_weights(&run.join(WEIGHTS_FILE))?,
                    &["text", "denoiser"],
                ),
                None => named_tensors(&model.valid()),
            },
        ))
    } else {
        None
    };
    let mut image_embeddings =
        ImageEmbeddings::new(vision.clone().to_device(device), &cfg.model, data.n);

    let pb = duet_datasets::progress::stage_bar(args.quiet || !leader, cfg.steps, "generate");
    pb.set_position(start_step as u64);
    let mut metrics = peer.metrics_log(run)?;
    let t0 = Instant::now();
    let mut last_loss = state.as_ref().map(|s| s.last_loss).unwrap_or(f64::NAN);
    let mut last_diffusion = f64::NAN;
    let mut ema: Option<f64> = None;
    for step in start_step..cfg.steps {
        let batch = batch_indices(data.n, cfg.batch_size, step, cfg.seed);
        let mut rng = step_rng(cfg.seed, step);
        let image_emb = image_embeddings.batch(data, &batch, device);
        let GenerateLoss {
            objective,
            total,
            diffusion,
        } = generate_loss(
            &cfg.model,
            &cfg.diffusion,
            schedule,
            &model,
            image_emb,
            data,
            &batch,
            &peer,
            &mut rng,
            device,
        )?;
        let loss_value = peer.sum::<B>(total, device)?;
        let diffusion_value = peer.sum::<B>(diffusion, device)?;
        if !loss_value.is_finite() {
            anyhow::bail!("loss became {loss_value} at step {step}; lower --lr");
        }
        let grads = GradientsParams::from_grads(objective.backward(), &model);
        let grads = peer.sum_gradients(&model, grads)?;
        let lr = warmup_cosine_lr(cfg.lr, cfg.warmup_steps, cfg.steps, step);
        model = optim.step(lr, model, grads);
        last_loss = loss_value;
        last_diffusion = diffusion_value;
        let e = ema.map_or(diffusion_value, |e| 0.95 * e + 0.05 * diffusion_value);
        ema = Some(e);
        pb.set_position(step as u64 + 1);
        pb.set_message(format!("diffusion {e:.3}"));
        let (Some(metrics), Some(weight_avg)) = (metrics.as_mut(), weight_avg.as_mut()) else {
            continue;
        };
        weight_avg.update(&model.valid(), step);
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
                frozen,
                &optim,
                &saved,
            )?;
            state = Some(saved);
        }
    }
    pb.finish_and_clear();
    if let (true, None, Some(weight_avg)) = (leader, &state, &weight_avg) {
        let saved = TrainState {
            step: start_step,
            seed: cfg.seed,
            last_loss,
        };
        save_checkpoint(
            run,
            &model,
            Some(weight_avg.weights()),
            frozen,
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

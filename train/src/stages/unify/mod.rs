//! The unify stage (Unified-GRPO): the captioner as the encoder and the generator as the decoder
//! of one auto-encoder, each trained against the other's reconstruction.
//!
//! 1. *Generation for understanding* (`stage1/`): for every image the captioner samples a group
//!    of captions; the frozen generator rebuilds the image from each (a few DDIM steps, from one
//!    start noise per image so a group's rewards differ only by what its captions say); the
//!    reward is the cosine between the frozen vision encoder's embeddings of the rebuilt and the
//!    input image minus `pixel_weight` × their pixel MSE; [`crate::stages::grpo`] turns the rewards into
//!    a policy-gradient step with a KL penalty to the starting captioner. The vision encoder
//!    stays frozen too: the generator's text embeddings were aligned to it, and the reward
//!    measures with it, so only the caption decoder learns.
//! 2. *Understanding for generation* (`stage2/`): the stage-1 captioner captions every training
//!    image (greedy) and the generator is fine-tuned with the generate stage's loss to rebuild
//!    the image from those captions — its conditioning becomes the language its encoder
//!    actually speaks. With `captions: truth` the same fine-tune runs on the dataset's own
//!    captions instead: the control that separates the loop's effect from extra training.
//!
//! Both stage directories are complete runs (all four modules, tokenizer, config with stage
//! `unify`), so `eval`, `export` and the runtime read them like a generate run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use duet_models::params::{load_named_tensors, named_tensors, NamedTensors};
use duet_models::CaptionModel;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::ema::Ema;
use crate::parallel::Peer;
use crate::stages::caption::{batch_indices, prepare, PreparedData};
use crate::stages::generate::{generate_loss, GenerateLoss, ImageEmbeddings};
use crate::stages::grpo::{grpo_step, GrpoSettings};
use duet_datasets::folders::{folders_display, load_folders, ImageTarget};
use duet_datasets::progress::stage_bar;
use duet_datasets::tokenizer::save_tokenizer;
use duet_models::GenerationModel;
use duet_run::checkpoint::{
    load_weights, save_weights, write_json, TrainState, STATE_FILE, WEIGHTS_FILE,
};
use duet_run::{load_generator, GenerateTrainConfig};
use duet_run::{warmup_cosine_lr, with_prefixes, CONFIG_FILE, METRICS_FILE, TOKENIZER_FILE};

mod reward;

pub use reward::*;

pub const STAGE1_DIR: &str = "stage1";
pub const STAGE2_DIR: &str = "stage2";

/// Which captions stage 2 fine-tunes the generator on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stage2Captions {
    /// The stage-1 captioner's greedy captions (the loop).
    Own,
    /// The dataset's captions (the same-budget control).
    Truth,
}

/// How a caption is scored by rebuilding its image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReconstructionSettings {
    /// DDIM steps (eta 0) of the rebuild.
    pub steps: usize,
    pub guidance: f32,
    /// Weight of the pixel MSE (images in `[-1, 1]`) subtracted from the embedding cosine.
    pub pixel_weight: f64,
}

impl Default for ReconstructionSettings {
    fn default() -> Self {
        Self {
            steps: 10,
            guidance: 3.0,
            pixel_weight: 1.0,
        }
    }
}

/// Everything the unify stage adds to a generate run's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnifySettings {
    pub grpo: GrpoSettings,
    pub reconstruction: ReconstructionSettings,
    /// Stage 1: GRPO steps, images per step (each sampled `grpo.group` times), peak lr.
    pub understand_steps: usize,
    pub understand_images: usize,
    pub understand_lr: f64,
    /// Stage 2: fine-tune steps, batch size, peak lr, and which captions.
    pub generate_steps: usize,
    pub generate_batch: usize,
    pub generate_lr: f64,
    pub captions: Stage2Captions,
}

impl Default for UnifySettings {
    fn default() -> Self {
        Self {
            grpo: GrpoSettings::default(),
            reconstruction: ReconstructionSettings::default(),
            understand_steps: 100,
            understand_images: 8,
            understand_lr: 5e-5,
            generate_steps: 600,
            generate_batch: 32,
            generate_lr: 1e-4,
            captions: Stage2Captions::Own,
        }
    }
}

/// `config.json` of a unify run and of both its stage directories: a generate config (so every
/// reader of generate runs reads it; `init` is the generate run it started from, `steps`,
/// `batch_size` and `lr` are stage 2's) plus the unify settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnifyTrainConfig {
    #[serde(flatten)]
    pub base: GenerateTrainConfig,
    pub unify: UnifySettings,
}

/// Options of `duet-train fit --stage unify`; `None` keeps [`UnifySettings::default`].
#[derive(Debug, Clone)]
pub struct UnifyFitArgs {
    /// The generate run to start from.
    pub init: PathBuf,
    /// Training folders: ShapeWorld folders and Emoji-CLDR splits, in any mix.
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub understand_steps: Option<usize>,
    pub understand_images: Option<usize>,
    pub understand_lr: Option<f64>,
    pub group: Option<usize>,
    /// Sampling temperature of stage 1's captions; a confident captioner needs more than 1 to
    /// sample differing captions within a group (identical ones carry no advantage).
    pub temperature: Option<f64>,
    pub generate_steps: Option<usize>,
    pub generate_lr: Option<f64>,
    pub captions: Option<Stage2Captions>,
    pub seed: u64,
    pub device: String,
    /// Data-parallel peers (`--devices`): each takes its share of the images of every stage-1
    /// step and of every stage-2 batch. 1: plain one-device training.
    pub devices: usize,
    /// This process's rank of a multi-process group (`--peers`, `--rank`).
    pub network: Option<crate::parallel::NetworkSpec>,
    pub command: String,
    pub quiet: bool,
}

impl Default for UnifyFitArgs {
    fn default() -> Self {
        Self {
            init: PathBuf::new(),
            data: Vec::new(),
            out: PathBuf::new(),
            understand_steps: None,
            understand_images: None,
            understand_lr: None,
            group: None,
            temperature: None,
            generate_steps: None,
            generate_lr: None,
            captions: None,
            seed: 0,
            device: String::new(),
            devices: 1,
            network: None,
            command: String::new(),
            quiet: false,
        }
    }
}

/// Summary of a finished unify run.
#[derive(Debug, Clone)]
pub struct UnifyOutcome {
    pub grpo_steps: usize,
    /// Mean reward of the first and the last `min(10, steps / 2)` GRPO steps (disjoint windows,
    /// so a short run compares its halves).
    pub reward_start: f64,
    pub reward_end: f64,
    pub final_kl: f64,
    /// Mean over stage-1 steps of the fraction of groups whose captions scored differently
    /// (the only ones that move the captioner).
    pub informative_groups: f64,
    pub final_diffusion_loss: f64,
    pub seconds: f64,
}

/// Writes one complete stage directory: weights, tokenizer, config, state (last).
fn write_stage(
    dir: &Path,
    cfg: &UnifyTrainConfig,
    init: &Path,
    weights: &NamedTensors,
    state: &TrainState,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    save_weights(&dir.join(WEIGHTS_FILE), weights)?;
    let tokenizer = duet_datasets::tokenizer::load_tokenizer(&init.join(TOKENIZER_FILE))?;
    save_tokenizer(&tokenizer, &dir.join(TOKENIZER_FILE))?;
    write_json(&dir.join(CONFIG_FILE), cfg)?;
    write_json(&dir.join(STATE_FILE), state)?;
    Ok(())
}

fn merged(parts: &[NamedTensors]) -> NamedTensors {
    parts.iter().flat_map(|p| p.clone()).collect()
}

/// Runs both unify stages; see the module docs.
pub fn fit_unify<B: AutodiffBackend>(
    args: &UnifyFitArgs,
    device: &B::Device,
) -> anyhow::Result<UnifyOutcome> {
    fit_unify_on::<B>(args, &vec![device.clone(); args.devices])
}

/// Runs the unify stage data-parallel, one peer on each of `devices` (`args.devices` is not
/// read).
pub fn fit_unify_on<B: AutodiffBackend>(
    args: &UnifyFitArgs,
    devices: &[B::Device],
) -> anyhow::Result<UnifyOutcome> {
    let device = devices
        .first()
        .ok_or(crate::parallel::ParallelError::NoDevices)?;
    let out = &args.out;
    let init_cfg: GenerateTrainConfig =
        duet_run::checkpoint::read_json(&args.init.join(CONFIG_FILE)).map_err(|e| {
            anyhow::anyhow!("--init {} is not a generate run: {e}", args.init.display())
        })?;
    if !matches!(
        init_cfg.stage,
        duet_run::Stage::Generate | duet_run::Stage::Unify
    ) {
        anyhow::bail!(
            "--init {} is a '{}' run; the unify stage starts from a generate run",
            args.init.display(),
            init_cfg.stage
        );
    }
    let defaults = UnifySettings::default();
    let mut unify = UnifySettings {
        understand_steps: args.understand_steps.unwrap_or(defaults.understand_steps),
        understand_images: args.understand_images.unwrap_or(defaults.understand_images),
        understand_lr: args.understand_lr.unwrap_or(defaults.understand_lr),
        generate_steps: args.generate_steps.unwrap_or(defaults.generate_steps),
        generate_lr: args.generate_lr.unwrap_or(defaults.generate_lr),
        captions: args.captions.unwrap_or(defaults.captions),
        ..defaults
    };
    if let Some(g) = args.group {
        unify.grpo.group = g;
    }
    if let Some(t) = args.temperature {
        if !(t.is_finite() && t > 0.0) {
            anyhow::bail!("--temperature must be a positive number, got {t}");
        }
        unify.grpo.temperature = t;
    }
    if unify.grpo.group < 2 {
        anyhow::bail!("--group must be at least 2 (advantages are relative within a group)");
    }
    if unify.understand_images == 0 || unify.generate_batch < 2 {
        anyhow::bail!(
            "batch sizes must be positive (stage 2 needs at least 2 for its contrastive loss)"
        );
    }
    let cfg = UnifyTrainConfig {
        base: GenerateTrainConfig {
            stage: duet_run::Stage::Unify,
            init: args.init.clone(),
            data: args.data.clone(),
            steps: unify.generate_steps,
            batch_size: unify.generate_batch,
            lr: unify.generate_lr,
            warmup_steps: 20,
            seed: args.seed,
            device: args.device.clone(),
            command: args.command.clone(),
            ..init_cfg
        },
        unify,
    };
    let generator = load_generator::<B::InnerBackend>(&args.init, false, device)?;
    let model_cfg = &cfg.base.model;
    let samples = load_folders(
        &args.data,
        &ImageTarget::of(model_cfg, Some(&generator.tokenizer)),
    )?;
    let data = prepare(
        &samples,
        &generator.tokenizer,
        model_cfg.image_size,
        model_cfg.max_len,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", folders_display(&args.data)))?;
    let network = args.network.as_ref();
    let peers = crate::parallel::group_size(devices.len(), network)?;
    crate::parallel::check(peers, cfg.unify.understand_images)?;
    crate::parallel::check(peers, cfg.unify.generate_batch)?;
    let weights = load_weights(&args.init.join(WEIGHTS_FILE))?;
    let captioner_weights = with_prefixes(&weights, &["vision", "decoder"]);
    let generator_weights = with_prefixes(&weights, &["text", "denoiser"]);
    let reference = load_named_tensors(
        CaptionModel::<B::InnerBackend>::new(model_cfg, device),
        &captioner_weights,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", args.init.display()))?;
    let digest = || -> anyhow::Result<[u8; 32]> {
        // What must match across processes: the settings (not where each keeps its files or
        // which device it names), the tokenizer, the starting weights and the prepared rows.
        Ok(crate::parallel::digest_of(&[
            &crate::parallel::settings_bytes(&cfg)?,
            generator
                .tokenizer
                .to_string(false)
                .map_err(anyhow::Error::msg)?
                .as_bytes(),
            &crate::parallel::weights_digest(&reference),
            &crate::parallel::weights_digest(&generator.generator),
            &data.digest(),
        ]))
    };
    let group = crate::parallel::Group::<B>::join(devices, network, digest)?;
    // Made only now, so a refused folder or peer leaves no empty run behind.
    if crate::parallel::writes_run(network) {
        std::fs::create_dir_all(out)?;
        write_json(&out.join(CONFIG_FILE), &cfg)?;
    }
    let inputs = UnifyInputs {
        args,
        cfg: &cfg,
        data: &data,
        generator: &generator,
        reference: &reference,
        captioner_weights: &captioner_weights,
        generator_weights: &generator_weights,
    };
    group.run(|peer, device| unify_peer::<B>(&inputs, &peer, device))
}

/// What every peer of a unify run reads.
struct UnifyInputs<'a, B: AutodiffBackend> {
    args: &'a UnifyFitArgs,
    cfg: &'a UnifyTrainConfig,
    data: &'a PreparedData,
    generator: &'a duet_run::LoadedGenerator<B::InnerBackend>,
    /// The starting captioner, frozen: stage 1's KL reference.
    reference: &'a CaptionModel<B::InnerBackend>,
    captioner_weights: &'a NamedTensors,
    generator_weights: &'a NamedTensors,
}

/// Both unify stages on one data-parallel peer: in stage 1 each peer samples and rebuilds the
/// groups of its share of a step's images, in stage 2 it computes its share of the batch's
/// loss; the gradients are summed across peers before every step, and the leader writes the
/// stage directories, metrics and progress.
fn unify_peer<B: AutodiffBackend>(
    inputs: &UnifyInputs<'_, B>,
    peer: &Peer,
    device: &B::Device,
) -> anyhow::Result<UnifyOutcome> {
    let UnifyInputs {
        args,
        cfg,
        data,
        generator,
        reference,
        captioner_weights,
        generator_weights,
    } = *inputs;
    let out = &args.out;
    let model_cfg = &cfg.base.model;
    let leader = peer.is_leader();
    let quiet = args.quiet || !leader;
    // The frozen models were loaded once, on the first device: each peer uses its own copy on
    // its own device (a no-op on the CPU).
    let reference = &reference.clone().to_device(device);
    let generator = &generator.to_device(device);
    let vision = reference.vision.clone();
    let t0 = Instant::now();

    // ---- Stage 1: generation for understanding ----
    let u = &cfg.unify;
    let mut policy =
        load_named_tensors(CaptionModel::<B>::new(model_cfg, device), captioner_weights)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.init.display()))?;
    policy.vision = policy.vision.no_grad();
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
        .init::<B, CaptionModel<B>>();
    let stage1 = out.join(STAGE1_DIR);
    let mut metrics = if leader {
        std::fs::create_dir_all(&stage1)?;
        Some(std::fs::File::create(stage1.join(METRICS_FILE))?)
    } else {
        None
    };
    let pb = stage_bar(quiet, u.understand_steps, "unify 1/2 grpo");
    let mut rewards = Vec::with_capacity(u.understand_steps);
    let mut informative = Vec::with_capacity(u.understand_steps);
    let mut last_kl = 0.0;
    let mut last_grpo_loss = f64::NAN;
    for step in 0..u.understand_steps {
        let batch = batch_indices(data.n, u.understand_images, step, cfg.base.seed ^ 0x5EED);
        let mine = peer.shard_range(batch.len());
        let idx = &batch[mine.clone()];
        let pixels = data.pixels_batch::<B>(idx, device);
        let originals = data.pixels_batch::<B::InnerBackend>(idx, device);
        // One caption generator per image, a stream of the step's seed chosen by the image's
        // place in the batch: its captions are the same whichever peer samples them.
        let mut rngs: Vec<ChaCha8Rng> = mine
            .clone()
            .map(|j| {
                let mut rng =
                    ChaCha8Rng::seed_from_u64(cfg.base.seed.wrapping_mul(1_000_003) ^ step as u64);
                rng.set_stream(j as u64);
                rng
            })
            .collect();
        let noise_seed = cfg.base.seed.wrapping_add(step as u64);
        let lr = warmup_cosine_lr(u.understand_lr, 10, u.understand_steps, step);
        let (p, stats) = grpo_step(
            policy,
            reference,
            &mut optim,
            lr,
            pixels,
            &u.grpo,
            model_cfg.max_len,
            &mut rngs,
            peer,
            batch.len(),
            |seqs: &[Vec<u32>]| -> anyhow::Result<Vec<f32>> {
                let rebuilt = reconstruct(
                    generator,
                    seqs,
                    u.grpo.group,
                    &u.reconstruction,
                    noise_seed,
                    mine.start,
                    batch.len(),
                    device,
                )?;
                Ok(
                    similarity(&vision, originals.clone(), &rebuilt, u.grpo.group, device)
                        .into_iter()
                        .map(|(cos, mse)| cos - u.reconstruction.pixel_weight as f32 * mse)
                        .collect(),
                )
            },
        )?;
        policy = p;
        if !stats.loss.is_finite() {
            anyhow::bail!("GRPO loss became {} at step {step}; lower --lr", stats.loss);
        }
        rewards.push(stats.mean_reward);
        informative.push(stats.informative_groups);
        last_kl = stats.kl;
        last_grpo_loss = stats.loss;
        if let Some(metrics) = metrics.as_mut() {
            writeln!(
                metrics,
                "{}",
                serde_json::json!({
                    "step": step + 1, "reward": stats.mean_reward, "kl": stats.kl,
                    "loss": stats.loss, "informative_groups": stats.informative_groups,
                    "mean_len": stats.mean_len, "lr": lr,
                    "elapsed_s": t0.elapsed().as_secs_f64(),
                })
            )?;
        }
        pb.inc(1);
        pb.set_message(format!(
            "reward {:.3} kl {:.4} informative {:.0}%",
            stats.mean_reward,
            stats.kl,
            100.0 * stats.informative_groups
        ));
    }
    pb.finish_and_clear();
    if leader && !informative.is_empty() && informative.iter().all(|&f| f == 0.0) {
        tracing::warn!(
            temperature = u.grpo.temperature,
            "stage 1 left the captioner unchanged: every group sampled captions that scored \
             alike, so no advantage was non-zero; raise --temperature or --group"
        );
    }
    let captioner = policy.valid();
    let captioner_trained = named_tensors(&captioner);
    if leader {
        write_stage(
            &stage1,
            cfg,
            &args.init,
            &merged(&[captioner_trained.clone(), generator_weights.clone()]),
            &TrainState {
                step: u.understand_steps,
                seed: cfg.base.seed,
                last_loss: last_grpo_loss,
            },
        )?;
        crate::curves::write_run_curves(&stage1)?;
        tracing::info!(dir = %stage1.display(), "stage 1 written");
    }

    // ---- Stage 2: understanding for generation ----
    // Own captions are made as stage 2 first draws each image (like the cached embeddings):
    // a short fine-tune sees a fraction of a large dataset, so captioning all of it up front
    // would cost more than the fine-tune. Every peer captions the whole batch (greedy, so the
    // same captions), as generate_loss reads every row's caption for the contrastive loss.
    let mut own = match u.captions {
        Stage2Captions::Own => Some(OwnCaptions::new(data, model_cfg.max_len)),
        Stage2Captions::Truth => None,
    };
    let schedule = duet_diffusion::NoiseSchedule::cosine(cfg.base.diffusion.train_timesteps)?;
    let mut model = load_named_tensors(
        GenerationModel::<B>::new(model_cfg, device),
        generator_weights,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", args.init.display()))?;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.base.weight_decay)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(
            cfg.base.grad_clip,
        )))
        .init::<B, GenerationModel<B>>();
    // Only the leader, which writes it, keeps the weight average.
    let mut weight_avg =
        leader.then(|| Ema::new(cfg.base.diffusion.ema_decay, generator_weights.clone()));
    let mut embeddings = ImageEmbeddings::new(vision.clone(), model_cfg, data.n);
    let stage2 = out.join(STAGE2_DIR);
    let mut metrics = if leader {
        std::fs::create_dir_all(&stage2)?;
        Some(std::fs::File::create(stage2.join(METRICS_FILE))?)
    } else {
        None
    };
    let pb = stage_bar(quiet, u.generate_steps, "unify 2/2 generator");
    let mut ema_loss: Option<f64> = None;
    let mut last_diffusion = f64::NAN;
    for step in 0..u.generate_steps {
        let idx = batch_indices(data.n, u.generate_batch, step, cfg.base.seed ^ 0x2);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.base.seed.rotate_left(23) ^ step as u64);
        let train_data: &PreparedData = match own.as_mut() {
            Some(own) => own.caption(&captioner, &idx, device),
            None => data,
        };
        let image_emb = embeddings.batch(train_data, &idx, device);
        let GenerateLoss {
            objective: loss,
            total,
            diffusion,
        } = generate_loss(
            model_cfg,
            &cfg.base.diffusion,
            &schedule,
            &model,
            image_emb,
            train_data,
            &idx,
            peer,
            &mut rng,
            device,
        )?;
        let loss_value = peer.sum::<B>(total, device)?;
        last_diffusion = peer.sum::<B>(diffusion, device)?;
        if !loss_value.is_finite() {
            anyhow::bail!("loss became {loss_value} at stage-2 step {step}; lower --gen-lr");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let grads = peer.sum_gradients(&model, grads)?;
        let lr = warmup_cosine_lr(u.generate_lr, cfg.base.warmup_steps, u.generate_steps, step);
        model = optim.step(lr, model, grads);
        if let Some(avg) = weight_avg.as_mut() {
            avg.update(&model.valid(), step);
        }
        let e = ema_loss.map_or(last_diffusion, |e| 0.95 * e + 0.05 * last_diffusion);
        ema_loss = Some(e);
        if let Some(metrics) = metrics.as_mut() {
            if (step + 1) % 10 == 0 || step + 1 == u.generate_steps {
                writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({
                        "step": step + 1, "loss": loss_value, "diffusion_loss": last_diffusion,
                        "diffusion_loss_ema": e, "lr": lr,
                        "elapsed_s": t0.elapsed().as_secs_f64(),
                    })
                )?;
            }
        }
        pb.inc(1);
        pb.set_message(format!("diffusion {e:.3}"));
    }
    pb.finish_and_clear();
    if let Some(avg) = &weight_avg {
        write_stage(
            &stage2,
            cfg,
            &args.init,
            &merged(&[captioner_trained, avg.weights().clone()]),
            &TrainState {
                step: u.generate_steps,
                seed: cfg.base.seed,
                last_loss: last_diffusion,
            },
        )?;
        crate::curves::write_run_curves(&stage2)?;
        tracing::info!(dir = %stage2.display(), "stage 2 written");
    }
    let k = (rewards.len() / 2).clamp(1, 10).min(rewards.len());
    let mean = |r: &[f64]| r.iter().sum::<f64>() / r.len().max(1) as f64;
    Ok(UnifyOutcome {
        grpo_steps: rewards.len(),
        reward_start: mean(&rewards[..k]),
        reward_end: mean(&rewards[rewards.len() - k..]),
        final_kl: last_kl,
        informative_groups: mean(&informative),
        final_diffusion_loss: last_diffusion,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

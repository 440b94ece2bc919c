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

use anyhow::Context;
use burn::tensor::backend::Backend;
use duet_models::{ModelSpec, Preset, RestoreConfig};
use duet_run::{
    load_backbones, load_module, prefixed, PairTrainConfig, RestoreSettings, Variant, HEAD,
    MISSING_TOKEN, VARIANTS,
};
use serde::Serialize;

use duet_datasets::folders::ImageTarget;
use duet_datasets::pair_tasks::{LabelledFolder, PairData, PairTask};
use duet_run::checkpoint::STATE_FILE;
use duet_run::Stage;
use duet_run::METRICS_FILE;

use crate::parallel::Peer;

mod backbones;
mod fusion;
mod restorers;
#[cfg(test)]
mod tests;

pub use backbones::*;
pub use fusion::*;
pub use restorers::*;

/// Options of `fit --stage fusion|restore`.
#[derive(Debug, Clone)]
pub struct PairFitArgs {
    /// Generate run (fusion) or fusion run (restore).
    pub init: PathBuf,
    pub out: PathBuf,
    /// Fusion only (restore takes the fusion run's): a ShapeWorld task, or
    pub task: Option<PairTask>,
    /// a captioned folder with a label on every pair.
    pub data: Option<PathBuf>,
    pub train_examples: Option<usize>,
    pub test_examples: Option<usize>,
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    pub seed: u64,
    /// Restore only; `None` = defaults.
    pub settings: Option<RestoreSettings>,
    pub device: String,
    /// Data-parallel peers on this machine's CPU (`--devices`): each takes `1/devices` of
    /// every batch.
    pub devices: usize,
    /// This process's rank of a multi-process group (`--peers`, `--rank`).
    pub network: Option<crate::parallel::NetworkSpec>,
    pub command: String,
    pub quiet: bool,
}

impl PairFitArgs {
    /// A fusion run from the generate run `init`, or a restore run from the fusion run `init`,
    /// into `out` with every stage default (see [`crate::stages::caption::FitArgs::new`]); a
    /// fusion run also needs `task` or `data`.
    pub fn new(init: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            init: init.into(),
            out: out.into(),
            task: None,
            data: None,
            train_examples: None,
            test_examples: None,
            steps: None,
            batch_size: None,
            lr: None,
            seed: 0,
            settings: None,
            device: "cpu".into(),
            devices: 1,
            network: None,
            command: String::new(),
            quiet: false,
        }
    }
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
    task: PairData,
    from: Option<&PairTrainConfig>,
    generator_diffusion: Option<duet_run::DiffusionSettings>,
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
        // The fusion stage sets its generator's.
        tokenizer: from.and_then(|f| f.tokenizer.clone()),
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

/// Refuses to overwrite a finished run (checked before anything is computed or written).
fn check_out(out: &Path) -> anyhow::Result<()> {
    if out.join(STATE_FILE).exists() {
        anyhow::bail!(
            "{} already holds a finished run; choose another --out",
            out.display()
        );
    }
    Ok(())
}

fn create_out(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

/// A digest of what a pair run trains on, for data-parallel peers in other processes to
/// check against each other before anything is written: its settings (not where it keeps its
/// files, its device or its command line), its training examples (pixels, texts, labels) and
/// the frozen backbones' weights. Inputs, not the features computed from them: those may
/// differ in their last bits between CPUs with different vector units.
fn pair_digest<B: Backend>(
    cfg: &PairTrainConfig,
    examples: &[duet_datasets::pair_tasks::PairExample],
    bb: &duet_run::Backbones<B>,
) -> anyhow::Result<[u8; 32]> {
    let mut inputs = Vec::new();
    for e in examples {
        inputs.extend_from_slice(e.image.as_raw());
        inputs.extend_from_slice(&(e.text.len() as u64).to_le_bytes());
        inputs.extend_from_slice(e.text.as_bytes());
        inputs.extend_from_slice(&(e.label as u64).to_le_bytes());
    }
    Ok(crate::parallel::digest_of(&[
        &crate::parallel::settings_bytes(cfg)?,
        &inputs,
        &crate::parallel::weights_digest(&bb.vision),
        &crate::parallel::weights_digest(&bb.text),
    ]))
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

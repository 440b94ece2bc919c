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
use duet_models::{FusionHead, MissingTokens, ModelSpec, Preset, RestoreConfig, Restorers};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{load_weights, read_json, STATE_FILE, WEIGHTS_FILE};
use crate::data::pair_tasks::PairTask;
use crate::stage::Stage;
use crate::stages::caption::{CONFIG_FILE, METRICS_FILE};

mod backbones;
mod fusion;
mod restorers;
#[cfg(test)]
mod tests;

pub use backbones::*;
pub use fusion::*;
pub use restorers::*;

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
    pub generator_diffusion: Option<crate::stages::generate::DiffusionSettings>,
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
    generator_diffusion: Option<crate::stages::generate::DiffusionSettings>,
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

//! What defines a run, as each stage writes it to `RUN/config.json`: the one schema of that
//! file, read back by resumes, evaluations and the exporter.

use std::path::PathBuf;

use duet_datasets::pair_tasks::PairData;
use duet_diffusion::Prediction;
use duet_models::{ModelSpec, Preset, RestoreConfig};
use serde::{Deserialize, Serialize};

use crate::Stage;

/// The stage a run's `config.json` names, read before the rest of the file so that a run of
/// another stage is reported as such rather than as a config with missing fields.
pub fn run_stage(run: &std::path::Path) -> anyhow::Result<Stage> {
    #[derive(Deserialize)]
    struct StageOnly {
        stage: Stage,
    }
    let StageOnly { stage } = crate::checkpoint::read_json(&run.join(crate::CONFIG_FILE))?;
    Ok(stage)
}

/// Everything that defines a caption training run; written to `RUN/config.json`.
/// AdamW weight decay of the caption, generate and dream stages.
pub const WEIGHT_DECAY: f32 = 0.01;
/// Largest global gradient norm of the caption, generate and dream stages (clipped above).
pub const GRAD_CLIP: f32 = 1.0;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptionTrainConfig {
    pub stage: Stage,
    pub preset: Preset,
    pub model: ModelSpec,
    /// The training folders, in order (one path in runs made before several were accepted).
    #[serde(deserialize_with = "duet_datasets::folders::one_or_many_paths")]
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
    /// The exact command line that started the run.
    pub command: String,
    /// Where the weights training started from (`--init-from`: a run carrying a captioner);
    /// `None`: from scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Where `tokenizer.json` came from.
    #[serde(default)]
    pub tokenizer: TokenizerOrigin,
    /// Questions (the folders' `questions.jsonl`) trained beside the captions: the model
    /// answers a question given as its prompt. 0 in runs made before questions existed.
    #[serde(default)]
    pub questions: usize,
}

/// Where a caption run's tokenizer came from: trained on its captions, or reused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum TokenizerOrigin {
    /// Trained on the run's training captions (runs made before this was written).
    #[default]
    Trained,
    /// Reused unchanged from another run's or bundle's `tokenizer.json` (`--tokenizer`, or
    /// the `--init-from` run's): its sha256, so the manifest can say which. `path` is the file
    /// read, or the single-file bundle it was imported from.
    Reused { path: PathBuf, sha256: String },
    /// The tokenizer of `path` (sha256 `sha256`) with the words `added` appended after its
    /// last id (`duet-train extend-vocab`): every text it encoded keeps its ids.
    Extended {
        path: PathBuf,
        sha256: String,
        added: Vec<String>,
    },
}

impl std::fmt::Display for TokenizerOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerOrigin::Trained => f.write_str("trained on the run's captions"),
            TokenizerOrigin::Reused { path, sha256 } => {
                write!(f, "reused from {} (sha256 {sha256})", path.display())
            }
            TokenizerOrigin::Extended {
                path,
                sha256,
                added,
            } => write!(
                f,
                "{} (sha256 {sha256}) with {} words added: {}",
                path.display(),
                added.len(),
                added.join(" ")
            ),
        }
    }
}

impl CaptionTrainConfig {
    pub fn for_preset(preset: Preset) -> (usize, usize, f64) {
        // (steps, batch_size, lr)
        match preset {
            Preset::Tiny => (1200, 32, 2e-3),
            Preset::Small => (6000, 64, 1e-3),
        }
    }

    /// See [`warmup_cosine_lr`].
    pub fn lr_at(&self, step: usize) -> f64 {
        warmup_cosine_lr(self.lr, self.warmup_steps, self.steps, step)
    }
}

/// Linear warm-up then cosine decay to 5% of the peak rate `lr` (every stage's schedule).
pub fn warmup_cosine_lr(lr: f64, warmup_steps: usize, steps: usize, step: usize) -> f64 {
    if step < warmup_steps {
        return lr * (step + 1) as f64 / warmup_steps as f64;
    }
    let span = (steps.saturating_sub(warmup_steps)).max(1) as f64;
    let t = ((step - warmup_steps) as f64 / span).min(1.0);
    let min = 0.05 * lr;
    min + 0.5 * (lr - min) * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Diffusion and contrastive settings of a generate run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiffusionSettings {
    pub prediction: Prediction,
    /// Training timesteps `T` of the cosine schedule.
    pub train_timesteps: usize,
    /// Fraction of captions replaced by the empty caption (classifier-free guidance).
    pub cond_dropout: f64,
    pub contrastive_weight: f64,
    /// Softmax temperature of the contrastive loss.
    pub temperature: f64,
    /// Decay of the weight average that is published (see `duet_train::ema`).
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
    pub stage: Stage,
    pub preset: Preset,
    pub model: ModelSpec,
    /// The caption run whose vision encoder (frozen) and decoder this run carries.
    pub init: PathBuf,
    /// The training folders, in order (one path in runs made before several were accepted).
    #[serde(deserialize_with = "duet_datasets::folders::one_or_many_paths")]
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
    /// Where the run's tokenizer came from: its caption run's (the generate stage copies it),
    /// the bundle it was imported from (`duet-export import`), or a grown vocabulary
    /// (`duet-train extend-vocab`); later stages copy their init's. `None` (absent from the
    /// file) in runs made before this was written: the caption run of the `init` chain says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerOrigin>,
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

/// Everything that defines a dream run: the generate run's fields (its `init` is the generate
/// run whose vision encoder, text encoder and denoiser stay frozen, and its `model` adds
/// `dream_queries`), so every tool that reads a generate run's config reads this one, plus
/// the dream stage's own settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DreamTrainConfig {
    #[serde(flatten)]
    pub run: GenerateTrainConfig,
    /// Weight of the understanding loss (captions and questions, teacher-forced) beside the
    /// diffusion loss; 0 trains the decoder for generation alone.
    pub understanding_weight: f64,
    /// Weight of matching the frozen text path's prediction on the target's caption beside
    /// the plain diffusion loss (`duet_train::stages::dream::dream_loss`); 0: diffusion alone.
    pub distill_weight: f64,
    /// Weight of the generation objective (diffusion + match); 0 trains understanding alone
    /// on the same rows and schedule: the control of the joint-vs-separate comparison.
    /// Runs written before this field existed trained with 1.
    #[serde(default = "one")]
    pub generation_weight: f64,
    /// Weight of matching generation rows' prompt tokens to the text encoder's tokens of the
    /// same caption, position by position; runs written before this field trained with 0.
    #[serde(default)]
    pub token_weight: f64,
    /// Questions (the folders' `questions.jsonl`) the decoder trained on in this stage (with
    /// an understanding weight above 0): it answers them (`duet ask`). 0 in runs written
    /// before this field existed.
    #[serde(default)]
    pub questions: usize,
}

fn one() -> f64 {
    1.0
}

impl DreamTrainConfig {
    /// `(steps, batch_size, lr, dream_queries)` defaults per preset.
    pub fn for_preset(preset: Preset) -> (usize, usize, f64, usize) {
        match preset {
            // 3e-3: the queries and their projection start from nothing (measured at 1e-3 the
            // match to the text path's prediction had barely moved after 600 steps).
            Preset::Tiny => (400, 32, 3e-3, 8),
            Preset::Small => (4000, 64, 3e-4, 16),
        }
    }
}

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
    /// A ShapeWorld task (its name) or a user's labelled folder (its path and classes).
    pub task: PairData,
    /// The generate run (fusion) or fusion run (restore) this run starts from.
    pub init: PathBuf,
    /// Training examples of a task, drawn from `data_seed`; the held-out test set is drawn
    /// from `data_seed + 1` (fresh draws: the scene space is small, so many test images and
    /// texts also occur in training — the hidden view is what is new). A folder's counts are
    /// its train and held-out (val + test) pairs.
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
    pub generator_diffusion: Option<DiffusionSettings>,
    pub device: String,
    pub command: String,
    /// Restore stage only.
    #[serde(default)]
    pub settings: Option<RestoreSettings>,
    /// The tokenizer origin of the run this one starts from (see
    /// [`GenerateTrainConfig::tokenizer`]); `None` in runs made before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerOrigin>,
}

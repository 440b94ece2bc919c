//! The dream stage (DreamLLM): the caption decoder learns, through `K` dream queries appended
//! after its prompt, to condition the generate run's denoiser.
//!
//! Rows: every sample is a *generation* row (the blank image + its caption → draw the image),
//! and every line of a folder's `edits.jsonl` an *edit* row (the image + the instruction →
//! draw the exact target scene). Half of each batch is edits when the folders have any.
//!
//! Loss = the diffusion loss of the target image under the queries' conditioning, through
//! the frozen denoiser, + `understanding_weight` × the caption/VQA loss of the same decoder
//! (teacher-forced on the folders' captions and questions), so the one transformer keeps
//! answering while it learns to dream.
//!
//! Frozen, and why: the denoiser (as DreamLLM keeps its diffusion model frozen) — so the
//! text-encoder path of the bundle keeps drawing exactly as before, both conditionings drive
//! one denoiser graph, and a comparison between them measures the conditioner alone; its
//! unconditional branch for classifier-free guidance stays the text encoder's empty caption.
//! The vision encoder — every stage after captioning keeps it, so the images the decoder reads
//! are those it was trained on. The text encoder is not used here. Trained: the decoder and the
//! queries with their projection.
//!
//! The run holds the whole model: `vision.*`, `text.*`, `denoiser.*` copied from `--init`
//! (a generate run), the trained `decoder.*` and the new `dream.*`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use duet_datasets::folders::{load_folders, ImageTarget};
use duet_datasets::image_to_chw;
use duet_datasets::shapeworld::{load_edits, objects_caption, render, EditKind, Sample, Scene};
use duet_datasets::tokenizer::{encode_caption, load_tokenizer};
use duet_diffusion::NoiseSchedule;
use duet_models::denoiser::masked_mean;
use duet_models::dream::dream_mask;
use duet_models::init::seeded;
use duet_models::params::{load_named_tensors, NamedTensors};
use duet_models::tokens::{PAD_ID, UNK_ID};
use duet_models::{CaptionDecoder, Denoiser, DreamModel, ModelSpec, VisionEncoder};
use duet_run::checkpoint::{load_weights, read_json, TrainState, STATE_FILE, WEIGHTS_FILE};
use duet_run::{
    load_generator_weights, under, warmup_cosine_lr, with_prefixes, DiffusionSettings,
    DreamTrainConfig, GenerateTrainConfig, Stage, CONFIG_FILE, TOKENIZER_FILE,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::parallel::{ParallelError, Peer};
use crate::stages::caption::{
    batch_indices, begin_run, decoder_nll, load_question_rows, load_records,
    prepare_with_questions, save_checkpoint, PreparedData,
};
use crate::stages::generate::{noise_images_part, Noised};

/// Weight of the match to the text path ([`dream_loss`]): its MSEs are a tenth of the
/// diffusion loss's, so at 1 they barely steered the queries (measured: the conditioning
/// stayed nearly the same for every prompt after 600 steps).
pub const DEFAULT_DISTILL_WEIGHT: f64 = 10.0;

/// Weight of the per-token match to the text encoder's tokens ([`dream_loss`]).
pub const DEFAULT_TOKEN_WEIGHT: f64 = 0.0;

/// Options of `duet-train fit --stage dream`.
#[derive(Debug, Clone)]
pub struct DreamFitArgs {
    /// The generate run whose captioner and generator this run starts from.
    pub init: PathBuf,
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    /// Dream queries (a new run only); `None`: the preset's.
    pub queries: Option<usize>,
    /// `None`: 1.
    pub understanding_weight: Option<f64>,
    /// Weight of the match to the text path's prediction ([`dream_loss`]); `None`:
    /// [`DEFAULT_DISTILL_WEIGHT`].
    pub distill_weight: Option<f64>,
    /// Weight of the generation objective; `None`: 1 (0: understanding alone, the control).
    pub generation_weight: Option<f64>,
    /// Weight of the per-token match of generation rows' prompts to the text encoder's
    /// tokens ([`dream_loss`]); `None`: [`DEFAULT_TOKEN_WEIGHT`].
    pub token_weight: Option<f64>,
    pub seed: u64,
    pub resume: bool,
    pub device: String,
    /// Data-parallel peers (`--devices`): each takes `1/devices` of every batch's generation
    /// and understanding rows. 1: plain one-device training.
    pub devices: usize,
    /// This process's rank of a multi-process group (`--peers`, `--rank`).
    pub network: Option<crate::parallel::NetworkSpec>,
    pub command: String,
    pub quiet: bool,
}

impl DreamFitArgs {
    /// A run from the generate run `init` on `data` into `out` with every stage default (see
    /// [`crate::stages::caption::FitArgs::new`]).
    pub fn new(init: impl Into<PathBuf>, data: Vec<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            init: init.into(),
            data,
            out: out.into(),
            steps: None,
            batch_size: None,
            lr: None,
            queries: None,
            understanding_weight: None,
            distill_weight: None,
            generation_weight: None,
            token_weight: None,
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

/// Summary of a finished dream run.
#[derive(Debug, Clone)]
pub struct DreamOutcome {
    pub steps_done: usize,
    pub final_loss: f64,
    pub final_diffusion_loss: f64,
    pub final_understanding_loss: f64,
    pub seconds: f64,
}

/// Where a dream row's target image is.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The sample's own image (a generation row).
    Sample(usize),
    /// The rendered target scene `k` of [`DreamRows::edit_pixels`].
    Edit(usize),
}

/// The dream stage's rows: generation rows first (one per sample), then edit rows.
pub struct DreamRows {
    /// Per row: the sample whose image the decoder reads, `None` for the blank image.
    pub source: Vec<Option<usize>>,
    /// Per row: `[BOS]` + the prompt's words (no EOS: the queries follow).
    pub prompt: Vec<Vec<u32>>,
    /// Per row: the edit kind of an edit row.
    pub kind: Vec<Option<EditKind>>,
    targets: Vec<Target>,
    /// Per row: `[BOS]` caption `[EOS]` of the image to draw (the teacher's prompt).
    target_caption: Vec<Vec<u32>>,
    /// CHW `[-1, 1]` renders of the edit rows' target scenes.
    edit_pixels: Vec<f32>,
    /// Generation rows (the first `generation` rows).
    pub generation: usize,
}

impl DreamRows {
    pub fn len(&self) -> usize {
        self.prompt.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompt.is_empty()
    }

    pub fn edits(&self) -> usize {
        self.len() - self.generation
    }
}

/// `[BOS]` + `text`'s words, refused when a word is unknown to the tokenizer (an instruction
/// word the captioner's vocabulary lacks would reach the model as `[UNK]`).
pub fn prompt_ids(tokenizer: &Tokenizer, text: &str, max_len: usize) -> anyhow::Result<Vec<u32>> {
    let mut ids = encode_caption(tokenizer, text, max_len)?;
    ids.pop();
    if ids.contains(&UNK_ID) {
        anyhow::bail!(
            "{text:?} has words the run's tokenizer does not know; train the caption run on \
             folders written with --edits (their instructions join its vocabulary)"
        );
    }
    Ok(ids)
}

/// The dream rows of `dirs` (loaded as `samples`, in [`load_folders`] order).
pub fn load_dream_rows(
    dirs: &[PathBuf],
    samples: &[Sample],
    tokenizer: &Tokenizer,
    model: &ModelSpec,
) -> anyhow::Result<DreamRows> {
    let mut rows = DreamRows {
        source: Vec::new(),
        prompt: Vec::new(),
        kind: Vec::new(),
        targets: Vec::new(),
        target_caption: Vec::new(),
        edit_pixels: Vec::new(),
        generation: samples.len(),
    };
    for (i, s) in samples.iter().enumerate() {
        rows.source.push(None);
        rows.prompt.push(
            prompt_ids(tokenizer, &s.caption, model.max_len)
                .with_context(|| format!("the caption of {}", s.image_path.display()))?,
        );
        rows.kind.push(None);
        rows.targets.push(Target::Sample(i));
        rows.target_caption
            .push(encode_caption(tokenizer, &s.caption, model.max_len)?);
    }
    let index: HashMap<&Path, usize> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| (s.image_path.as_path(), i))
        .collect();
    for dir in dirs {
        let file = dir.join("edits.jsonl");
        for e in load_edits(dir)? {
            let image = *index.get(dir.join(&e.image).as_path()).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: edit of {} whose image was not loaded",
                    file.display(),
                    e.image
                )
            })?;
            let k = rows.edits();
            rows.source.push(Some(image));
            rows.prompt.push(
                prompt_ids(tokenizer, &e.instruction, model.max_len)
                    .with_context(|| format!("{}", file.display()))?,
            );
            rows.kind.push(Some(e.kind));
            rows.targets.push(Target::Edit(k));
            rows.target_caption.push(
                encode_caption(tokenizer, &objects_caption(&e.target), model.max_len)
                    .with_context(|| format!("{}", file.display()))?,
            );
            let target = render(&Scene::new(e.target), model.image_size as u32);
            rows.edit_pixels.extend(image_to_chw(&target));
        }
    }
    Ok(rows)
}

/// The black image every generation row (and text-to-image at inference) reads: "no image".
pub fn blank_pixels(image_size: usize) -> Vec<f32> {
    image_to_chw(&image::RgbImage::new(image_size as u32, image_size as u32))
}

/// Batch tensors of dream rows.
pub struct DreamBatch<B: Backend> {
    /// `[B, P]` `[BOS]` prompt `[PAD]…` and its 1/0 mask.
    pub prefix: Tensor<B, 2, Int>,
    pub prefix_mask: Tensor<B, 2>,
    /// `[B, C, S, S]` the images the decoder reads (blank for generation rows).
    pub sources: Tensor<B, 4>,
    /// `[B, C, S, S]` the images to draw.
    pub targets: Tensor<B, 4>,
    /// `[B, L]` `[BOS]` caption of the image to draw `[EOS]` `[PAD]…`, and its 1/0 mask.
    pub teacher: Tensor<B, 2, Int>,
    pub teacher_mask: Tensor<B, 2>,
    /// `[B, P]` the prompt positions whose conditioning token should equal the text
    /// encoder's token at the same position: a generation row's prompt is `[BOS]` + its
    /// caption, the teacher's prompt without `[EOS]`; edit rows have none.
    pub token_mask: Tensor<B, 2>,
}

impl DreamRows {
    /// The rows `part` of the batch `idx` (all of it: `0..idx.len()`), padded to the whole
    /// batch's longest prompt and caption, so a data-parallel peer's queries sit where one
    /// device's would.
    pub fn batch<B: Backend>(
        &self,
        data: &PreparedData,
        blank: &[f32],
        idx: &[usize],
        part: std::ops::Range<usize>,
        device: &B::Device,
    ) -> DreamBatch<B> {
        let s = data.image_size;
        let per = 3 * s * s;
        let p = idx.iter().map(|&r| self.prompt[r].len()).max().unwrap_or(1);
        let mut prefix = Vec::with_capacity(idx.len() * p);
        let mut mask = Vec::with_capacity(idx.len() * p);
        let mut sources = Vec::with_capacity(idx.len() * per);
        let mut targets = Vec::with_capacity(idx.len() * per);
        let lt = idx
            .iter()
            .map(|&r| self.target_caption[r].len())
            .max()
            .unwrap_or(2);
        let idx = &idx[part];
        let mut teacher = Vec::with_capacity(idx.len() * lt);
        let mut teacher_mask = Vec::with_capacity(idx.len() * lt);
        let mut token_mask = Vec::with_capacity(idx.len() * p);
        for &r in idx {
            let cap = &self.target_caption[r];
            teacher.extend(cap.iter().map(|&t| i64::from(t)));
            teacher.extend(std::iter::repeat_n(PAD_ID as i64, lt - cap.len()));
            teacher_mask.extend(std::iter::repeat_n(1.0f32, cap.len()));
            teacher_mask.extend(std::iter::repeat_n(0.0f32, lt - cap.len()));
            let ids = &self.prompt[r];
            prefix.extend(ids.iter().map(|&t| i64::from(t)));
            prefix.extend(std::iter::repeat_n(PAD_ID as i64, p - ids.len()));
            mask.extend(std::iter::repeat_n(1.0f32, ids.len()));
            mask.extend(std::iter::repeat_n(0.0f32, p - ids.len()));
            let generation = matches!(self.targets[r], Target::Sample(_));
            let matched = if generation { ids.len() } else { 0 };
            token_mask.extend(std::iter::repeat_n(1.0f32, matched));
            token_mask.extend(std::iter::repeat_n(0.0f32, p - matched));
            match self.source[r] {
                Some(i) => sources.extend_from_slice(&data.pixels[i * per..(i + 1) * per]),
                None => sources.extend_from_slice(blank),
            }
            match self.targets[r] {
                Target::Sample(i) => {
                    targets.extend_from_slice(&data.pixels[i * per..(i + 1) * per])
                }
                Target::Edit(k) => {
                    targets.extend_from_slice(&self.edit_pixels[k * per..(k + 1) * per])
                }
            }
        }
        let b = idx.len();
        DreamBatch {
            prefix: Tensor::from_data(TensorData::new(prefix, [b, p]), device),
            prefix_mask: Tensor::from_data(TensorData::new(mask, [b, p]), device),
            sources: Tensor::from_data(TensorData::new(sources, [b, 3, s, s]), device),
            targets: Tensor::from_data(TensorData::new(targets, [b, 3, s, s]), device),
            teacher: Tensor::from_data(TensorData::new(teacher, [b, lt]), device),
            teacher_mask: Tensor::from_data(TensorData::new(teacher_mask, [b, lt]), device),
            token_mask: Tensor::from_data(TensorData::new(token_mask, [b, p]), device),
        }
    }

    /// The rows of a step: half generation, half edit rows when there are edits, each side a
    /// seeded permutation per epoch (see [`batch_indices`]).
    pub fn step_rows(&self, batch: usize, step: usize, seed: u64) -> Vec<usize> {
        if self.edits() == 0 {
            return batch_indices(self.generation, batch, step, seed);
        }
        let half = batch / 2;
        let mut rows = batch_indices(self.generation, half, step, seed);
        rows.extend(
            batch_indices(self.edits(), batch - half, step, seed ^ 0xED17)
                .into_iter()
                .map(|k| self.generation + k),
        );
        rows
    }
}

/// Per-step rng of the forward process: a pure function of (seed, step), so a resumed run
/// draws what the uninterrupted one would.
fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0xD8EA_u64.wrapping_mul(step as u64 + 1).rotate_left(23))
}

/// The frozen parts and settings of [`dream_loss`].
pub struct DreamLossInputs<'a, B: AutodiffBackend> {
    pub cfg: &'a ModelSpec,
    pub settings: &'a DiffusionSettings,
    pub schedule: &'a NoiseSchedule,
    /// The frozen denoiser the gradient flows through to the queries.
    pub denoiser: &'a Denoiser<B>,
    /// The same denoiser outside autodiff, for the teacher's prediction.
    pub teacher: &'a Denoiser<B::InnerBackend>,
    pub distill_weight: f64,
    /// Weight of the per-token match ([`dream_loss`]).
    pub token_weight: f64,
}

/// The frozen text path's view of a batch: the text encoder's tokens of each target's caption
/// `[B, L, D]` with their key mask, and which prompt positions should equal them
/// ([`DreamBatch::token_mask`], `[B, P]`).
pub struct TeacherTokens<B: Backend> {
    pub tokens: Tensor<B, 3>,
    pub mask: Tensor<B, 2>,
    pub token_mask: Tensor<B, 2>,
}

/// The dream stage's generation loss on clean targets `x0` `[B, C, S, S]` under the dream
/// conditioning `cond` `[B, P + K, D]` with its key mask: the diffusion loss (MSE to the v/ε target at a uniformly
/// drawn timestep) plus `distill_weight` × the MSE to the frozen denoiser's own prediction on
/// the same noisy input under the text encoder's tokens of the target's caption (`teacher`:
/// tokens `[B, L, D]` and mask). The noisy target of the plain loss is mostly noise; the
/// teacher's prediction is what the text path would draw, a far less noisy signal for the few
/// new parameters to follow; beside it, the mean of the queries' tokens is pulled to the mean
/// of the caption's (what the denoiser's modulation reads). With `token_weight` > 0, each
/// generation row's prompt positions are also pulled to the text encoder's tokens of the same
/// caption, position by position: the most direct form of "condition like the text path".
///
/// `x0` holds rows `rows` of a batch of `batch` (all of them with [`Peer::ALONE`]): every
/// term sums over these rows and divides by the whole batch's size (or marked-token count,
/// summed across `peer`s), so the peers' losses add up to the one-device loss.
#[allow(clippy::too_many_arguments)]
pub fn dream_loss<B: AutodiffBackend>(
    p: &DreamLossInputs<'_, B>,
    x0: Tensor<B, 4>,
    (cond, cond_mask): (Tensor<B, 3>, Tensor<B, 2>),
    teacher: TeacherTokens<B::InnerBackend>,
    (batch, rows): (usize, std::ops::Range<usize>),
    peer: &Peer,
    rng: &mut ChaCha8Rng,
    device: &B::Device,
) -> Result<DreamLoss<B>, ParallelError> {
    let [_, c, side, _] = x0.dims();
    let Noised {
        xt,
        timesteps: tt,
        target,
        ..
    } = noise_images_part(
        p.schedule,
        p.settings.prediction,
        x0,
        batch,
        rows,
        rng,
        device,
    );
    let pred = p.denoiser.forward(
        p.cfg,
        xt.clone(),
        tt.clone(),
        cond.clone(),
        cond_mask.clone(),
    );
    let mse = |x: Tensor<B, 4>, y: Tensor<B, 4>| {
        (x - y)
            .powi_scalar(2)
            .sum()
            .div_scalar((batch * c * side * side) as f64)
    };
    let diffusion = mse(pred.clone(), target);
    let TeacherTokens {
        tokens,
        mask,
        token_mask,
    } = teacher;
    let (objective, token_mse) = if p.token_weight > 0.0 {
        let t = token_match(cond.clone(), tokens.clone(), token_mask, peer, device)?;
        let v = peer.sum::<B>(t.clone().into_scalar().elem::<f64>(), device)?;
        (diffusion.clone() + t.mul_scalar(p.token_weight), Some(v))
    } else {
        (diffusion.clone(), None)
    };
    if p.distill_weight == 0.0 {
        return Ok(DreamLoss {
            objective,
            diffusion,
            teacher_mse: None,
            pool_mse: None,
            token_mse,
        });
    }
    // The pooled conditioning the denoiser's adaptive LayerNorms read (its `text_pool`): the
    // mean of the queries' tokens should be the mean of the caption's.
    let pooled = Tensor::<B, 2>::from_inner(masked_mean(tokens.clone(), mask.clone()));
    let width = pooled.dims()[1];
    let pool = (masked_mean(cond, cond_mask) - pooled)
        .powi_scalar(2)
        .sum()
        .div_scalar((batch * width) as f64);
    let want = p
        .teacher
        .forward(p.cfg, xt.inner(), tt.inner(), tokens, mask);
    let matched = mse(pred, Tensor::from_inner(want));
    let parts = [
        peer.sum::<B>(matched.clone().into_scalar().elem::<f64>(), device)?,
        peer.sum::<B>(pool.clone().into_scalar().elem::<f64>(), device)?,
    ];
    Ok(DreamLoss {
        objective: objective + (matched + pool).mul_scalar(p.distill_weight),
        diffusion,
        teacher_mse: Some(parts[0]),
        pool_mse: Some(parts[1]),
        token_mse,
    })
}

/// Mean squared difference between the conditioning `cond` `[B, P + K, D]` and the teacher's
/// tokens `[B, L, D]` over the positions `token_mask` `[B, P]` marks (all within both): over
/// every peer's marked positions, when the rows are a data-parallel peer's share.
fn token_match<B: AutodiffBackend>(
    cond: Tensor<B, 3>,
    tokens: Tensor<B::InnerBackend, 3>,
    token_mask: Tensor<B::InnerBackend, 2>,
    peer: &Peer,
    device: &B::Device,
) -> Result<Tensor<B, 1>, ParallelError> {
    let [b, p] = token_mask.dims();
    let [_, l, d] = tokens.dims();
    // Marked positions are a generation row's prompt, one shorter than its teacher caption,
    // so `m` covers them all even when an edit row's instruction makes `p` the larger.
    let m = p.min(l);
    let mask = token_mask.slice([0..b, 0..m]);
    let count = peer.sum::<B>(mask.clone().sum().into_scalar().elem::<f64>(), device)?;
    let want = Tensor::<B, 3>::from_inner(tokens.slice([0..b, 0..m, 0..d]));
    let weight = Tensor::<B, 3>::from_inner(mask.reshape([b, m, 1]));
    Ok(
        ((cond.slice([0..b, 0..m, 0..d]) - want).powi_scalar(2) * weight)
            .sum()
            .div_scalar((count * d as f64).max(1.0)),
    )
}

/// [`dream_loss`]'s value and its parts (for the metrics log).
pub struct DreamLoss<B: AutodiffBackend> {
    /// What is optimised.
    pub objective: Tensor<B, 1>,
    /// The plain diffusion loss (comparable with the generate stage's).
    pub diffusion: Tensor<B, 1>,
    /// MSE to the teacher's prediction, and of the pooled conditioning to the caption's
    /// (`None` with `distill_weight` 0).
    pub teacher_mse: Option<f64>,
    pub pool_mse: Option<f64>,
    /// MSE of the generation rows' prompt tokens to the text encoder's (`None` with
    /// `token_weight` 0).
    pub token_mse: Option<f64>,
}

/// Image tokens of the frozen vision encoder, as a constant of the autodiff graph.
fn image_tokens<B: AutodiffBackend>(
    vision: &VisionEncoder<B::InnerBackend>,
    pixels: Tensor<B::InnerBackend, 4>,
) -> Tensor<B, 3> {
    Tensor::from_inner(vision.forward(pixels).patch_tokens)
}

/// Trains the dream stage; see the module docs.
pub fn fit_dream<B: AutodiffBackend>(
    args: &DreamFitArgs,
    device: &B::Device,
) -> anyhow::Result<DreamOutcome> {
    fit_dream_on::<B>(args, &vec![device.clone(); args.devices])
}

/// Trains the dream stage data-parallel, one peer on each of `devices` (`args.devices` is not
/// read).
pub fn fit_dream_on<B: AutodiffBackend>(
    args: &DreamFitArgs,
    devices: &[B::Device],
) -> anyhow::Result<DreamOutcome> {
    let run = &args.out;
    let config_path = run.join(CONFIG_FILE);
    let (mut cfg, state) = if args.resume && run.join(STATE_FILE).exists() {
        let mut cfg: DreamTrainConfig = read_json(&config_path)?;
        if let Some(s) = args.steps {
            cfg.run.steps = s;
        }
        if args
            .queries
            .is_some_and(|k| k != cfg.run.model.dream_queries)
        {
            anyhow::bail!(
                "--dream-queries differs from the run being resumed ({}); a resumed run keeps \
                 its queries",
                cfg.run.model.dream_queries
            );
        }
        let state: TrainState = read_json(&run.join(STATE_FILE))?;
        tracing::info!(step = state.step, "resuming from {}", run.display());
        (cfg, Some(state))
    } else {
        let init: GenerateTrainConfig = read_json(&args.init.join(CONFIG_FILE)).map_err(|e| {
            anyhow::anyhow!("--init {} is not a generate run: {e}", args.init.display())
        })?;
        if !matches!(init.stage, Stage::Generate | Stage::Unify) {
            anyhow::bail!(
                "--init {} is a '{}' run; the dream stage starts from a generate run",
                args.init.display(),
                init.stage
            );
        }
        let (steps, batch, lr, queries) = DreamTrainConfig::for_preset(init.preset);
        let cfg = DreamTrainConfig {
            run: GenerateTrainConfig {
                stage: Stage::Dream,
                model: ModelSpec {
                    dream_queries: args.queries.unwrap_or(queries),
                    ..init.model.clone()
                },
                init: args.init.clone(),
                data: args.data.clone(),
                steps: args.steps.unwrap_or(steps),
                batch_size: args.batch_size.unwrap_or(batch),
                lr: args.lr.unwrap_or(lr),
                warmup_steps: 50,
                // The stage's own, not its init's: an imported run records none it trained
                // with, and a clip norm of 0 would stop every update.
                weight_decay: duet_run::WEIGHT_DECAY,
                grad_clip: duet_run::GRAD_CLIP,
                seed: args.seed,
                checkpoint_every: 200,
                log_every: 10,
                device: args.device.clone(),
                command: args.command.clone(),
                ..init
            },
            understanding_weight: args.understanding_weight.unwrap_or(1.0),
            distill_weight: args.distill_weight.unwrap_or(DEFAULT_DISTILL_WEIGHT),
            generation_weight: args.generation_weight.unwrap_or(1.0),
            token_weight: args.token_weight.unwrap_or(DEFAULT_TOKEN_WEIGHT),
            questions: 0,
        };
        (cfg, None)
    };
    let model_spec = &cfg.run.model;
    model_spec.validate().map_err(anyhow::Error::msg)?;
    if model_spec.dream_queries == 0 {
        anyhow::bail!("--dream-queries must be at least 1");
    }
    for (flag, weight) in [
        ("--distill-weight", cfg.distill_weight),
        ("--understanding-weight", cfg.understanding_weight),
        ("--generation-weight", cfg.generation_weight),
        ("--token-weight", cfg.token_weight),
    ] {
        if !(weight.is_finite() && weight >= 0.0) {
            anyhow::bail!("{flag} must be a number >= 0, got {weight}");
        }
    }
    if cfg.generation_weight == 0.0 && cfg.understanding_weight == 0.0 {
        anyhow::bail!(
            "--generation-weight and --understanding-weight are both 0: nothing would train"
        );
    }
    if !(cfg.run.grad_clip.is_finite() && cfg.run.grad_clip > 0.0) {
        anyhow::bail!(
            "the gradient clip norm is {}: it must be above 0 (0 would stop every update)",
            cfg.run.grad_clip
        );
    }
    if cfg.run.batch_size < 2 {
        anyhow::bail!("--batch-size must be at least 2 (half generation, half edit rows)");
    }
    let network = args.network.as_ref();
    crate::parallel::check(
        crate::parallel::group_size(devices.len(), network)?,
        cfg.run.batch_size,
    )?;
    let init = &cfg.run.init;
    let tokenizer = load_tokenizer(&init.join(TOKENIZER_FILE))?;
    let samples = load_folders(
        &cfg.run.data,
        &ImageTarget::of(model_spec, Some(&tokenizer)),
    )
    .with_context(|| format!("the captioner in {}", init.display()))?;
    let rows = load_dream_rows(&cfg.run.data, &samples, &tokenizer, model_spec)?;
    let unknown = duet_datasets::tokenizer::unknown_words(
        &tokenizer,
        &crate::vocab::folder_texts(&cfg.run.data)?,
    )?;
    if !unknown.is_empty() {
        let shown: Vec<String> = unknown
            .iter()
            .take(10)
            .map(|(w, n)| format!("{w} ({n})"))
            .collect();
        tracing::warn!(
            "{} distinct words of the captions, questions and instructions are not in the \
             tokenizer of {} and train as [UNK]: {} (`duet-train extend-vocab --run {} --data …` \
             makes a run that knows them)",
            unknown.len(),
            init.display(),
            shown.join(", "),
            init.display()
        );
    }
    let questions = load_question_rows(&cfg.run.data, &samples)?;
    if state.is_none() && cfg.understanding_weight > 0.0 {
        cfg.questions = questions.len();
    }
    let data = prepare_with_questions(
        &samples,
        &questions,
        &tokenizer,
        model_spec.image_size,
        model_spec.max_len,
    )?;
    let init_weights = load_weights(&init.join(WEIGHTS_FILE))?;
    let frozen = with_prefixes(&init_weights, &["vision", "text", "denoiser"]);
    let digest = || -> anyhow::Result<[u8; 32]> {
        // What must match across processes: the settings (not where each keeps its files or
        // which device it names), the tokenizer, the starting weights, the prepared rows and
        // the checkpoint being resumed.
        let mut weights = Vec::new();
        for (name, t) in &init_weights {
            weights.extend_from_slice(name.as_bytes());
            weights.extend(t.data.iter().flat_map(|x| x.to_le_bytes()));
        }
        Ok(crate::parallel::digest_of(&[
            &crate::parallel::settings_bytes(&cfg)?,
            tokenizer
                .to_string(false)
                .map_err(anyhow::Error::msg)?
                .as_bytes(),
            &weights,
            &data.digest(),
            &serde_json::to_vec(&rows.prompt)?,
            &serde_json::to_vec(&state)?,
        ]))
    };
    let group = crate::parallel::Group::<B>::join(devices, network, digest)?;
    if crate::parallel::writes_run(network) {
        begin_run(run, state.is_none(), Some(&tokenizer), &cfg)?;
    }
    let inputs = DreamInputs {
        args,
        cfg: &cfg,
        data: &data,
        rows: &rows,
        init_weights: &init_weights,
        frozen: &frozen,
    };
    group
        .run(|peer, device| dream_peer::<B>(&inputs, state.clone(), &peer, device))
        .map_err(crate::parallel::with_resume_hint)
}

/// What every peer of a dream run reads.
struct DreamInputs<'a> {
    args: &'a DreamFitArgs,
    cfg: &'a DreamTrainConfig,
    data: &'a PreparedData,
    rows: &'a DreamRows,
    init_weights: &'a NamedTensors,
    /// The generate run's frozen tensors, carried into every checkpoint.
    frozen: &'a NamedTensors,
}

/// The dream training loop of one data-parallel peer: the same model, optimizer and batches
/// on every peer, each computing its share of the generation and understanding rows; the
/// leader writes checkpoints, metrics and progress.
fn dream_peer<B: AutodiffBackend>(
    inputs: &DreamInputs<'_>,
    mut state: Option<TrainState>,
    peer: &Peer,
    device: &B::Device,
) -> anyhow::Result<DreamOutcome> {
    let DreamInputs {
        args,
        cfg,
        data,
        rows,
        init_weights,
        frozen,
    } = *inputs;
    let run = &args.out;
    let init = &cfg.run.init;
    let model_spec = &cfg.run.model;
    let leader = peer.is_leader();
    let vision = load_named_tensors(
        VisionEncoder::<B::InnerBackend>::new(model_spec, device),
        &under(init_weights, "vision"),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", init.display()))?;
    let denoiser = load_generator_weights::<B>(init, model_spec, device)?
        .denoiser
        .no_grad();
    // The text path on the target's caption: the teacher whose predictions the dream path
    // learns to match.
    let teacher = load_generator_weights::<B::InnerBackend>(init, model_spec, device)?;

    let schedule = NoiseSchedule::cosine(cfg.run.diffusion.train_timesteps)?;
    let mut model = seeded(device, cfg.run.seed, || {
        DreamModel::<B>::new(model_spec, device)
    });
    model.decoder = load_named_tensors(
        CaptionDecoder::<B>::new(model_spec, device),
        &under(init_weights, "decoder"),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", init.display()))?;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.run.weight_decay)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(
            cfg.run.grad_clip,
        )))
        .init::<B, DreamModel<B>>();
    let start_step = match &state {
        Some(s) => {
            (model, optim) = load_records(run, model, optim, device)?;
            s.step
        }
        None => 0,
    };
    peer.agree_on_start(&model, start_step)?;
    let blank = blank_pixels(model_spec.image_size);

    let pb = duet_datasets::progress::stage_bar(args.quiet || !leader, cfg.run.steps, "dream");
    pb.set_position(start_step as u64);
    let mut metrics = peer.metrics_log(run)?;
    let t0 = Instant::now();
    let mut last_loss = state.as_ref().map(|s| s.last_loss).unwrap_or(f64::NAN);
    let (mut last_diffusion, mut last_understanding) = (f64::NAN, f64::NAN);
    let mut ema: Option<f64> = None;
    for step in start_step..cfg.run.steps {
        let seed = cfg.run.seed;
        // The generation objective (skipped at weight 0: the understanding-only control).
        let generation_on = cfg.generation_weight > 0.0;
        let generation = if generation_on {
            let idx = rows.step_rows(cfg.run.batch_size, step, seed);
            let mine = peer.shard_range(idx.len());
            let batch = rows.batch::<B::InnerBackend>(data, &blank, &idx, mine.clone(), device);
            let prefix_mask = Tensor::from_inner(batch.prefix_mask);
            let cond = model.condition(
                Tensor::from_inner(batch.prefix),
                prefix_mask.clone(),
                image_tokens::<B>(&vision, batch.sources),
            );
            let cond_mask = dream_mask(prefix_mask, model_spec.dream_queries);
            let mut rng = step_rng(seed, step);
            let teacher_tokens = teacher
                .text
                .forward(batch.teacher, batch.teacher_mask.clone())
                .tokens;
            Some(dream_loss(
                &DreamLossInputs {
                    cfg: model_spec,
                    settings: &cfg.run.diffusion,
                    schedule: &schedule,
                    denoiser: &denoiser,
                    teacher: &teacher.denoiser,
                    distill_weight: cfg.distill_weight,
                    token_weight: cfg.token_weight,
                },
                Tensor::from_inner(batch.targets),
                (cond, cond_mask),
                TeacherTokens {
                    tokens: teacher_tokens,
                    mask: batch.teacher_mask,
                    token_mask: batch.token_mask,
                },
                (idx.len(), mine),
                peer,
                &mut rng,
                device,
            )?)
        } else {
            None
        };
        let understanding = (cfg.understanding_weight > 0.0).then(|| {
            let rows_u = batch_indices(data.rows(), cfg.run.batch_size, step, seed ^ 0x0DE5);
            // The shard's summed NLL over the whole batch's target count.
            let count = data.target_count(&rows_u).max(1) as f64;
            let rows_u = peer.shard(&rows_u);
            let images: Vec<usize> = rows_u.iter().map(|&r| data.image_of[r]).collect();
            let tokens = image_tokens::<B>(&vision, data.pixels_batch(&images, device));
            let (nll, _) = decoder_nll(
                &model.decoder,
                tokens,
                data.tokens_batch(rows_u, device),
                data.targets_batch(rows_u, device),
            );
            nll.div_scalar(count)
        });
        let (teacher_mse, pool_mse, token_mse) =
            generation.as_ref().map_or((None, None, None), |g| {
                (g.teacher_mse, g.pool_mse, g.token_mse)
            });
        let diffusion_value = match &generation {
            Some(g) => peer.sum::<B>(g.diffusion.clone().into_scalar().elem::<f64>(), device)?,
            None => f64::NAN,
        };
        let understanding_value = match &understanding {
            Some(u) => peer.sum::<B>(u.clone().into_scalar().elem::<f64>(), device)?,
            None => f64::NAN,
        };
        // At least one part is present: both weights 0 was refused above.
        let loss = match (generation, understanding) {
            (Some(g), Some(u)) => {
                g.objective.mul_scalar(cfg.generation_weight)
                    + u.mul_scalar(cfg.understanding_weight)
            }
            (Some(g), None) => g.objective.mul_scalar(cfg.generation_weight),
            (None, Some(u)) => u.mul_scalar(cfg.understanding_weight),
            (None, None) => anyhow::bail!("both loss weights are 0: nothing to train"),
        };
        let loss_value = peer.sum::<B>(loss.clone().into_scalar().elem::<f64>(), device)?;
        if !loss_value.is_finite() {
            anyhow::bail!("loss became {loss_value} at step {step}; lower --lr");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let grads = peer.sum_gradients(&model, grads)?;
        let lr = warmup_cosine_lr(cfg.run.lr, cfg.run.warmup_steps, cfg.run.steps, step);
        model = optim.step(lr, model, grads);
        last_loss = loss_value;
        last_diffusion = diffusion_value;
        last_understanding = understanding_value;
        let e = ema.map_or(diffusion_value, |e| 0.95 * e + 0.05 * diffusion_value);
        ema = Some(e);
        pb.set_position(step as u64 + 1);
        pb.set_message(if generation_on {
            format!("diffusion {e:.3}")
        } else {
            format!("understanding {understanding_value:.3}")
        });
        let Some(metrics) = metrics.as_mut() else {
            continue;
        };
        if (step + 1) % cfg.run.log_every == 0 || step + 1 == cfg.run.steps {
            let line = serde_json::json!({
                "step": step + 1, "loss": loss_value, "diffusion_loss": diffusion_value,
                "diffusion_loss_ema": e, "understanding_loss": understanding_value,
                "teacher_mse": teacher_mse, "pool_mse": pool_mse, "token_mse": token_mse, "lr": lr,
                "elapsed_s": t0.elapsed().as_secs_f64(),
            });
            writeln!(metrics, "{line}")?;
        }
        if (step + 1) % cfg.run.checkpoint_every == 0 || step + 1 == cfg.run.steps {
            let saved = TrainState {
                step: step + 1,
                seed,
                last_loss,
            };
            save_checkpoint(run, &model, None, frozen, &optim, &saved)?;
            state = Some(saved);
        }
    }
    pb.finish_and_clear();
    if leader && state.is_none() {
        let saved = TrainState {
            step: start_step,
            seed: cfg.run.seed,
            last_loss,
        };
        save_checkpoint(run, &model, None, frozen, &optim, &saved)?;
    }
    Ok(DreamOutcome {
        steps_done: cfg.run.steps,
        final_loss: last_loss,
        final_diffusion_loss: last_diffusion,
        final_understanding_loss: last_understanding,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;

    type Inner = <CpuBackend as AutodiffBackend>::InnerBackend;

    #[test]
    fn token_match_averages_over_the_marked_positions_only() {
        let dev = Default::default();
        // Two rows, P = 3 prompt positions + K = 1 query, D = 2; the teacher has L = 4.
        let teacher = Tensor::<Inner, 3>::zeros([2, 4, 2], &dev);
        let mut cond = vec![0.0f32; 2 * 4 * 2];
        // Row 0, position 1: off by (1, 1) — marked. Row 1, position 0: off by 5 — unmarked
        // (an edit row). The query position of row 0 is off by 9 — never matched.
        cond[2..4].copy_from_slice(&[1.0, 1.0]);
        cond[8] = 5.0;
        cond[6] = 9.0;
        let cond = Tensor::<CpuBackend, 3>::from_data(TensorData::new(cond, [2, 4, 2]), &dev);
        let mask = Tensor::<Inner, 2>::from_data(
            TensorData::new(vec![1.0f32, 1.0, 0.0, 0.0, 0.0, 0.0], [2, 3]),
            &dev,
        );
        let got = token_match::<CpuBackend>(cond, teacher, mask, &Peer::ALONE, &dev)
            .unwrap()
            .into_scalar()
            .elem::<f64>();
        // (1² + 1²) over 2 marked positions × 2 dims.
        assert!((got - 0.5).abs() < 1e-6, "{got}");
    }
}

//! The caption stage: trains the vision encoder and the caption decoder together with
//! teacher-forced cross-entropy on ShapeWorld captions.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use duet_models::init::seeded;
use duet_models::params::{named_tensors, NamedTensors};
use duet_models::tokens::{BOS_ID, EOS_ID, PAD_ID};
use duet_models::{CaptionDecoder, CaptionModel, ImageFit, ModelSpec, Preset};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::parallel::Peer;
use duet_datasets::folders::{default_image_side, load_folders, ImageTarget};
use duet_datasets::image_to_chw;
use duet_datasets::shapeworld::{load_edits, load_questions, QuestionKind, Sample};
use duet_datasets::tokenizer::{
    decode_caption, encode_caption, load_tokenizer, save_tokenizer, train_tokenizer,
};
use duet_fsio::write_atomic_creating_dir as write_atomic;
use duet_run::checkpoint::{
    read_json, save_weights, write_json, TrainState, OPTIMIZER_FILE, STATE_FILE, WEIGHTS_FILE,
};
use duet_run::{
    CaptionTrainConfig, LoadedRun, TokenizerOrigin, CONFIG_FILE, METRICS_FILE, MODEL_RECORD_FILE,
    TOKENIZER_FILE,
};

type Rec = BinBytesRecorder<FullPrecisionSettings>;

/// Images and padded token sequences in memory, ready to batch. A row is a caption of image
/// `row`, or (after the `n` caption rows) a question about an image with its answer.
pub struct PreparedData {
    /// Images (and caption rows).
    pub n: usize,
    pub image_size: usize,
    /// `n * 3 * S * S`, normalised to `[-1, 1]`, CHW per image.
    pub pixels: Vec<f32>,
    /// `rows * seq_len`, `[BOS] … [EOS] [PAD]…`.
    pub tokens: Vec<i64>,
    /// `rows * (seq_len - 1)`: the next-token targets, PAD where no loss is taken (padding,
    /// and a question's own words: the model learns to answer, not to ask).
    pub targets: Vec<i64>,
    /// The image of each row.
    pub image_of: Vec<usize>,
    pub seq_len: usize,
}

impl PreparedData {
    /// A digest of every prepared value (for peers in other processes to check that they
    /// prepared the same rows).
    pub fn digest(&self) -> [u8; 32] {
        let ints = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let floats = self
            .pixels
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>();
        let images: Vec<i64> = self.image_of.iter().map(|&i| i as i64).collect();
        crate::parallel::digest_of(&[
            &(self.n as u64).to_le_bytes(),
            &(self.image_size as u64).to_le_bytes(),
            &(self.seq_len as u64).to_le_bytes(),
            &floats,
            &ints(&self.tokens),
            &ints(&self.targets),
            &ints(&images),
        ])
    }
}

/// A question about image `image` (an index into the samples) with its answer: one training
/// row `[BOS] question answer [EOS]` with the loss on the answer and EOS only.
#[derive(Debug, Clone)]
pub struct QuestionRow {
    pub image: usize,
    pub kind: QuestionKind,
    pub question: String,
    pub answer: String,
}

/// The questions of every folder that has a `questions.jsonl`, tied to the loaded samples by
/// image path (the folders as [`load_folders`] read them, in the same order).
pub fn load_question_rows(
    dirs: &[PathBuf],
    samples: &[Sample],
) -> anyhow::Result<Vec<QuestionRow>> {
    let index: std::collections::HashMap<&Path, usize> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| (s.image_path.as_path(), i))
        .collect();
    let mut rows = Vec::new();
    for dir in dirs {
        for q in load_questions(dir)? {
            let path = dir.join(&q.image);
            let image = *index.get(path.as_path()).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: question about {} whose image was not loaded",
                    dir.join("questions.jsonl").display(),
                    q.image
                )
            })?;
            rows.push(QuestionRow {
                image,
                kind: q.kind,
                question: q.question,
                answer: q.answer,
            });
        }
    }
    Ok(rows)
}

pub fn prepare(
    samples: &[Sample],
    tokenizer: &Tokenizer,
    image_size: usize,
    max_len: usize,
) -> anyhow::Result<PreparedData> {
    prepare_with_questions(samples, &[], tokenizer, image_size, max_len)
}

/// [`prepare`] with question rows after the caption rows.
pub fn prepare_with_questions(
    samples: &[Sample],
    questions: &[QuestionRow],
    tokenizer: &Tokenizer,
    image_size: usize,
    max_len: usize,
) -> anyhow::Result<PreparedData> {
    let mut pixels = Vec::with_capacity(samples.len() * 3 * image_size * image_size);
    // (ids, tokens of the sequence that take no loss: BOS and a question's words)
    let mut seqs: Vec<(Vec<u32>, usize)> = Vec::with_capacity(samples.len() + questions.len());
    for s in samples {
        let (w, h) = s.image.dimensions();
        if w as usize != image_size || h as usize != image_size {
            anyhow::bail!(
                "{}: image is {w}x{h}, the model expects {image_size}x{image_size}",
                s.image_path.display()
            );
        }
        pixels.extend(image_to_chw(&s.image));
        seqs.push((encode_caption(tokenizer, &s.caption, max_len)?, 1));
    }
    let mut image_of: Vec<usize> = (0..samples.len()).collect();
    for q in questions {
        let text = format!("{} {}", q.question, q.answer);
        let ids = encode_caption(tokenizer, &text, max_len)
            .with_context(|| format!("question {:?} with its answer", q.question))?;
        let asked = encode_caption(tokenizer, &q.question, max_len)?.len() - 1;
        seqs.push((ids, asked));
        image_of.push(q.image);
    }
    let seq_len = seqs.iter().map(|s| s.0.len()).max().unwrap_or(2);
    let mut tokens = Vec::with_capacity(seqs.len() * seq_len);
    let mut targets = Vec::with_capacity(seqs.len() * (seq_len - 1));
    for (s, no_loss) in &seqs {
        tokens.extend(s.iter().map(|&t| t as i64));
        tokens.extend(std::iter::repeat_n(PAD_ID as i64, seq_len - s.len()));
        // Target j is token j + 1: the first `no_loss - 1` targets are the question's words.
        for j in 0..seq_len - 1 {
            let t = s.get(j + 1).copied().unwrap_or(PAD_ID);
            targets.push(if j + 1 < *no_loss {
                PAD_ID as i64
            } else {
                t as i64
            });
        }
    }
    Ok(PreparedData {
        n: samples.len(),
        image_size,
        pixels,
        tokens,
        targets,
        image_of,
        seq_len,
    })
}

impl PreparedData {
    /// Token rows: captions, then questions.
    pub fn rows(&self) -> usize {
        self.image_of.len()
    }

    pub fn pixels_batch<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 4> {
        let per = 3 * self.image_size * self.image_size;
        let mut data = Vec::with_capacity(idx.len() * per);
        for &i in idx {
            data.extend_from_slice(&self.pixels[i * per..(i + 1) * per]);
        }
        Tensor::from_data(
            TensorData::new(data, [idx.len(), 3, self.image_size, self.image_size]),
            device,
        )
    }

    pub fn tokens_batch<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 2, Int> {
        let mut data = Vec::with_capacity(idx.len() * self.seq_len);
        for &i in idx {
            data.extend_from_slice(&self.tokens[i * self.seq_len..(i + 1) * self.seq_len]);
        }
        Tensor::from_data(TensorData::new(data, [idx.len(), self.seq_len]), device)
    }

    /// How many of the next-token targets of rows `idx` are not PAD (the loss's normaliser).
    pub fn target_count(&self, idx: &[usize]) -> usize {
        let l = self.seq_len - 1;
        idx.iter()
            .map(|&i| {
                self.targets[i * l..(i + 1) * l]
                    .iter()
                    .filter(|&&t| t != PAD_ID as i64)
                    .count()
            })
            .sum()
    }

    /// The next-token targets of rows `idx`, `[B, seq_len - 1]` (PAD: no loss).
    pub fn targets_batch<B: Backend>(
        &self,
        idx: &[usize],
        device: &B::Device,
    ) -> Tensor<B, 2, Int> {
        let l = self.seq_len - 1;
        let mut data = Vec::with_capacity(idx.len() * l);
        for &i in idx {
            data.extend_from_slice(&self.targets[i * l..(i + 1) * l]);
        }
        Tensor::from_data(TensorData::new(data, [idx.len(), l]), device)
    }
}

/// The captioner's summed next-token negative log-likelihood over the targets that are not PAD
/// (`targets` `[B, L - 1]`, see [`PreparedData::targets`]), and their count ([`decoder_nll`]
/// on the vision encoder's tokens).
pub fn caption_nll<B: Backend>(
    model: &CaptionModel<B>,
    pixels: Tensor<B, 4>,
    tokens: Tensor<B, 2, Int>,
    targets: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let image_tokens = model.vision.forward(pixels).patch_tokens;
    decoder_nll(&model.decoder, image_tokens, tokens, targets)
}

/// Mean next-token cross-entropy of the decoder over the targets that are not PAD, on image
/// tokens computed elsewhere (a frozen vision encoder's).
pub fn decoder_loss<B: Backend>(
    decoder: &CaptionDecoder<B>,
    image_tokens: Tensor<B, 3>,
    tokens: Tensor<B, 2, Int>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    let (nll, count) = decoder_nll(decoder, image_tokens, tokens, targets);
    nll / count.clamp_min(1.0)
}

/// The summed next-token negative log-likelihood over the targets that are not PAD, and their
/// count: the parts of [`decoder_loss`]. A data-parallel peer divides its shard's sum by the
/// whole batch's count, so the peers' losses add up to the one-device loss.
pub fn decoder_nll<B: Backend>(
    decoder: &CaptionDecoder<B>,
    image_tokens: Tensor<B, 3>,
    tokens: Tensor<B, 2, Int>,
    targets: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [b, l] = tokens.dims();
    let inputs = tokens.slice([0..b, 0..l - 1]);
    let targets = targets.reshape([b * (l - 1), 1]);
    let logits = decoder.forward(inputs, image_tokens);
    let v = logits.dims()[2];
    let logp = log_softmax(logits.reshape([b * (l - 1), v]), 1);
    let picked = logp.gather(1, targets.clone()).reshape([b * (l - 1)]);
    let mask = targets
        .not_equal_elem(PAD_ID as i64)
        .float()
        .reshape([b * (l - 1)]);
    let count = mask.clone().sum();
    ((picked * mask).sum().neg(), count)
}

/// The batch indices of a step: a fresh seeded permutation per epoch, so a resumed run sees
/// exactly the batches the uninterrupted run would have.
pub fn batch_indices(n: usize, batch: usize, step: usize, seed: u64) -> Vec<usize> {
    let per_epoch = (n / batch).max(1);
    let epoch = step / per_epoch;
    let k = step % per_epoch;
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    perm.shuffle(&mut rng);
    (0..batch).map(|i| perm[(k * batch + i) % n]).collect()
}

/// Options of `duet-train fit --stage caption`.
#[derive(Debug, Clone)]
pub struct FitArgs {
    pub preset: Preset,
    /// Training folders: ShapeWorld folders and Emoji-CLDR splits, in any mix.
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    pub seed: u64,
    pub resume: bool,
    /// Side of the model's square images (fresh runs; default: that of the first generated
    /// dataset in `data`, else [`DEFAULT_IMAGE_SIDE`]).
    pub image_size: Option<usize>,
    /// How images of other sizes or shapes are fitted (fresh runs; default
    /// [`DEFAULT_IMAGE_FIT`]).
    pub image_fit: Option<ImageFit>,
    /// A `tokenizer.json` to reuse (or a run or bundle folder holding one) instead of training
    /// one on the captions.
    pub tokenizer: Option<PathBuf>,
    /// Fine-tune: start from the captioner of this run (its weights, dimensions and
    /// tokenizer) instead of from scratch.
    pub init_from: Option<PathBuf>,
    pub device: String,
    /// Data-parallel peers (`--devices`, [`crate::parallel`]): each takes `1/devices` of every
    /// batch. 1: plain one-device training.
    pub devices: usize,
    /// This process's rank of a multi-process group (`--peers`, `--rank`); `None`: the
    /// peers, if any, are `devices` threads of this process.
    pub network: Option<crate::parallel::NetworkSpec>,
    pub command: String,
    pub quiet: bool,
}

impl FitArgs {
    /// A fresh run of `preset` on `data` into `out` with every stage default: seed 0, one CPU
    /// peer, progress shown, no command recorded. Callers set what they need with struct
    /// update syntax (`FitArgs { steps: Some(10), ..FitArgs::new(..) }`).
    pub fn new(preset: Preset, data: Vec<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            preset,
            data,
            out: out.into(),
            steps: None,
            batch_size: None,
            lr: None,
            seed: 0,
            resume: false,
            image_size: None,
            image_fit: None,
            tokenizer: None,
            init_from: None,
            device: "cpu".into(),
            devices: 1,
            network: None,
            command: String::new(),
            quiet: false,
        }
    }
}

/// Image side of a fresh run whose data has no generated dataset to take it from.
pub const DEFAULT_IMAGE_SIDE: usize = 32;
/// How a fresh run fits images of other shapes: padding keeps all of a photo.
pub const DEFAULT_IMAGE_FIT: ImageFit = ImageFit::Pad;

/// Summary of a finished (or resumed-and-finished) run.
#[derive(Debug, Clone)]
pub struct FitOutcome {
    pub steps_done: usize,
    pub final_loss: f64,
    pub seconds: f64,
}

/// Trains a captioner on `device`, data-parallel over `args.devices` peers there.
pub fn fit<B: AutodiffBackend>(args: &FitArgs, device: &B::Device) -> anyhow::Result<FitOutcome> {
    fit_on::<B>(args, &vec![device.clone(); args.devices])
}

/// Trains a captioner data-parallel, one peer on each of `devices` (`args.devices` is not
/// read).
pub fn fit_on<B: AutodiffBackend>(
    args: &FitArgs,
    devices: &[B::Device],
) -> anyhow::Result<FitOutcome> {
    let run = &args.out;
    let config_path = run.join(CONFIG_FILE);

    let (cfg, tokenizer, samples, questions, state) = if args.resume && config_path.exists() {
        let mut cfg: CaptionTrainConfig = read_json(&config_path)?;
        if let Some(s) = args.steps {
            cfg.steps = s;
        }
        let tok = load_tokenizer(&run.join(TOKENIZER_FILE))?;
        let samples = load_folders(&args.data, &ImageTarget::of(&cfg.model, Some(&tok)))?;
        let questions = load_question_rows(&args.data, &samples)?;
        if questions.len() != cfg.questions {
            anyhow::bail!(
                "{} has {} questions; the run was started with {}: resume on the same data",
                duet_datasets::folders::folders_display(&args.data),
                questions.len(),
                cfg.questions
            );
        }
        let state: TrainState = read_json(&run.join(STATE_FILE))?;
        tracing::info!(step = state.step, "resuming from {}", run.display());
        (cfg, tok, samples, questions, Some(state))
    } else {
        if args.resume {
            tracing::warn!(
                "--resume given but {} has no run yet; starting fresh",
                run.display()
            );
        }
        let fresh = fresh_start(args)?;
        let (steps, batch, lr) = CaptionTrainConfig::for_preset(fresh.preset);
        let cfg = CaptionTrainConfig {
            stage: duet_run::Stage::Caption,
            preset: fresh.preset,
            model: fresh.model,
            init_from: args.init_from.clone(),
            tokenizer: fresh.origin,
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
            questions: fresh.questions.len(),
        };
        (cfg, fresh.tokenizer, fresh.samples, fresh.questions, None)
    };
    if !questions.is_empty() {
        tracing::info!(
            "training on {} captions and {} questions",
            samples.len(),
            questions.len()
        );
    }
    cfg.model.validate().map_err(anyhow::Error::msg)?;
    let network = args.network.as_ref();
    crate::parallel::check(
        crate::parallel::group_size(devices.len(), network)?,
        cfg.batch_size,
    )?;
    let data = prepare_with_questions(
        &samples,
        &questions,
        &tokenizer,
        cfg.model.image_size,
        cfg.model.max_len,
    )?;
    let digest = || -> anyhow::Result<[u8; 32]> {
        // What must match across processes: the settings (not where each keeps its files or
        // which device it names), the tokenizer and the prepared rows.
        Ok(crate::parallel::digest_of(&[
            &crate::parallel::settings_bytes(&cfg)?,
            tokenizer
                .to_string(false)
                .map_err(anyhow::Error::msg)?
                .as_bytes(),
            &data.digest(),
            // The checkpoint being resumed, if any (its weights are compared once loaded).
            &serde_json::to_vec(&state)?,
        ]))
    };
    let group = crate::parallel::Group::<B>::join(devices, network, digest)?;
    if crate::parallel::writes_run(network) {
        // A resumed run keeps the tokenizer file it has.
        begin_run(
            run,
            state.is_none(),
            state.is_none().then_some(&tokenizer),
            &cfg,
        )?;
    }

    group
        .run(|peer, device| train_peer::<B>(args, &cfg, &data, state.clone(), peer, device))
        .map_err(crate::parallel::with_resume_hint)
}

/// Starts a run folder, once the run's data-parallel group has joined (never before, so a
/// refused folder, configuration or peer leaves no empty run behind): a fresh run starts a
/// fresh metrics log; the tokenizer (when given) and the configuration are written.
pub(crate) fn begin_run(
    run: &Path,
    fresh: bool,
    tokenizer: Option<&Tokenizer>,
    config: &impl serde::Serialize,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(run)?;
    if fresh {
        let _ = std::fs::remove_file(run.join(METRICS_FILE));
    }
    if let Some(tokenizer) = tokenizer {
        save_tokenizer(tokenizer, &run.join(TOKENIZER_FILE))?;
    }
    write_json(&run.join(CONFIG_FILE), config)?;
    Ok(())
}

/// The caption training loop of one data-parallel peer (all of it on one device): the same
/// model, optimizer and batches on every peer, each computing the loss of its shard; the
/// leader writes checkpoints, metrics and progress.
fn train_peer<B: AutodiffBackend>(
    args: &FitArgs,
    cfg: &CaptionTrainConfig,
    data: &PreparedData,
    mut state: Option<TrainState>,
    peer: Peer,
    device: &B::Device,
) -> anyhow::Result<FitOutcome> {
    let run = &args.out;
    let mut model = seeded(device, cfg.seed, || {
        CaptionModel::<B>::new(&cfg.model, device)
    });
    if let (Some(from), None) = (&cfg.init_from, &state) {
        // Fine-tuning: the optimizer starts fresh, the weights from the source's captioner
        // (a resumed run has its own weights and need not find the source again).
        model = duet_run::load_captioner::<B>(from, &cfg.model, device)?;
        if peer.is_leader() {
            tracing::info!("starting from the captioner of {}", from.display());
        }
    }
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(
            cfg.grad_clip,
        )))
        .init::<B, CaptionModel<B>>();
    let start_step = match &state {
        Some(s) => {
            (model, optim) = load_records(run, model, optim, device)?;
            s.step
        }
        None => 0,
    };
    peer.agree_on_start(&model, start_step)?;

    let leader = peer.is_leader();
    let pb = duet_datasets::progress::stage_bar(args.quiet || !leader, cfg.steps, "caption");
    pb.set_position(start_step as u64);
    let mut metrics = peer.metrics_log(run)?;
    let t0 = Instant::now();
    let mut last_loss = state.as_ref().map(|s| s.last_loss).unwrap_or(f64::NAN);
    let mut ema: Option<f64> = None;
    for step in start_step..cfg.steps {
        let batch = batch_indices(data.rows(), cfg.batch_size, step, cfg.seed);
        // Every peer's loss is its shard's sum over the whole batch's target count, so the
        // peers' losses (and gradients) add up to the one-device loss.
        let count = data.target_count(&batch).max(1) as f64;
        let idx = peer.shard(&batch);
        let images: Vec<usize> = idx.iter().map(|&r| data.image_of[r]).collect();
        let pixels = data.pixels_batch::<B>(&images, device);
        let tokens = data.tokens_batch::<B>(idx, device);
        let targets = data.targets_batch::<B>(idx, device);
        let (nll, _) = caption_nll(&model, pixels, tokens, targets);
        let loss = nll.div_scalar(count);
        let loss_value = peer.sum::<B>(loss.clone().into_scalar().elem::<f64>(), device)?;
        if !loss_value.is_finite() {
            anyhow::bail!("loss became {loss_value} at step {step}; lower --lr");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let grads = peer.sum_gradients(&model, grads)?;
        let lr = cfg.lr_at(step);
        model = optim.step(lr, model, grads);
        last_loss = loss_value;
        let e = ema.map_or(loss_value, |e| 0.95 * e + 0.05 * loss_value);
        ema = Some(e);
        pb.set_position(step as u64 + 1);
        pb.set_message(format!("loss {e:.3}"));
        let Some(metrics) = metrics.as_mut() else {
            continue;
        };
        if (step + 1) % cfg.log_every == 0 || step + 1 == cfg.steps {
            let line = serde_json::json!({
                "step": step + 1, "loss": loss_value, "loss_ema": e, "lr": lr,
                "elapsed_s": t0.elapsed().as_secs_f64(),
            });
            writeln!(metrics, "{line}")?;
        }
        if (step + 1) % cfg.checkpoint_every == 0 || step + 1 == cfg.steps {
            let saved = TrainState {
                step: step + 1,
                seed: cfg.seed,
                last_loss,
            };
            save_checkpoint(run, &model, None, &NamedTensors::new(), &optim, &saved)?;
            state = Some(saved);
        }
    }
    pb.finish_and_clear();
    if leader && state.is_none() {
        // Nothing to do (steps already reached): still make sure a checkpoint exists.
        let saved = TrainState {
            step: start_step,
            seed: cfg.seed,
            last_loss,
        };
        save_checkpoint(run, &model, None, &NamedTensors::new(), &optim, &saved)?;
    }
    Ok(FitOutcome {
        steps_done: cfg.steps,
        final_loss: last_loss,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What a fresh caption run starts from: its model, tokenizer and data.
struct FreshStart {
    preset: Preset,
    model: ModelSpec,
    tokenizer: Tokenizer,
    origin: TokenizerOrigin,
    samples: Vec<Sample>,
    questions: Vec<QuestionRow>,
}

/// The dimensions, tokenizer and fitted samples of a fresh run: those of the `--init-from`
/// run when fine-tuning (its tokenizer reused, so its embeddings keep their meaning), else
/// the preset's at the asked side with a tokenizer reused (`--tokenizer`) or trained on the
/// training captions.
fn fresh_start(args: &FitArgs) -> anyhow::Result<FreshStart> {
    if let Some(from) = &args.init_from {
        if args.image_size.is_some() || args.image_fit.is_some() || args.tokenizer.is_some() {
            anyhow::bail!(
                "--init-from {} fixes the image size, the image fit and the tokenizer (those \
                 of its model); drop --image-size, --image-fit and --tokenizer",
                from.display()
            );
        }
        let source: RunModel = read_json(&from.join(CONFIG_FILE)).with_context(|| {
            format!("--init-from {}: not a run with a captioner", from.display())
        })?;
        let (tokenizer, origin) = reuse_tokenizer(from)?;
        let samples = load_folders(
            &args.data,
            &ImageTarget::of(&source.model, Some(&tokenizer)),
        )?;
        report_unknown_words(&samples, &tokenizer, from);
        let questions = load_question_rows(&args.data, &samples)?;
        return Ok(FreshStart {
            preset: source.preset,
            model: source.model,
            tokenizer,
            origin,
            samples,
            questions,
        });
    }
    let side = match args.image_size {
        Some(side) => side,
        None => default_image_side(&args.data, DEFAULT_IMAGE_SIDE as u32)? as usize,
    };
    // Checked before any image is fitted to it: each one becomes side² pixels.
    if !(1..=duet_models::MAX_IMAGE_SIZE).contains(&side) {
        anyhow::bail!(
            "image size {side} must be from 1 to {} pixels",
            duet_models::MAX_IMAGE_SIZE
        );
    }
    let fit = args.image_fit.unwrap_or(DEFAULT_IMAGE_FIT);
    // The spec's vocabulary is known only once the tokenizer is: a placeholder until then.
    let mut model = ModelSpec {
        image_fit: fit,
        ..ModelSpec::preset(args.preset, 0, side)
    };
    let (tokenizer, origin, samples, questions) = match &args.tokenizer {
        Some(path) => {
            let (tokenizer, origin) = reuse_tokenizer(path)?;
            let samples = load_folders(&args.data, &ImageTarget::of(&model, Some(&tokenizer)))?;
            report_unknown_words(&samples, &tokenizer, path);
            let questions = load_question_rows(&args.data, &samples)?;
            (tokenizer, origin, samples, questions)
        }
        None => {
            let samples = load_folders(&args.data, &ImageTarget::of(&model, None))?;
            let questions = load_question_rows(&args.data, &samples)?;
            // The vocabulary covers the questions and answers, and the edit instructions a
            // later dream run on these folders reads, as well as the captions.
            let mut instructions = Vec::new();
            for dir in &args.data {
                instructions.extend(load_edits(dir)?.into_iter().map(|e| e.instruction));
            }
            let texts: Vec<String> = samples
                .iter()
                .map(|s| s.caption.clone())
                .chain(
                    questions
                        .iter()
                        .map(|q| format!("{} {}", q.question, q.answer)),
                )
                .chain(instructions)
                .collect();
            (
                train_tokenizer(&texts)?,
                TokenizerOrigin::Trained,
                samples,
                questions,
            )
        }
    };
    model.vocab_size = tokenizer.get_vocab_size(true);
    Ok(FreshStart {
        preset: args.preset,
        model,
        tokenizer,
        origin,
        samples,
        questions,
    })
}

/// The two fields every stage's `config.json` has that a fine-tune needs.
#[derive(serde::Deserialize)]
struct RunModel {
    preset: Preset,
    model: ModelSpec,
}

/// The tokenizer of `path` (a `tokenizer.json`, or a run or bundle folder holding one), loaded
/// from the bytes it was hashed from, with where it came from.
fn reuse_tokenizer(path: &Path) -> anyhow::Result<(Tokenizer, TokenizerOrigin)> {
    let reused = duet_datasets::tokenizer::reuse_tokenizer(path)?;
    tracing::info!(
        "reusing the tokenizer {} ({})",
        reused.file.display(),
        reused.sha256
    );
    Ok((
        reused.tokenizer,
        TokenizerOrigin::Reused {
            path: reused.file,
            sha256: reused.sha256,
        },
    ))
}

/// Logs the training captions' words a reused tokenizer lacks: they become `[UNK]`.
fn report_unknown_words(samples: &[Sample], tokenizer: &Tokenizer, from: &Path) {
    let mut unknown = std::collections::BTreeMap::<String, usize>::new();
    for s in samples {
        if let Ok(enc) = tokenizer.encode(s.caption.as_str(), false) {
            for (id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
                if *id == duet_models::tokens::UNK_ID {
                    // The token is `[UNK]`; the offsets give back the word that became it.
                    let word = s.caption.get(start..end).unwrap_or("?").to_lowercase();
                    *unknown.entry(word).or_default() += 1;
                }
            }
        }
    }
    if !unknown.is_empty() {
        let mut by_count: Vec<_> = unknown.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let shown: Vec<String> = by_count
            .iter()
            .take(10)
            .map(|(w, n)| format!("{w} ({n})"))
            .collect();
        tracing::warn!(
            "{} distinct caption words are not in the tokenizer of {} and train as [UNK]: {} \
             (`duet-train extend-vocab --run {} --data …` makes a run that knows them)",
            unknown.len(),
            from.display(),
            shown.join(", "),
            from.display()
        );
    }
}

/// Writes a resumable checkpoint: `model.safetensors` (the trained module's parameters — or
/// `published` in their place, e.g. their EMA — plus `frozen`, tensors carried over unchanged
/// from an earlier stage), the Burn records of the module and the optimizer (the raw weights
/// training resumes from), and `state.json` last — its presence marks the checkpoint complete.
pub fn save_checkpoint<B, M, O>(
    run: &Path,
    model: &M,
    published: Option<&NamedTensors>,
    frozen: &NamedTensors,
    optim: &O,
    state: &TrainState,
) -> anyhow::Result<()>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let mut weights = match published {
        Some(w) => w.clone(),
        None => named_tensors(&model.valid()),
    };
    for (name, tensor) in frozen {
        if weights.insert(name.clone(), tensor.clone()).is_some() {
            anyhow::bail!("parameter {name} is both trained and frozen");
        }
    }
    save_weights(&run.join(WEIGHTS_FILE), &weights)?;
    let rec = Rec::default().record(model.clone().into_record(), ())?;
    write_atomic(&run.join(MODEL_RECORD_FILE), &rec)?;
    let orec = Rec::default().record(optim.to_record(), ())?;
    write_atomic(&run.join(OPTIMIZER_FILE), &orec)?;
    write_json(&run.join(STATE_FILE), state)?;
    crate::curves::write_run_curves(run)?;
    Ok(())
}

/// Restores a module and its optimizer from the Burn records of a checkpoint (`--resume`).
pub fn load_records<B, M, O>(
    run: &Path,
    model: M,
    optim: O,
    device: &B::Device,
) -> anyhow::Result<(M, O)>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let rec = Rec::default().load(std::fs::read(run.join(MODEL_RECORD_FILE))?, device)?;
    let orec = Rec::default().load(std::fs::read(run.join(OPTIMIZER_FILE))?, device)?;
    Ok((model.load_record(rec), optim.load_record(orec)))
}

/// Greedy captions for a set of samples, in batches.
pub fn caption_samples<B: Backend>(
    run: &LoadedRun<B>,
    data: &PreparedData,
    device: &B::Device,
) -> Vec<String> {
    let mut out = Vec::with_capacity(data.n);
    let idx: Vec<usize> = (0..data.n).collect();
    for chunk in idx.chunks(64) {
        let px = data.pixels_batch::<B>(chunk, device);
        for ids in run
            .model
            .greedy(px, BOS_ID, EOS_ID, run.config.model.max_len)
        {
            out.push(decode_caption(&run.tokenizer, &ids));
        }
    }
    out
}

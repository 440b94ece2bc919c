//! The generate stage's loss of one batch (described in the module above): the denoiser's
//! diffusion loss plus the contrastive loss that aligns the text encoder with the frozen vision
//! encoder's image embeddings, which are cached here.

use crate::parallel::{ParallelError, Peer};
use crate::stages::caption::PreparedData;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use duet_diffusion::{gaussian, NoiseSchedule, Prediction};
use duet_models::tokens::PAD_ID;
use duet_models::{Denoiser, ModelSpec, VisionEncoder};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::*;

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

/// One data-parallel peer's part of the generate loss ([`generate_loss`]).
pub struct GenerateLoss<B: AutodiffBackend> {
    /// What this peer back-propagates: its shard's diffusion objective (a sum over the whole
    /// batch's size) plus the contrastive loss, whose gradient reaches the text encoder only
    /// through this peer's captions. Summed over peers, the gradients are the one-device ones.
    pub objective: Tensor<B, 1>,
    /// This peer's part of the reported total (the contrastive loss counted once over all
    /// peers): the parts sum to the one-device loss.
    pub total: f64,
    /// This peer's part of the plain diffusion loss.
    pub diffusion: f64,
}

/// Diffusion + contrastive loss of the global batch `batch`, computed by `peer` on its shard
/// (with [`Peer::ALONE`], the whole batch). `image_emb` holds the frozen image embeddings of
/// the whole batch. The whole batch's dropout, timesteps and noise are drawn from `rng` on
/// every peer and each takes its rows, so the peers draw what one device draws.
#[allow(clippy::too_many_arguments)]
pub fn generate_loss<B: AutodiffBackend>(
    cfg: &ModelSpec,
    settings: &DiffusionSettings,
    schedule: &NoiseSchedule,
    generator: &GenerationModel<B>,
    image_emb: Tensor<B::InnerBackend, 2>,
    data: &PreparedData,
    batch: &[usize],
    peer: &Peer,
    rng: &mut ChaCha8Rng,
    device: &B::Device,
) -> Result<GenerateLoss<B>, ParallelError> {
    let b = batch.len();
    let idx = peer.shard(batch);
    let n = idx.len();
    let rows = peer.rank() * n..(peer.rank() + 1) * n;
    // Only as many text positions as the batch's longest caption: padding positions are
    // masked anyway, and the text encoder and cross-attention cost scales with L. (The whole
    // batch's longest, so every peer pads as one device does.)
    let stride = data.seq_len;
    let l = batch
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
    // This shard's captions plus one empty caption (row n) for the dropped ones.
    let mut ids = Vec::with_capacity((n + 1) * l);
    let mut mask = Vec::with_capacity((n + 1) * l);
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
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n + 1, l]), device);
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [n + 1, l]), device);
    let text = generator.text.forward(ids, mask.clone());

    // Classifier-free guidance dropout, drawn for the whole batch: row i conditions on
    // caption i or on the empty one.
    let dropped: Vec<bool> = (0..b)
        .map(|_| rng.random::<f64>() < settings.cond_dropout)
        .collect();
    let cond_rows: Vec<i64> = (0..n)
        .map(|j| {
            if dropped[rows.start + j] {
                n as i64
            } else {
                j as i64
            }
        })
        .collect();
    let cond_rows = Tensor::<B, 1, Int>::from_data(TensorData::new(cond_rows, [n]), device);
    let cond_tokens = text.tokens.clone().select(0, cond_rows.clone());
    let cond_mask = mask.select(0, cond_rows);

    let x0 = data.pixels_batch::<B>(idx, device);
    let noised = noise_images_part(
        schedule,
        settings.prediction,
        x0,
        b,
        rows.clone(),
        rng,
        device,
    );
    let (objective, diffusion) = diffusion_loss(
        cfg,
        settings,
        schedule,
        &generator.denoiser,
        noised,
        b,
        cond_tokens,
        cond_mask,
        device,
    );

    // Contrastive (text → frozen image embedding and back), real captions only, over the
    // whole batch: the other peers' text embeddings come in as constants, so this peer's
    // gradient reaches the text encoder through its own captions only.
    let image_emb = Tensor::<B, 2>::from_inner(image_emb);
    let e = text.embedding.dims()[1];
    let own = text.embedding.slice([0..n, 0..e]);
    let text_emb = if peer.devices() == 1 {
        own
    } else {
        let mut padded = Tensor::<B::InnerBackend, 2>::zeros([b, e], device);
        padded = padded.slice_assign([rows.clone(), 0..e], own.clone().inner());
        let all = Tensor::<B, 2>::from_inner(peer.sum_tensor(padded)?);
        Tensor::cat(
            vec![
                all.clone().slice([0..rows.start, 0..e]),
                own,
                all.slice([rows.end..b, 0..e]),
            ],
            0,
        )
    };
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
    let contrastive_value = contrastive.clone().into_scalar().elem::<f64>();
    let objective_value = objective.clone().into_scalar().elem::<f64>();
    Ok(GenerateLoss {
        objective: objective + contrastive.mul_scalar(settings.contrastive_weight),
        total: objective_value
            + settings.contrastive_weight * contrastive_value / peer.devices() as f64,
        diffusion: diffusion.into_scalar().elem::<f64>(),
    })
}

/// The denoiser's loss on the noised rows `noised` of a batch of `batch` clean images under
/// conditioning `cond` `[n, L, D]` with key mask `cond_mask` `[n, L]`: MSE of the v- or
/// ε-prediction per sample, summed and divided by `batch` so the parts of a batch add up to
/// its mean. Returns `(objective, diffusion)`: under the Min-SNR-γ weights when set (what is
/// optimised), and plain (what is reported, so runs with and without weighting compare).
#[allow(clippy::too_many_arguments)]
fn diffusion_loss<B: Backend>(
    cfg: &ModelSpec,
    settings: &DiffusionSettings,
    schedule: &NoiseSchedule,
    denoiser: &Denoiser<B>,
    noised: Noised<B>,
    batch: usize,
    cond: Tensor<B, 3>,
    cond_mask: Tensor<B, 2>,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let Noised {
        xt,
        timesteps: tt,
        target,
        t,
    } = noised;
    let [b, c, s, _] = xt.dims();
    let pred = denoiser.forward(cfg, xt, tt, cond, cond_mask);
    // Per-sample mean squared error, then the batch mean under the loss weights. The plain
    // (unweighted) mean is what is reported, so runs with and without weighting compare.
    let per_sample = (pred - target)
        .powi_scalar(2)
        .reshape([b, c * s * s])
        .mean_dim(1);
    let diffusion = per_sample.clone().sum().div_scalar(batch as f64);
    let objective = if settings.min_snr_gamma.is_some() {
        let w: Vec<f32> = t
            .iter()
            .map(|&t| settings.loss_weight(schedule.alpha_bar(Some(t))) as f32)
            .collect();
        let w = Tensor::<B, 2>::from_data(TensorData::new(w, [b, 1]), device);
        (per_sample * w).sum().div_scalar(batch as f64)
    } else {
        diffusion.clone()
    };

    (objective, diffusion)
}

/// One draw of the forward process for a batch of clean images.
pub struct Noised<B: Backend> {
    /// `[B, C, S, S]` the noisy images `√ᾱ x0 + √(1 − ᾱ) ε`.
    pub xt: Tensor<B, 4>,
    /// `[B]` their timesteps as floats (the denoiser's input), and as drawn.
    pub timesteps: Tensor<B, 1>,
    pub t: Vec<usize>,
    /// `[B, C, S, S]` what the denoiser should predict (ε or v).
    pub target: Tensor<B, 4>,
}

/// Noises `x0` `[B, C, S, S]` on the host rng: a uniform timestep per sample, then Gaussian
/// noise (in that order: a run's draws, and so its weights, depend on it).
pub fn noise_images<B: Backend>(
    schedule: &NoiseSchedule,
    prediction: Prediction,
    x0: Tensor<B, 4>,
    rng: &mut ChaCha8Rng,
    device: &B::Device,
) -> Noised<B> {
    let b = x0.dims()[0];
    noise_images_part(schedule, prediction, x0, b, 0..b, rng, device)
}

/// [`noise_images`] of rows `rows` of a batch of `batch` images, `x0` holding those rows: the
/// whole batch's timesteps and noise are drawn, so the parts of a batch get what the whole
/// batch would.
pub fn noise_images_part<B: Backend>(
    schedule: &NoiseSchedule,
    prediction: Prediction,
    x0: Tensor<B, 4>,
    batch: usize,
    rows: std::ops::Range<usize>,
    rng: &mut ChaCha8Rng,
    device: &B::Device,
) -> Noised<B> {
    let [b, c, s, _] = x0.dims();
    let all_t: Vec<usize> = (0..batch)
        .map(|_| rng.random_range(0..schedule.train_steps()))
        .collect();
    let noise = gaussian(&[batch, c, s, s], rng);
    let t = all_t[rows.clone()].to_vec();
    let per = c * s * s;
    let noise = noise.into_raw_vec_and_offset().0[rows.start * per..rows.end * per].to_vec();
    let coef = |f: &dyn Fn(f64) -> f64| {
        let v: Vec<f32> = t
            .iter()
            .map(|&t| f(schedule.alpha_bar(Some(t))) as f32)
            .collect();
        Tensor::<B, 4>::from_data(TensorData::new(v, [b, 1, 1, 1]), device)
    };
    let a = coef(&|ab| ab.sqrt());
    let sg = coef(&|ab| (1.0 - ab).sqrt());
    let noise = Tensor::<B, 4>::from_data(TensorData::new(noise, [b, c, s, s]), device);
    let xt = x0.clone() * a.clone() + noise.clone() * sg.clone();
    let target = match prediction {
        Prediction::Epsilon => noise,
        Prediction::V => noise * a - x0 * sg,
    };
    let tt: Vec<f32> = t.iter().map(|&t| t as f32).collect();
    Noised {
        xt,
        timesteps: Tensor::from_data(TensorData::new(tt, [b]), device),
        t,
        target,
    }
}

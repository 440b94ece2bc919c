//! Stage 1's reconstruction reward (the frozen generator rebuilds an image from a sampled
//! caption; the reward is how similar the rebuild is to the original) and stage 2's captions
//! (the captioner's own greedy captions of the images it trains on).

use crate::stages::caption::PreparedData;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use duet_diffusion::{gaussian, Sampler, SamplerConfig};
use duet_models::tokens::{BOS_ID, EOS_ID, PAD_ID};
use duet_models::{CaptionModel, VisionEncoder};
use duet_run::LoadedGenerator;
use ndarray::{ArrayD, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;

/// Rebuilds images from captions with a generator: `seqs` grouped `group` per image, every
/// group from the image's own start noise. The noise of a batch of `batch_images` is drawn from
/// `seed` and `seqs` are the groups of its images `first_image..` (a data-parallel peer's share;
/// every image of the batch when `first_image` is 0 and `seqs` hold them all), so an image's
/// start noise is the same whichever peer rebuilds it. Returns `[N·group, 3, S, S]`.
#[allow(clippy::too_many_arguments)]
pub fn reconstruct<B: Backend>(
    generator: &LoadedGenerator<B>,
    seqs: &[Vec<u32>],
    group: usize,
    settings: &ReconstructionSettings,
    seed: u64,
    first_image: usize,
    batch_images: usize,
    device: &B::Device,
) -> anyhow::Result<ArrayD<f32>> {
    let group = group.max(1);
    let images = seqs.len().div_ceil(group);
    if first_image + images > batch_images {
        anyhow::bail!(
            "images {first_image}..{} are not in a batch of {batch_images}",
            first_image + images
        );
    }
    let s = generator.config.model.image_size;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise = gaussian(&[batch_images, 3, s, s], &mut rng);
    let rows: Vec<usize> = (0..seqs.len()).map(|k| first_image + k / group).collect();
    let x = noise.select(Axis(0), &rows);
    let sampler = SamplerConfig {
        sampler: Sampler::Ddim { eta: 0.0 },
        steps: settings.steps,
        clip_x0: true,
    };
    generator.generate_tokens(seqs, x, &sampler, settings.guidance, &mut rng, device)
}

/// Per rebuilt image: cosine of the frozen vision encoder's embeddings (rebuilt vs original)
/// and pixel MSE. `originals` is `[N, 3, S, S]`; `rebuilt` holds `group` images per original.
pub fn similarity<B: Backend>(
    vision: &VisionEncoder<B>,
    originals: Tensor<B, 4>,
    rebuilt: &ArrayD<f32>,
    group: usize,
    device: &B::Device,
) -> Vec<(f32, f32)> {
    let shape: Vec<usize> = rebuilt.shape().to_vec();
    let m = shape[0];
    let per: usize = shape[1..].iter().product();
    let flat: Vec<f32> = rebuilt.iter().copied().collect();
    let orig: Vec<f32> = originals
        .clone()
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default();
    let e_orig = to_vec(vision.forward(originals).embedding);
    let rebuilt_t = Tensor::<B, 4>::from_data(
        TensorData::new(flat.clone(), [m, shape[1], shape[2], shape[3]]),
        device,
    );
    let e_reb = to_vec(vision.forward(rebuilt_t).embedding);
    let e = e_reb.len() / m.max(1);
    (0..m)
        .map(|k| {
            let i = k / group.max(1);
            // Both embeddings have unit norm.
            let cos: f32 = (0..e).map(|j| e_reb[k * e + j] * e_orig[i * e + j]).sum();
            let mse = (0..per)
                .map(|j| (flat[k * per + j] - orig[i * per + j]).powi(2))
                .sum::<f32>()
                / per as f32;
            (cos, mse)
        })
        .collect()
}

fn to_vec<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}

/// Greedy captions of samples `idx` as `[BOS] … [EOS]` token rows.
pub fn greedy_tokens<B: Backend>(
    captioner: &CaptionModel<B>,
    data: &PreparedData,
    idx: &[usize],
    max_len: usize,
    device: &B::Device,
) -> Vec<Vec<u32>> {
    captioner
        .greedy(data.pixels_batch::<B>(idx, device), BOS_ID, EOS_ID, max_len)
        .into_iter()
        .map(|body| {
            let mut seq = Vec::with_capacity(body.len() + 2);
            seq.push(BOS_ID);
            seq.extend(body.into_iter().take(max_len.saturating_sub(2)));
            seq.push(EOS_ID);
            seq
        })
        .collect()
}

/// The dataset's images with the captioner's own greedy captions in place of the dataset's,
/// made the first time each image is drawn.
pub(super) struct OwnCaptions {
    data: PreparedData,
    done: Vec<bool>,
    max_len: usize,
}

impl OwnCaptions {
    pub(super) fn new(data: &PreparedData, max_len: usize) -> Self {
        Self {
            data: PreparedData {
                n: data.n,
                image_size: data.image_size,
                pixels: data.pixels.clone(),
                tokens: vec![i64::from(PAD_ID); data.n * max_len],
                targets: vec![i64::from(PAD_ID); data.n * (max_len - 1)],
                image_of: (0..data.n).collect(),
                seq_len: max_len,
            },
            done: vec![false; data.n],
            max_len,
        }
    }

    /// Captions the not yet captioned samples of `idx`; returns the data to train on.
    pub(super) fn caption<B: Backend>(
        &mut self,
        captioner: &CaptionModel<B>,
        idx: &[usize],
        device: &B::Device,
    ) -> &PreparedData {
        let mut missing: Vec<usize> = idx.iter().copied().filter(|&i| !self.done[i]).collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let seqs = greedy_tokens(captioner, &self.data, &missing, self.max_len, device);
            for (&i, seq) in missing.iter().zip(seqs) {
                let row = &mut self.data.tokens[i * self.max_len..(i + 1) * self.max_len];
                for (slot, t) in row.iter_mut().zip(&seq) {
                    *slot = i64::from(*t);
                }
                // The targets are the tokens shifted by one, all taking the loss.
                let l = self.max_len - 1;
                let targets = &mut self.data.targets[i * l..(i + 1) * l];
                for (slot, t) in targets.iter_mut().zip(seq.iter().skip(1)) {
                    *slot = i64::from(*t);
                }
                self.done[i] = true;
            }
        }
        &self.data
    }
}

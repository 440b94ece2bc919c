//! Group-relative policy optimisation (GRPO, Shao et al. 2024) for the captioner: the
//! policy-gradient core of the unify stage's "generation for understanding" half.
//!
//! For every image the policy samples a *group* of `G` captions at a temperature; each caption
//! gets a scalar reward (in the unify stage: how well the frozen generator rebuilds the image
//! from it); advantages are the rewards normalised within their group, so no value network is
//! needed. The loss per caption is the mean over its tokens of
//! `−A · log π(token) + β · KL_k3(π ‖ π_ref)`, with the k3 estimator
//! `exp(r) − r − 1`, `r = log π_ref − log π` (unbiased, always ≥ 0), keeping the policy near the
//! frozen starting captioner. One gradient step per batch of samples (on-policy), so PPO's
//! ratio is 1 and its clipping never binds; the surrogate reduces to the plain policy gradient.

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use duet_models::tokens::{BOS_ID, EOS_ID, PAD_ID};
use duet_models::{CaptionModel, KvCache};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::parallel::{ParallelError, Peer};

/// GRPO hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GrpoSettings {
    /// Captions sampled per image (`G`).
    pub group: usize,
    /// Sampling temperature.
    pub temperature: f64,
    /// Weight `β` of the KL penalty to the reference captioner.
    pub kl_weight: f64,
}

impl Default for GrpoSettings {
    fn default() -> Self {
        Self {
            group: 6,
            temperature: 1.0,
            kl_weight: 0.05,
        }
    }
}

/// Samples `group` captions per image (rows `i·group .. (i+1)·group` belong to image `i`),
/// image `i`'s from `rngs[i]` alone, so an image's captions do not depend on which other images
/// share its batch (data-parallel peers split a batch by image). Each is `[BOS] tokens… [EOS]`
/// (EOS missing if `max_len` ran out).
pub fn sample_captions<B: Backend, R: Rng>(
    model: &CaptionModel<B>,
    pixels: Tensor<B, 4>,
    group: usize,
    temperature: f64,
    max_len: usize,
    rngs: &mut [R],
) -> Vec<Vec<u32>> {
    let device = pixels.device();
    let image_tokens = model.vision.forward(pixels).patch_tokens;
    let n = image_tokens.dims()[0];
    assert_eq!(rngs.len(), n, "one generator per image");
    let rows: Vec<i64> = (0..n * group).map(|k| (k / group) as i64).collect();
    let image_tokens = image_tokens.select(
        0,
        Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n * group]), &device),
    );
    let b = n * group;
    let mut seqs: Vec<Vec<u32>> = vec![vec![BOS_ID]; b];
    let mut done = vec![false; b];
    let mut cache: Option<KvCache<B>> = None;
    for step in 0..max_len.saturating_sub(1) {
        let next: Vec<i64> = seqs
            .iter()
            .map(|s| i64::from(*s.last().unwrap_or(&BOS_ID)))
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(next, [b, 1]), &device);
        let pos =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![step as i64; b], [b, 1]), &device);
        let bias = Tensor::<B, 4>::zeros([b, 1, 1, step + 1], &device);
        let (logits, new_cache) =
            model
                .decoder
                .forward_step(ids, pos, bias, image_tokens.clone(), cache.as_ref());
        cache = Some(new_cache);
        let v = logits.dims()[2];
        let probs = softmax(logits.reshape([b, v]).div_scalar(temperature), 1)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default();
        for i in 0..b {
            if done[i] {
                continue;
            }
            // PAD and BOS never occur inside a caption; they are removed from the sampling
            // distribution (their probability under an even slightly trained captioner is
            // negligible, so the policy-gradient bias of doing so is too).
            let mut row = probs[i * v..(i + 1) * v].to_vec();
            row[PAD_ID as usize] = 0.0;
            row[BOS_ID as usize] = 0.0;
            let tok = sample_index(&row, &mut rngs[i / group]) as u32;
            seqs[i].push(tok);
            if tok == EOS_ID {
                done[i] = true;
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
    }
    seqs
}

fn sample_index<R: Rng + ?Sized>(p: &[f32], rng: &mut R) -> usize {
    let total: f32 = p.iter().sum();
    let mut u = rng.random::<f32>() * total;
    for (i, &q) in p.iter().enumerate() {
        if u < q {
            return i;
        }
        u -= q;
    }
    p.len().saturating_sub(1)
}

/// Rewards normalised within each group of `group` consecutive entries:
/// `(r − mean) / (std + 1e-6)`; a group whose rewards are all equal gets advantage 0 (nothing
/// to prefer).
pub fn group_advantages(rewards: &[f32], group: usize) -> Vec<f32> {
    let group = group.max(1);
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let n = g.len() as f32;
        let mean = g.iter().sum::<f32>() / n;
        let var = g.iter().map(|r| (r - mean).powi(2)).sum::<f32>() / n;
        let std = var.sqrt();
        out.extend(g.iter().map(|r| {
            if std < 1e-6 {
                0.0
            } else {
                (r - mean) / (std + 1e-6)
            }
        }));
    }
    out
}

/// Token ids `[B, L]` padded with PAD, and the `[B, L-1]` mask of predicted positions (every
/// token after BOS up to and including EOS).
fn pack(seqs: &[Vec<u32>]) -> (Vec<i64>, Vec<f32>, usize) {
    let l = seqs.iter().map(Vec::len).max().unwrap_or(2).max(2);
    let mut ids = Vec::with_capacity(seqs.len() * l);
    let mut mask = Vec::with_capacity(seqs.len() * (l - 1));
    for s in seqs {
        for j in 0..l {
            ids.push(i64::from(s.get(j).copied().unwrap_or(PAD_ID)));
        }
        for j in 1..l {
            mask.push(f32::from(u8::from(j < s.len())));
        }
    }
    (ids, mask, l)
}

/// Per-token log-probabilities `[B, L-1]` of `ids`' next tokens under `model`.
fn token_logps<B: Backend>(
    model: &CaptionModel<B>,
    image_tokens: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    let [b, l] = ids.dims();
    let inputs = ids.clone().slice([0..b, 0..l - 1]);
    let targets = ids.slice([0..b, 1..l]).reshape([b * (l - 1), 1]);
    let logits = model.decoder.forward(inputs, image_tokens);
    let v = logits.dims()[2];
    log_softmax(logits.reshape([b * (l - 1), v]), 1)
        .gather(1, targets)
        .reshape([b, l - 1])
}

/// What one GRPO loss evaluation measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoStats {
    pub loss: f64,
    /// Mean per-token k3 KL to the reference.
    pub kl: f64,
    /// Mean reward of the sampled captions.
    pub mean_reward: f64,
    /// Share of groups whose rewards were not all equal.
    pub informative_groups: f64,
    /// Mean sampled length in tokens, BOS and EOS included.
    pub mean_len: f64,
}

/// The GRPO loss of sampled captions `seqs` (grouped as [`sample_captions`] returns them) for
/// the images `pixels` `[N, 3, S, S]`, with `advantages` from [`group_advantages`]: the sum of
/// the per-caption losses divided by `captions`, the whole batch's count (a data-parallel
/// peer's part of the mean when `seqs` is its share). Also returns the sum of the per-token KL
/// estimates and the number of tokens they were taken over.
pub fn grpo_loss<B: AutodiffBackend>(
    policy: &CaptionModel<B>,
    reference: &CaptionModel<B::InnerBackend>,
    pixels: Tensor<B, 4>,
    seqs: &[Vec<u32>],
    advantages: &[f32],
    settings: &GrpoSettings,
    captions: usize,
) -> (Tensor<B, 1>, f64, f64) {
    let device = pixels.device();
    let n = pixels.dims()[0];
    let b = seqs.len();
    let group = b / n.max(1);
    let (ids, mask, l) = pack(seqs);
    let rows: Vec<i64> = (0..b).map(|k| (k / group.max(1)) as i64).collect();
    let rows_t = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b]), &device);
    let ids_t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, l]), &device);
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, l - 1]), &device);

    let image_tokens = policy
        .vision
        .forward(pixels.clone())
        .patch_tokens
        .select(0, rows_t.clone());
    let logp = token_logps(policy, image_tokens, ids_t.clone());
    let ref_logp = {
        let img = reference
            .vision
            .forward(pixels.inner())
            .patch_tokens
            .select(0, rows_t.inner());
        Tensor::<B, 2>::from_inner(token_logps(reference, img, ids_t.inner()))
    };
    // k3 KL estimator, per token.
    let r = ref_logp - logp.clone();
    let kl = r.clone().exp() - r - 1.0;
    let adv = Tensor::<B, 2>::from_data(TensorData::new(advantages.to_vec(), [b, 1]), &device);
    let per_token = logp.neg() * adv + kl.clone().mul_scalar(settings.kl_weight);
    let lengths = mask.clone().sum_dim(1).clamp_min(1.0);
    let per_seq = (per_token * mask.clone()).sum_dim(1) / lengths;
    let loss = per_seq.sum().div_scalar(captions.max(1) as f64);
    let kl_sum = (kl * mask.clone()).sum().into_scalar().elem::<f64>();
    let tokens = mask.sum().into_scalar().elem::<f64>();
    (loss, kl_sum, tokens)
}

/// One GRPO update: samples a group per image (image `i` from `rngs[i]`), scores all
/// captions at once with `reward` (given every sampled caption, grouped as
/// [`sample_captions`] returns them; batched because a real reward — rebuilding each image with
/// the generator — runs best as one batch), and takes one optimizer step. `pixels` are the
/// images of `peer`'s share of a batch of `batch_images` (all of them with [`Peer::ALONE`]);
/// the loss is its part of the whole batch's and the gradients are summed across peers, so
/// every peer takes the step one device takes. Returns the updated policy and the whole
/// batch's statistics.
#[allow(clippy::too_many_arguments)]
pub fn grpo_step<B, O, R, F, E>(
    policy: CaptionModel<B>,
    reference: &CaptionModel<B::InnerBackend>,
    optim: &mut O,
    lr: f64,
    pixels: Tensor<B, 4>,
    settings: &GrpoSettings,
    max_len: usize,
    rngs: &mut [R],
    peer: &Peer,
    batch_images: usize,
    mut reward: F,
) -> Result<(CaptionModel<B>, GrpoStats), E>
where
    B: AutodiffBackend,
    O: Optimizer<CaptionModel<B>, B>,
    R: Rng,
    F: FnMut(&[Vec<u32>]) -> Result<Vec<f32>, E>,
    E: From<ParallelError>,
{
    let device = pixels.device();
    let seqs = sample_captions(
        &policy.valid(),
        pixels.clone().inner(),
        settings.group,
        settings.temperature,
        max_len,
        rngs,
    );
    let rewards = reward(&seqs)?;
    let adv = group_advantages(&rewards, settings.group);
    let informative = rewards
        .chunks(settings.group.max(1))
        .filter(|g| g.iter().any(|&r| (r - g[0]).abs() > 1e-6))
        .count();
    let captions = batch_images * settings.group;
    let (loss, kl_sum, kl_tokens) =
        grpo_loss(&policy, reference, pixels, &seqs, &adv, settings, captions);
    // The whole batch's sums, in one collective operation.
    let sums = peer.sum_tensor(Tensor::<B::InnerBackend, 1>::from_floats(
        [
            loss.clone().into_scalar().elem::<f32>(),
            rewards.iter().sum::<f32>(),
            informative as f32,
            seqs.iter().map(|s| s.len() as f32).sum::<f32>(),
            kl_sum as f32,
            kl_tokens as f32,
        ],
        &device,
    ))?;
    let sums: Vec<f64> = sums
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .map_err(|e| ParallelError::BadPeers(format!("reading the GRPO statistics: {e:?}")))?;
    let grads = GradientsParams::from_grads(loss.backward(), &policy);
    let grads = peer.sum_gradients(&policy, grads)?;
    let policy = optim.step(lr, policy, grads);
    let n = captions.max(1) as f64;
    Ok((
        policy,
        GrpoStats {
            loss: sums[0],
            kl: sums[4] / sums[5].max(1.0),
            mean_reward: sums[1] / n,
            informative_groups: sums[2] / batch_images.max(1) as f64,
            mean_len: sums[3] / n,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::optim::AdamConfig;
    use duet_models::{ModelSpec, Preset};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    type B = Autodiff<NdArray<f32>>;

    #[test]
    fn advantages_are_normalised_within_each_group() {
        let a = group_advantages(&[1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3);
        assert!((a[0] + a[2]).abs() < 1e-5 && a[1].abs() < 1e-5);
        assert!((a[2] - 1.2247).abs() < 1e-3, "{a:?}");
        assert_eq!(&a[3..], &[0.0, 0.0, 0.0]);
    }

    /// Toy reward: the share of a caption's tokens (after BOS) that are token 7. Untrained, the
    /// captioner emits it about 1 time in `vocab`; a few GRPO steps must raise that clearly,
    /// while the KL to the reference stays finite and non-negative.
    #[test]
    fn grpo_steps_raise_a_toy_reward() {
        let device = Default::default();
        let cfg = ModelSpec::preset(Preset::Tiny, 16, 32);
        B::seed(&device, 3);
        let policy = CaptionModel::<B>::new(&cfg, &device);
        let reference = policy.valid();
        let mut optim = AdamConfig::new().init::<B, CaptionModel<B>>();
        // One generator per image, fresh for every sampling round.
        let mut round = 0u64;
        let mut rngs = || {
            round += 1;
            (0..4)
                .map(|i| ChaCha8Rng::seed_from_u64(11 + 100 * round + i))
                .collect::<Vec<_>>()
        };
        let pixels = Tensor::<B, 4>::random(
            [4, 3, 32, 32],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        let target = 7u32;
        let share = |_: usize, s: &[u32]| {
            let body = &s[1..];
            body.iter().filter(|&&t| t == target).count() as f32 / body.len().max(1) as f32
        };
        let settings = GrpoSettings {
            group: 8,
            temperature: 1.0,
            kl_weight: 0.01,
        };
        let measure = |p: &CaptionModel<B>, rngs: &mut [ChaCha8Rng]| {
            let seqs = sample_captions(&p.valid(), pixels.clone().inner(), 16, 1.0, 12, rngs);
            seqs.iter().map(|s| share(0, s)).sum::<f32>() / seqs.len() as f32
        };
        let before = measure(&policy, &mut rngs());
        let mut policy = policy;
        let mut last = None;
        for _ in 0..8 {
            let (p, stats) = grpo_step(
                policy,
                &reference,
                &mut optim,
                3e-3,
                pixels.clone(),
                &settings,
                12,
                &mut rngs(),
                &Peer::ALONE,
                4,
                |seqs: &[Vec<u32>]| {
                    Ok::<_, ParallelError>(seqs.iter().map(|s| share(0, s)).collect())
                },
            )
            .unwrap();
            policy = p;
            assert!(stats.kl.is_finite() && stats.kl >= 0.0, "{stats:?}");
            last = Some(stats);
        }
        let after = measure(&policy, &mut rngs());
        eprintln!("toy reward {before:.3} -> {after:.3}, last step {last:?}");
        assert!(
            after > 2.0 * before && after > before + 0.1,
            "reward before {before:.3}, after {after:.3} ({last:?})"
        );
        assert!(
            last.map(|s| s.kl).unwrap_or(0.0) > 0.0,
            "policy never moved"
        );
    }
}

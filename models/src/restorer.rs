//! Missing-modality restoration: a fusion head over the two pooled embeddings, and a small
//! diffusion model in feature space that restores the embedding of an absent modality from the
//! present one.
//!
//! Everything here works on the pooled, L2-normalised embeddings `[B, E]` of the frozen vision
//! and text encoders, so the models are small MLPs: training them costs seconds, not hours, and
//! the backbones are never touched.

use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::activation::gelu;

use crate::denoiser::timestep_features;

/// Sizes of the restoration models (written into run configs and the bundle manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreConfig {
    /// Width of the pooled embeddings `E`.
    pub embed_dim: usize,
    /// Hidden width of the restorer's residual MLP.
    pub hidden: usize,
    /// Residual blocks of the restorer.
    pub blocks: usize,
    /// Hidden width of the fusion head.
    pub head_hidden: usize,
    /// Classes of the task the fusion head predicts.
    pub classes: usize,
}

impl RestoreConfig {
    pub fn new(embed_dim: usize, classes: usize) -> Self {
        Self {
            embed_dim,
            hidden: 2 * embed_dim,
            blocks: 3,
            head_hidden: 2 * embed_dim,
            classes,
        }
    }
}

/// The task head: `[image ‖ text] → MLP → logits`. Trained on complete pairs, then frozen.
#[derive(Module, Debug)]
pub struct FusionHead<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub out: Linear<B>,
}

impl<B: Backend> FusionHead<B> {
    pub fn new(cfg: &RestoreConfig, device: &B::Device) -> Self {
        Self {
            fc1: LinearConfig::new(2 * cfg.embed_dim, cfg.head_hidden).init(device),
            fc2: LinearConfig::new(cfg.head_hidden, cfg.head_hidden).init(device),
            out: LinearConfig::new(cfg.head_hidden, cfg.classes).init(device),
        }
    }

    /// `image`, `text`: `[B, E]` → logits `[B, C]`.
    pub fn forward(&self, image: Tensor<B, 2>, text: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = Tensor::cat(vec![image, text], 1);
        let h = gelu(self.fc1.forward(x));
        let h = gelu(self.fc2.forward(h));
        self.out.forward(h)
    }
}

/// One residual block of the restorer: `h + fc2(gelu(fc1(ln(h + c))))`, where `c` is the
/// (gated) condition plus the timestep embedding.
#[derive(Module, Debug)]
pub struct RestorerBlock<B: Backend> {
    pub ln: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> RestorerBlock<B> {
    fn new(hidden: usize, device: &B::Device) -> Self {
        Self {
            ln: LayerNormConfig::new(hidden).init(device),
            fc1: LinearConfig::new(hidden, 2 * hidden).init(device),
            // Zero-initialised output: every block starts as the identity, the usual trick
            // for deep residual denoisers (as in DiT's adaLN-zero).
            fc2: LinearConfig::new(2 * hidden, hidden)
                .with_initializer(Initializer::Zeros)
                .init(device),
        }
    }

    fn forward(&self, h: Tensor<B, 2>, c: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = self
            .fc2
            .forward(gelu(self.fc1.forward(self.ln.forward(h.clone() + c))));
        h + y
    }
}

/// A feature-space denoiser for one direction (text → image features or image → text
/// features): predicts the diffusion target (`v`) of a noisy embedding `x_t` at timestep `t`,
/// conditioned on the present modality's embedding.
///
/// **Dynamic modality gating** has two parts, both computed from the condition:
/// - the *step gate* `g = σ(W [c_h ‖ t_h])`, per hidden unit, scales how strongly the condition
///   steers this denoising step (it depends on `t`: early, noisy steps can lean on the
///   condition, late steps on the sample itself);
/// - the *trust gate* `τ = σ(w · c_h)`, one number per example, says how much the head should
///   trust the restored feature: the feature handed to the head is `τ r + (1 − τ) μ`, with `μ`
///   the training mean of the missing modality (the mean-fill vector).
///
/// Without gating (the ablation) both gates are 1.
#[derive(Module, Debug)]
pub struct FeatureRestorer<B: Backend> {
    pub in_proj: Linear<B>,
    pub cond_proj: Linear<B>,
    pub time_proj: Linear<B>,
    pub step_gate: Linear<B>,
    pub trust_gate: Linear<B>,
    pub blocks: Vec<RestorerBlock<B>>,
    pub ln_out: LayerNorm<B>,
    pub out: Linear<B>,
    /// `μ`, the mean embedding of the modality this restorer restores (the mean-fill vector).
    /// This and the three statistics below are set from data and never trained (detached in
    /// every use).
    pub mean_fill: Param<Tensor<B, 1>>,
    /// Per-dimension standard deviation of the restored modality: diffusion runs on
    /// `z = (x − μ) / σ`. The pooled embeddings are strongly anisotropic (every image
    /// embedding has cosine ≈ 0.98 with their mean), so in raw units the information lives in
    /// a sliver far below the unit-variance noise the schedule assumes.
    pub target_std: Param<Tensor<B, 1>>,
    /// Mean and standard deviation of the condition modality (its input is standardised too).
    pub cond_mean: Param<Tensor<B, 1>>,
    pub cond_std: Param<Tensor<B, 1>>,
}

impl<B: Backend> FeatureRestorer<B> {
    pub fn new(cfg: &RestoreConfig, device: &B::Device) -> Self {
        let (e, h) = (cfg.embed_dim, cfg.hidden);
        Self {
            in_proj: LinearConfig::new(e, h).init(device),
            cond_proj: LinearConfig::new(e, h).init(device),
            time_proj: LinearConfig::new(h, h).init(device),
            step_gate: LinearConfig::new(2 * h, h).init(device),
            trust_gate: LinearConfig::new(h, 1).init(device),
            blocks: (0..cfg.blocks)
                .map(|_| RestorerBlock::new(h, device))
                .collect(),
            ln_out: LayerNormConfig::new(h).init(device),
            out: LinearConfig::new(h, e).init(device),
            mean_fill: Initializer::Zeros.init([e], device),
            target_std: Initializer::Ones.init([e], device),
            cond_mean: Initializer::Zeros.init([e], device),
            cond_std: Initializer::Ones.init([e], device),
        }
    }

    /// Sets the data statistics: mean and standard deviation of the restored modality
    /// (`target`) and of the condition modality, each `[E]`.
    pub fn with_statistics(
        mut self,
        target: (Tensor<B, 1>, Tensor<B, 1>),
        cond: (Tensor<B, 1>, Tensor<B, 1>),
    ) -> Self {
        self.mean_fill = Param::from_tensor(target.0);
        self.target_std = Param::from_tensor(target.1);
        self.cond_mean = Param::from_tensor(cond.0);
        self.cond_std = Param::from_tensor(cond.1);
        self
    }

    fn row(p: &Param<Tensor<B, 1>>, b: usize) -> Tensor<B, 2> {
        let [e] = p.dims();
        p.val().detach().reshape([1, e]).expand([b, e])
    }

    /// A restored-modality embedding `[B, E]` in the diffusion space: `(x − μ) / σ`.
    pub fn standardise(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [b, _] = x.dims();
        (x - Self::row(&self.mean_fill, b)) / Self::row(&self.target_std, b)
    }

    /// Back from the diffusion space: `μ + σ z`.
    pub fn unstandardise(&self, z: Tensor<B, 2>) -> Tensor<B, 2> {
        let [b, _] = z.dims();
        z * Self::row(&self.target_std, b) + Self::row(&self.mean_fill, b)
    }

    fn condition(&self, cond: Tensor<B, 2>) -> Tensor<B, 2> {
        let [b, _] = cond.dims();
        self.cond_proj
            .forward((cond - Self::row(&self.cond_mean, b)) / Self::row(&self.cond_std, b))
    }

    /// `x_t`: `[B, E]` (standardised, see [`Self::standardise`]), `t`: `[B]` (integer-valued),
    /// `cond`: `[B, E]` (a raw embedding of the other modality) → predicted `v` `[B, E]`.
    pub fn forward(
        &self,
        x_t: Tensor<B, 2>,
        t: Tensor<B, 1>,
        cond: Tensor<B, 2>,
        gating: bool,
    ) -> Tensor<B, 2> {
        let hidden = self.time_proj.weight.dims()[0];
        let t_h = self.time_proj.forward(timestep_features(t, hidden));
        let c_h = self.condition(cond);
        let steer = if gating {
            let g = sigmoid(
                self.step_gate
                    .forward(Tensor::cat(vec![c_h.clone(), t_h.clone()], 1)),
            );
            c_h * g
        } else {
            c_h
        };
        let c = steer + t_h;
        let mut h = self.in_proj.forward(x_t);
        for block in &self.blocks {
            h = block.forward(h, c.clone());
        }
        self.out.forward(self.ln_out.forward(h))
    }

    /// The trust gate `τ` `[B, 1]` for a condition `[B, E]` (1 without gating).
    pub fn trust(&self, cond: Tensor<B, 2>, gating: bool) -> Tensor<B, 2> {
        let [b, _] = cond.dims();
        if !gating {
            return Tensor::ones([b, 1], &cond.device());
        }
        sigmoid(self.trust_gate.forward(self.condition(cond)))
    }

    /// What the head receives for a restored feature `r`: `τ r + (1 − τ) μ`.
    pub fn blend(&self, restored: Tensor<B, 2>, cond: Tensor<B, 2>, gating: bool) -> Tensor<B, 2> {
        if !gating {
            return restored;
        }
        let [b, _] = restored.dims();
        let tau = self.trust(cond, true);
        let mu = Self::row(&self.mean_fill, b);
        restored * tau.clone() + mu * tau.neg().add_scalar(1.0)
    }
}

/// Both directions of restoration.
#[derive(Module, Debug)]
pub struct Restorers<B: Backend> {
    /// Restores image embeddings from text embeddings.
    pub t2i: FeatureRestorer<B>,
    /// Restores text embeddings from image embeddings.
    pub i2t: FeatureRestorer<B>,
}

impl<B: Backend> Restorers<B> {
    pub fn new(cfg: &RestoreConfig, device: &B::Device) -> Self {
        Self {
            t2i: FeatureRestorer::new(cfg, device),
            i2t: FeatureRestorer::new(cfg, device),
        }
    }
}

/// The prompt-style baseline: one learned vector per modality stands in for a missing
/// embedding (trained against the frozen head).
#[derive(Module, Debug)]
pub struct MissingTokens<B: Backend> {
    pub image: Param<Tensor<B, 1>>,
    pub text: Param<Tensor<B, 1>>,
}

impl<B: Backend> MissingTokens<B> {
    pub fn new(embed_dim: usize, device: &B::Device) -> Self {
        Self {
            image: Initializer::Zeros.init([embed_dim], device),
            text: Initializer::Zeros.init([embed_dim], device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn shapes_and_gates() {
        let dev = Default::default();
        let cfg = RestoreConfig::new(16, 5);
        let r = FeatureRestorer::<B>::new(&cfg, &dev);
        let x = Tensor::<B, 2>::random([3, 16], Distribution::Normal(0.0, 1.0), &dev);
        let c = Tensor::<B, 2>::random([3, 16], Distribution::Normal(0.0, 1.0), &dev);
        let t = Tensor::<B, 1>::from_floats([0.0, 10.0, 999.0], &dev);
        assert_eq!(r.forward(x.clone(), t, c.clone(), true).dims(), [3, 16]);
        let tau = r
            .trust(c.clone(), true)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert!(tau.iter().all(|&v| v > 0.0 && v < 1.0));
        // Without gating the blend hands the restored feature through unchanged.
        let same = r.blend(x.clone(), c.clone(), false);
        assert_eq!(same.into_data(), x.clone().into_data());
        // With μ = 0 the blend is τ r.
        let blended = r.blend(x.clone(), c.clone(), true);
        let want = x.clone() * r.trust(c, true);
        blended
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Default::default());
        // The diffusion space round-trips, and standardising centres on μ in units of σ.
        let mu = Tensor::<B, 1>::random([16], Distribution::Normal(0.0, 1.0), &dev);
        let sd = Tensor::<B, 1>::random([16], Distribution::Uniform(0.5, 2.0), &dev);
        let r = r.with_statistics((mu.clone(), sd.clone()), (mu.clone(), sd));
        let back = r.unstandardise(r.standardise(x.clone()));
        back.into_data()
            .assert_approx_eq::<f32>(&x.clone().into_data(), Default::default());
        let z = r.standardise(mu.reshape([1, 16]));
        assert!(z.abs().max().into_scalar() < 1e-6);
        let head = FusionHead::<B>::new(&cfg, &dev);
        let i = Tensor::<B, 2>::zeros([3, 16], &dev);
        assert_eq!(head.forward(i.clone(), i).dims(), [3, 5]);
    }
}

//! ViT image encoder: patch tokens `[B, P, D]` and a pooled, L2-normalised embedding `[B, E]`.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::attention::EncoderBlock;
use duet_spec::ModelSpec;

#[derive(Module, Debug)]
pub struct VisionEncoder<B: Backend> {
    pub patch_embed: Conv2d<B>,
    pub pos_embed: Param<Tensor<B, 3>>,
    pub blocks: Vec<EncoderBlock<B>>,
    pub ln_final: LayerNorm<B>,
    pub proj: Linear<B>,
}

/// Output of the vision encoder.
pub struct VisionOutput<B: Backend> {
    /// `[B, P, D]`, the caption decoder's cross-attention memory.
    pub patch_tokens: Tensor<B, 3>,
    /// `[B, E]`, unit L2 norm.
    pub embedding: Tensor<B, 2>,
}

impl<B: Backend> VisionEncoder<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        let p = cfg.patch_size;
        Self {
            patch_embed: Conv2dConfig::new([cfg.channels, cfg.d_model], [p, p])
                .with_stride([p, p])
                .init(device),
            pos_embed: Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([1, cfg.num_patches(), cfg.d_model], device),
            blocks: (0..cfg.vision_layers)
                .map(|_| EncoderBlock::new(cfg, device))
                .collect(),
            ln_final: LayerNormConfig::new(cfg.d_model)
                .with_epsilon(cfg.layer_norm_eps)
                .init(device),
            proj: LinearConfig::new(cfg.d_model, cfg.embed_dim).init(device),
        }
    }

    /// `pixels`: `[B, 3, S, S]`, already normalised to `[-1, 1]`.
    pub fn forward(&self, pixels: Tensor<B, 4>) -> VisionOutput<B> {
        let mut x = crate::conv::patchify(&self.patch_embed, pixels) + self.pos_embed.val();
        for block in &self.blocks {
            x = block.forward(x, None);
        }
        let patch_tokens = self.ln_final.forward(x);
        let pooled = patch_tokens.clone().mean_dim(1).squeeze_dim::<2>(1);
        let y = self.proj.forward(pooled);
        let norm = y.clone().powi_scalar(2).sum_dim(1).add_scalar(1e-12).sqrt();
        VisionOutput {
            patch_tokens,
            embedding: y / norm,
        }
    }
}

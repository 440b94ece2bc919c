//! Text encoder: caption tokens → per-token features `[B, L, D]` (the denoiser's
//! cross-attention memory) and a pooled, L2-normalised embedding `[B, E]` in the same space as
//! the vision encoder's embedding (trained contrastively against it).

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::attention::EncoderBlock;
use crate::caption::MASKED;
use crate::position::{position_param, sincos_1d};
use duet_spec::ModelSpec;

#[derive(Module, Debug)]
pub struct TextEncoder<B: Backend> {
    pub tok_embed: Embedding<B>,
    pub pos_embed: Param<Tensor<B, 3>>,
    pub blocks: Vec<EncoderBlock<B>>,
    pub ln_final: LayerNorm<B>,
    pub proj: Linear<B>,
}

/// Output of the text encoder.
pub struct TextOutput<B: Backend> {
    /// `[B, L, D]`; rows of padding positions are computed but never attended to.
    pub tokens: Tensor<B, 3>,
    /// `[B, E]`, unit L2 norm: mean of the valid token features, projected.
    pub embedding: Tensor<B, 2>,
}

/// Additive key-padding bias `[B, 1, 1, L]` from a `[B, L]` mask of 1 (token) / 0 (padding).
pub fn padding_bias<B: Backend>(mask: Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, l] = mask.dims();
    // (mask − 1) · 1e9: 0 where valid, −1e9 where padded (the exported graph's formula).
    mask.sub_scalar(1.0)
        .mul_scalar(-MASKED)
        .reshape([b, 1, 1, l])
}

impl<B: Backend> TextEncoder<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        Self {
            tok_embed: EmbeddingConfig::new(cfg.vocab_size, cfg.d_model).init(device),
            // Sin-cos init: word order (which colour goes with which shape and place) must be
            // visible from the first step; see `position`.
            pos_embed: position_param(
                sincos_1d(cfg.max_len, cfg.d_model),
                cfg.max_len,
                cfg.d_model,
                device,
            ),
            blocks: (0..cfg.text_layers)
                .map(|_| EncoderBlock::new(cfg, device))
                .collect(),
            ln_final: LayerNormConfig::new(cfg.d_model)
                .with_epsilon(cfg.layer_norm_eps)
                .init(device),
            proj: LinearConfig::new(cfg.d_model, cfg.embed_dim).init(device),
        }
    }

    /// `ids`: `[B, L]` token ids (`L ≤ max_len`); `mask`: `[B, L]`, 1 for tokens, 0 for
    /// padding.
    pub fn forward(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> TextOutput<B> {
        let [b, l] = ids.dims();
        let d = self.pos_embed.dims()[2];
        let pos = self.pos_embed.val().slice([0..1, 0..l, 0..d]);
        let mut x = self.tok_embed.forward(ids) + pos;
        let bias = padding_bias(mask.clone());
        for block in &self.blocks {
            x = block.forward(x, Some(bias.clone()));
        }
        let tokens = self.ln_final.forward(x);
        let m = mask.reshape([b, l, 1]);
        let count = m.clone().sum_dim(1).clamp_min(1.0);
        let pooled = (tokens.clone() * m).sum_dim(1).div(count).reshape([b, d]);
        let y = self.proj.forward(pooled);
        let norm = y.clone().powi_scalar(2).sum_dim(1).add_scalar(1e-12).sqrt();
        TextOutput {
            tokens,
            embedding: y / norm,
        }
    }
}

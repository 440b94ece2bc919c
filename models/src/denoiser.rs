//! DiT-style diffusion denoiser over pixels, conditioned on text tokens by cross-attention and
//! on the timestep by adaptive LayerNorm ("adaLN-zero", Peebles & Xie 2023).
//!
//! `x_t [B, 3, S, S]` is cut into `p × p` patches (a strided convolution, as in the vision
//! encoder), each block modulates its self-attention and MLP inputs with a shift and scale
//! computed from the timestep embedding and gates their outputs (zero-initialised, so every
//! block starts as the identity), cross-attends to the text tokens, and a final modulated
//! LayerNorm + linear layer maps tokens back to pixel patches. The output has the input's shape
//! and means ε or v, whichever the run was trained to predict. With
//! `ModelSpec::denoiser_pooled_text` the masked mean of the text tokens, projected, is added
//! to the timestep embedding too, so the modulation of every block also carries the prompt.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::attention::{Attention, Mlp};
use crate::position::{position_param, sincos_2d};
use crate::text::padding_bias;
use duet_spec::{timestep_frequencies, ModelSpec};

/// Sinusoidal features of integer-valued timesteps: `[cos(t f_i), sin(t f_i)]` with
/// `f_i = P^(−i/half)`, `i < half = dim / 2`. `t`: `[B]` → `[B, dim]`.
pub fn timestep_features<B: Backend>(t: Tensor<B, 1>, dim: usize) -> Tensor<B, 2> {
    let half = dim / 2;
    let freqs: Vec<f32> = timestep_frequencies(dim);
    let [b] = t.dims();
    let f = Tensor::<B, 2>::from_data(TensorData::new(freqs, [1, half]), &t.device());
    let args = t.reshape([b, 1]) * f;
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
}

fn zero_linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// LayerNorm without learnt affine parameters: the modulation supplies scale and shift.
fn plain_ln<B: Backend>(cfg: &ModelSpec, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let mean = x.clone().mean_dim(2);
    let centred = x - mean;
    let var = centred.clone().powi_scalar(2).mean_dim(2);
    centred / var.add_scalar(cfg.layer_norm_eps).sqrt()
}

/// `x · (1 + scale) + shift`, with `[B, D]` modulation broadcast over tokens.
fn modulate<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 2>, scale: Tensor<B, 2>) -> Tensor<B, 3> {
    let [b, d] = shift.dims();
    x * scale.reshape([b, 1, d]).add_scalar(1.0) + shift.reshape([b, 1, d])
}

/// Slice `k` of `n` equal chunks along dim 1 of `[B, n·D]`.
fn chunk<B: Backend>(x: &Tensor<B, 2>, k: usize, n: usize) -> Tensor<B, 2> {
    let [b, nd] = x.dims();
    let d = nd / n;
    x.clone().slice([0..b, k * d..(k + 1) * d])
}

/// Mean of `x [B, L, D]` over the positions where `mask [B, L]` is 1 → `[B, D]`. A row with no
/// valid position (never produced by the tokenizer, which always emits BOS) gives 0.
pub fn masked_mean<B: Backend>(x: Tensor<B, 3>, mask: Tensor<B, 2>) -> Tensor<B, 2> {
    let [b, l, d] = x.dims();
    let summed = (x * mask.clone().reshape([b, l, 1]))
        .sum_dim(1)
        .reshape([b, d]);
    summed / mask.sum_dim(1).clamp_min(1.0)
}

#[derive(Module, Debug)]
pub struct DitBlock<B: Backend> {
    /// `D → 6D`: shift, scale, gate for attention, then for the MLP. Zero-initialised.
    pub ada: Linear<B>,
    pub attn: Attention<B>,
    pub ln_cross: LayerNorm<B>,
    pub cross_attn: Attention<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> DitBlock<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        Self {
            ada: zero_linear(cfg.d_model, 6 * cfg.d_model, device),
            attn: Attention::new(cfg.d_model, cfg.n_heads, device),
            ln_cross: LayerNormConfig::new(cfg.d_model)
                .with_epsilon(cfg.layer_norm_eps)
                .init(device),
            cross_attn: Attention::new(cfg.d_model, cfg.n_heads, device),
            mlp: Mlp::new(cfg.d_model, cfg.denoiser_mlp_hidden(), device),
        }
    }

    /// `c`: `[B, D]` conditioning (SiLU already applied); `text`: `[B, L, D]`;
    /// `text_bias`: `[B, 1, 1, L]`.
    pub fn forward(
        &self,
        cfg: &ModelSpec,
        x: Tensor<B, 3>,
        c: Tensor<B, 2>,
        text: Tensor<B, 3>,
        text_bias: Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let m = self.ada.forward(c);
        let [b, _] = m.dims();
        let d = m.dims()[1] / 6;
        let gate = |k: usize| chunk(&m, k, 6).reshape([b, 1, d]);
        let h = modulate(plain_ln(cfg, x.clone()), chunk(&m, 0, 6), chunk(&m, 1, 6));
        let x = x + self.attn.forward(h.clone(), h, None) * gate(2);
        let h = self.ln_cross.forward(x.clone());
        let x = x + self.cross_attn.forward(h, text, Some(text_bias));
        let h = modulate(plain_ln(cfg, x.clone()), chunk(&m, 3, 6), chunk(&m, 4, 6));
        x + self.mlp.forward(h) * gate(5)
    }
}

#[derive(Module, Debug)]
pub struct Denoiser<B: Backend> {
    pub patch_embed: Conv2d<B>,
    pub pos_embed: Param<Tensor<B, 3>>,
    /// Timestep MLP on the sinusoidal features: `D → D → SiLU → D`.
    pub time_fc1: Linear<B>,
    pub time_fc2: Linear<B>,
    /// `D → D` projection of the pooled text tokens, added to the timestep embedding
    /// (`ModelSpec::denoiser_pooled_text`). Zero-initialised, so it starts as a no-op.
    pub text_pool: Option<Linear<B>>,
    pub blocks: Vec<DitBlock<B>>,
    /// `D → 2D`: shift and scale of the final LayerNorm. Zero-initialised.
    pub final_ada: Linear<B>,
    /// `ModelSpec::denoiser_long_skips`: for each block of the second half, `2D → D` on its
    /// input concatenated with the matching first-half block's output (outermost pair first
    /// applied last, as in U-ViT).
    pub skips: Vec<Linear<B>>,
    /// `D → p·p·C` (zero-initialised so the untrained model predicts 0), or `D → p·p·H` with
    /// `ModelSpec::denoiser_conv_head = Some(H)`.
    pub head: Linear<B>,
    /// The 3×3 convolution `H → C` of the convolutional head, zero-initialised in its place.
    pub out_conv: Option<Conv2d<B>>,
}

impl<B: Backend> Denoiser<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        let p = cfg.denoiser_patch_size;
        let d = cfg.d_model;
        Self {
            patch_embed: Conv2dConfig::new([cfg.channels, d], [p, p])
                .with_stride([p, p])
                .init(device),
            // Sin-cos init: see `position` for why not a small random one.
            pos_embed: position_param(
                sincos_2d(cfg.image_size / p, d),
                cfg.denoiser_tokens(),
                d,
                device,
            ),
            time_fc1: LinearConfig::new(d, d).init(device),
            time_fc2: LinearConfig::new(d, d).init(device),
            text_pool: cfg.denoiser_pooled_text.then(|| zero_linear(d, d, device)),
            blocks: (0..cfg.denoiser_layers)
                .map(|_| DitBlock::new(cfg, device))
                .collect(),
            final_ada: zero_linear(d, 2 * d, device),
            skips: (0..cfg.denoiser_long_skip_count())
                .map(|_| LinearConfig::new(2 * d, d).init(device))
                .collect(),
            head: match cfg.denoiser_conv_head {
                None => zero_linear(d, p * p * cfg.channels, device),
                // The linear layer starts random so the convolution's input carries signal;
                // the zero convolution keeps the untrained prediction at 0.
                Some(h) => LinearConfig::new(d, p * p * h).init(device),
            },
            out_conv: cfg.denoiser_conv_head.map(|h| {
                Conv2dConfig::new([h, cfg.channels], [3, 3])
                    .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_initializer(Initializer::Zeros)
                    .init(device)
            }),
        }
    }

    /// `x`: `[B, C, S, S]` noisy image; `t`: `[B]` timesteps (integers as floats);
    /// `text`: `[B, L, D]` text-encoder tokens; `text_mask`: `[B, L]` 1/0.
    pub fn forward(
        &self,
        cfg: &ModelSpec,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        text: Tensor<B, 3>,
        text_mask: Tensor<B, 2>,
    ) -> Tensor<B, 4> {
        let [b, c, s, _] = x.dims();
        let p = cfg.denoiser_patch_size;
        let g = s / p;
        let d = cfg.d_model;
        let mut h = crate::conv::patchify(&self.patch_embed, x) + self.pos_embed.val();
        let temb = self
            .time_fc2
            .forward(silu(self.time_fc1.forward(timestep_features(t, d))));
        let temb = match &self.text_pool {
            Some(proj) => temb + proj.forward(masked_mean(text.clone(), text_mask.clone())),
            None => temb,
        };
        let cond = silu(temb);
        let bias = padding_bias(text_mask);
        let n = self.blocks.len();
        let k = self.skips.len();
        let mut saved = Vec::with_capacity(k);
        for (i, block) in self.blocks.iter().enumerate() {
            // Blocks n-k.. read the outputs of blocks ..k in reverse order (U-ViT).
            if i >= n - k {
                let skip: Tensor<B, 3> = saved.pop().expect("one saved output per skip");
                h = self.skips[i - (n - k)].forward(Tensor::cat(vec![h, skip], 2));
            }
            h = block.forward(cfg, h, cond.clone(), text.clone(), bias.clone());
            if i < k {
                saved.push(h.clone());
            }
        }
        let m = self.final_ada.forward(cond);
        let h = modulate(plain_ln(cfg, h), chunk(&m, 0, 2), chunk(&m, 1, 2));
        // [B, g·g, p·p·H] → [B, g, g, p, p, H] → [B, H, g, p, g, p] → [B, H, S, S]
        let hc = cfg.denoiser_conv_head.unwrap_or(c);
        let out = self.head.forward(h).reshape([b, g, g, p, p, hc]);
        let out = out.permute([0, 5, 1, 3, 2, 4]).reshape([b, hc, s, s]);
        match &self.out_conv {
            Some(conv) => crate::conv::conv3x3_same(conv, silu(out)),
            None => out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::TextEncoder;
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, Int};
    use duet_spec::Preset;

    type B = NdArray<f32>;

    fn cfg() -> ModelSpec {
        ModelSpec::preset(Preset::Tiny, 30, 32)
    }

    #[test]
    fn untrained_denoiser_predicts_zero_with_the_input_shape() {
        let cfg = cfg();
        let dev = Default::default();
        let d = Denoiser::<B>::new(&cfg, &dev);
        let x = Tensor::<B, 4>::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &dev);
        let t = Tensor::<B, 1>::from_data(TensorData::new(vec![10.0f32, 900.0], [2]), &dev);
        let text = Tensor::<B, 3>::random([2, 5, cfg.d_model], Distribution::Default, &dev);
        let mask = Tensor::<B, 2>::ones([2, 5], &dev);
        let out = d.forward(&cfg, x, t, text, mask);
        assert_eq!(out.dims(), [2, 3, 32, 32]);
        // adaLN-zero: gates and head start at zero, so the prediction is exactly 0.
        assert_eq!(out.abs().max().into_scalar(), 0.0);
    }

    #[test]
    fn skips_and_conv_head_keep_the_untrained_prediction_at_zero() {
        let dev = Default::default();
        for layers in [2, 3, 4] {
            let cfg = ModelSpec {
                denoiser_layers: layers,
                denoiser_long_skips: true,
                denoiser_conv_head: Some(8),
                ..cfg()
            };
            let d = Denoiser::<B>::new(&cfg, &dev);
            assert_eq!(d.skips.len(), layers / 2);
            let x = Tensor::<B, 4>::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &dev);
            let t = Tensor::<B, 1>::from_data(TensorData::new(vec![10.0f32, 900.0], [2]), &dev);
            let text = Tensor::<B, 3>::random([2, 5, cfg.d_model], Distribution::Default, &dev);
            let mask = Tensor::<B, 2>::ones([2, 5], &dev);
            let out = d.forward(&cfg, x.clone(), t.clone(), text.clone(), mask.clone());
            assert_eq!(out.dims(), [2, 3, 32, 32]);
            assert_eq!(out.abs().max().into_scalar(), 0.0);
            // With a non-zero convolution the output depends on the input.
            let mut d = d;
            let conv = d.out_conv.take().unwrap();
            let w = conv.weight.val().ones_like().mul_scalar(0.01);
            d.out_conv = Some(burn::nn::conv::Conv2d {
                weight: Param::from_tensor(w),
                ..conv
            });
            let out = d.forward(&cfg, x, t, text, mask);
            assert!(out.abs().max().into_scalar() > 0.0);
        }
    }

    #[test]
    fn unpatchify_inverts_patchify_order() {
        // With identity-like weights the head's output layout must map patch (gy, gx), pixel
        // (py, px), channel c to image position (c, gy·p + py, gx·p + px).
        let (b, g, p, c) = (1, 2, 3, 2);
        let data: Vec<f32> = (0..b * g * g * p * p * c).map(|v| v as f32).collect();
        let dev = Default::default();
        let out = Tensor::<B, 3>::from_data(TensorData::new(data, [b, g * g, p * p * c]), &dev)
            .reshape([b, g, g, p, p, c])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, c, g * p, g * p]);
        let v = out.into_data().into_vec::<f32>().unwrap();
        let at = |ch: usize, y: usize, x: usize| v[ch * 36 + y * 6 + x];
        // patch (1, 0), pixel (2, 1), channel 1 → token 2, feature (2·3 + 1)·2 + 1 = 15.
        assert_eq!(at(1, 3 + 2, 1), (2 * 18 + 15) as f32);
    }

    #[test]
    fn timestep_features_are_cos_then_sin() {
        let dev = Default::default();
        let t = Tensor::<B, 1>::from_data(TensorData::new(vec![0.0f32, 3.0], [2]), &dev);
        let f = timestep_features(t, 8)
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        assert_eq!(&f[..8], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        assert!((f[8] - 3.0f32.cos()).abs() < 1e-6);
        assert!((f[12] - 3.0f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn text_features_ignore_padding() {
        let cfg = cfg();
        let dev = Default::default();
        let enc = TextEncoder::<B>::new(&cfg, &dev);
        let ids = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, n]), &dev)
        };
        let mask = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B, 2>::from_data(TensorData::new(v, [1, n]), &dev)
        };
        let short = enc.forward(ids(vec![1, 7, 9, 2]), mask(vec![1.0; 4]));
        let padded = enc.forward(
            ids(vec![1, 7, 9, 2, 0, 0, 0]),
            mask(vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]),
        );
        let diff = (short.embedding.clone() - padded.embedding)
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-5, "{diff}");
        let norm = short.embedding.powi_scalar(2).sum().sqrt().into_scalar();
        assert!((norm - 1.0).abs() < 1e-5);
        let tok_diff = (short.tokens - padded.tokens.slice([0..1, 0..4, 0..cfg.d_model]))
            .abs()
            .max()
            .into_scalar();
        assert!(tok_diff < 1e-5, "{tok_diff}");
    }
}

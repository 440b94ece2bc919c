//! Pre-norm transformer pieces shared by the encoders, the caption decoder and the denoiser.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use duet_spec::ModelSpec;

use crate::activation::gelu;

/// Multi-head attention with separate `q`, `k`, `v`, `out` projections (`D → D`).
///
/// Written out instead of using `burn::nn::attention::MultiHeadAttention` so that the
/// parameter layout and the op order match the ONNX graph the exporter builds, op for op.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub out: Linear<B>,
    pub n_heads: usize,
}

impl<B: Backend> Attention<B> {
    pub fn new(d_model: usize, n_heads: usize, device: &B::Device) -> Self {
        let lin = || LinearConfig::new(d_model, d_model).init(device);
        Self {
            q: lin(),
            k: lin(),
            v: lin(),
            out: lin(),
            n_heads,
        }
    }

    /// `[B, N, D] → [B, H, N, Dh]`.
    pub fn split_heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, n, d] = x.dims();
        x.reshape([b, n, self.n_heads, d / self.n_heads])
            .swap_dims(1, 2)
    }

    /// Projects keys and values of `kv_in` and splits them into heads.
    pub fn keys_values(&self, kv_in: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (
            self.split_heads(self.k.forward(kv_in.clone())),
            self.split_heads(self.v.forward(kv_in)),
        )
    }

    /// Attention of `q_in` over already projected keys/values, with an optional additive bias
    /// broadcast to `[B, H, Nq, Nk]`.
    pub fn attend(
        &self,
        q_in: Tensor<B, 3>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        let [b, nq, d] = q_in.dims();
        let dh = d / self.n_heads;
        let q = self.split_heads(self.q.forward(q_in));
        let mut scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dh as f64).sqrt());
        if let Some(bias) = bias {
            scores = scores + bias;
        }
        let ctx = softmax(scores, 3).matmul(v);
        let merged = ctx.swap_dims(1, 2).reshape([b, nq, d]);
        self.out.forward(merged)
    }

    /// Plain (self or cross) attention without cache.
    pub fn forward(
        &self,
        q_in: Tensor<B, 3>,
        kv_in: Tensor<B, 3>,
        bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        let (k, v) = self.keys_values(kv_in);
        self.attend(q_in, k, v, bias)
    }
}

/// `fc1 → GELU (erf form) → fc2`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn new(d_model: usize, hidden: usize, device: &B::Device) -> Self {
        Self {
            fc1: LinearConfig::new(d_model, hidden).init(device),
            fc2: LinearConfig::new(hidden, d_model).init(device),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

/// Pre-norm transformer encoder block (self-attention + MLP): the vision encoder's and the
/// text encoder's layer.
#[derive(Module, Debug)]
pub struct EncoderBlock<B: Backend> {
    pub ln1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub ln2: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> EncoderBlock<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        let ln = || {
            LayerNormConfig::new(cfg.d_model)
                .with_epsilon(cfg.layer_norm_eps)
                .init(device)
        };
        Self {
            ln1: ln(),
            attn: Attention::new(cfg.d_model, cfg.n_heads, device),
            ln2: ln(),
            mlp: Mlp::new(cfg.d_model, cfg.mlp_hidden(), device),
        }
    }

    /// `bias`: optional additive attention bias broadcast to `[B, H, N, N]` (key padding).
    pub fn forward(&self, x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let h = self.ln1.forward(x.clone());
        let x = x + self.attn.forward(h.clone(), h, bias);
        let h = self.ln2.forward(x.clone());
        x + self.mlp.forward(h)
    }
}

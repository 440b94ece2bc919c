//! Dream queries (DreamLLM, Dong et al. 2024): `K` learnable embeddings appended after the
//! caption decoder's prompt. The decoder reads them like tokens (causal self-attention over
//! `[BOS] prompt` and the earlier queries, cross-attention to the image), and their last-layer
//! states, projected and normalised, are the `[B, K, D]` memory the denoiser cross-attends
//! to in place of the text encoder's tokens. So the model that answers questions about an
//! image is also the one that says what to draw: from a blank image and a caption
//! (generation), or from an image and an instruction (editing).
//!
//! The queries take no position embedding: each is its own learnt vector, and causal
//! attention already orders them after the prompt.

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::caption::{causal_bias, CaptionDecoder};
use crate::text::padding_bias;
use duet_spec::ModelSpec;

#[derive(Module, Debug)]
pub struct DreamQueries<B: Backend> {
    /// `[1, K, D]`, initialised small (normal, std 0.02, as BLIP-2 starts its queries): the
    /// LayerNorms make a query's own scale irrelevant to what it attends to, and a small
    /// query leaves its residual stream to what it read from the prompt and the image, so the
    /// conditioning depends on the prompt from the first step. (Unit-normal queries, the
    /// token embeddings' scale, measured: the spread of the pooled conditioning across prompts
    /// was a fifth of the text encoder's, before and after 600 steps.)
    pub queries: Param<Tensor<B, 3>>,
    /// `D → D` from the decoder's (already LayerNorm-ed) states to the denoiser's
    /// conditioning space. No LayerNorm after it: measured, one there made the pooled
    /// conditioning shrink towards one vector for every prompt (its scale can only follow the
    /// caption's by shrinking), while the plain projection followed the text path's
    /// predictions 2.5× closer within 300 steps.
    pub proj: Linear<B>,
}

impl<B: Backend> DreamQueries<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        let (k, d) = (cfg.dream_queries, cfg.d_model);
        Self {
            queries: Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([1, k, d], device),
            proj: LinearConfig::new(d, d).init(device),
        }
    }

    /// `prefix_ids` `[B, P]`: `[BOS]` + prompt, padded with PAD; `prefix_mask` `[B, P]`: 1 for
    /// tokens, 0 for padding (padding is never attended to); `image_tokens` `[B, N, D]`.
    /// Returns the denoiser's conditioning `[B, P + K, D]`: the prompt's positions, then the
    /// queries'; its key mask is [`dream_mask`] of `prefix_mask`.
    pub fn forward(
        &self,
        decoder: &CaptionDecoder<B>,
        prefix_ids: Tensor<B, 2, Int>,
        prefix_mask: Tensor<B, 2>,
        image_tokens: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let [b, p] = prefix_ids.dims();
        let [_, k, d] = self.queries.dims();
        let device = prefix_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..p as i64, &device)
            .reshape([1, p])
            .expand([b, p]);
        let x = Tensor::cat(
            vec![
                decoder.embed(prefix_ids, positions),
                self.queries.val().expand([b, k, d]),
            ],
            1,
        );
        let bias = causal_bias::<B>(p + k, 0, &device) + padding_bias(dream_mask(prefix_mask, k));
        let (hidden, _) = decoder.forward_hidden(x, bias, image_tokens, None);
        self.proj.forward(hidden)
    }
}

/// The key mask `[B, P + K]` of the dream conditioning: the prompt's mask, then the `k`
/// queries (always valid).
pub fn dream_mask<B: Backend>(prefix_mask: Tensor<B, 2>, k: usize) -> Tensor<B, 2> {
    let [b, _] = prefix_mask.dims();
    let device = prefix_mask.device();
    Tensor::cat(vec![prefix_mask, Tensor::ones([b, k], &device)], 1)
}

/// What the dream stage trains: the caption decoder and the queries (the vision encoder, text
/// encoder and denoiser stay frozen beside it).
#[derive(Module, Debug)]
pub struct DreamModel<B: Backend> {
    pub decoder: CaptionDecoder<B>,
    pub dream: DreamQueries<B>,
}

impl<B: Backend> DreamModel<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        Self {
            decoder: CaptionDecoder::new(cfg, device),
            dream: DreamQueries::new(cfg, device),
        }
    }

    /// [`DreamQueries::forward`] through this model's decoder: the conditioning `[B, P + K, D]`
    /// (its mask is [`dream_mask`]).
    pub fn condition(
        &self,
        prefix_ids: Tensor<B, 2, Int>,
        prefix_mask: Tensor<B, 2>,
        image_tokens: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        self.dream
            .forward(&self.decoder, prefix_ids, prefix_mask, image_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, TensorData};
    use duet_spec::Preset;

    type B = NdArray<f32>;

    #[test]
    fn padding_and_later_prompts_do_not_leak_into_the_queries() {
        let cfg = ModelSpec {
            dream_queries: 3,
            ..ModelSpec::preset(Preset::Tiny, 30, 32)
        };
        let dev = Default::default();
        let decoder = CaptionDecoder::<B>::new(&cfg, &dev);
        let dream = DreamQueries::<B>::new(&cfg, &dev);
        let image = Tensor::<B, 3>::random([1, 16, cfg.d_model], Distribution::Default, &dev);
        let ids = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, n]), &dev)
        };
        let mask = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B, 2>::from_data(TensorData::new(v, [1, n]), &dev)
        };
        let short = dream.forward(
            &decoder,
            ids(vec![1, 7, 9]),
            mask(vec![1.0; 3]),
            image.clone(),
        );
        assert_eq!(short.dims(), [1, 3 + 3, cfg.d_model]);
        let padded = dream.forward(
            &decoder,
            ids(vec![1, 7, 9, 0, 0]),
            mask(vec![1.0, 1.0, 1.0, 0.0, 0.0]),
            image.clone(),
        );
        // The valid positions (prompt, then queries) agree; the padded ones are masked.
        let d = cfg.d_model;
        let valid = Tensor::cat(
            vec![
                padded.clone().slice([0..1, 0..3, 0..d]),
                padded.slice([0..1, 5..8, 0..d]),
            ],
            1,
        );
        let diff = (short.clone() - valid).abs().max().into_scalar();
        assert!(diff < 1e-5, "padding changed the queries by {diff}");
        // Another prompt gives other conditioning: the queries read the prompt.
        let other = dream.forward(&decoder, ids(vec![1, 7, 8]), mask(vec![1.0; 3]), image);
        let moved = (short - other).abs().max().into_scalar();
        assert!(moved > 1e-3, "{moved}");
    }
}

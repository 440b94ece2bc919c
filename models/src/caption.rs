//! Causal caption decoder with cross-attention to the image's patch tokens, and the
//! `CaptionModel` (vision encoder + decoder) that the caption stage trains.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::attention::{Attention, Mlp};
use crate::vision::VisionEncoder;
use duet_spec::ModelSpec;

/// Additive mask value for disallowed attention (matches the runtime's `attn_bias`).
pub const MASKED: f32 = -1e9;

#[derive(Module, Debug)]
pub struct DecoderBlock<B: Backend> {
    pub ln1: LayerNorm<B>,
    pub self_attn: Attention<B>,
    pub ln2: LayerNorm<B>,
    pub cross_attn: Attention<B>,
    pub ln3: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

/// Per-layer keys and values `[B, H, T, Dh]` of everything decoded so far.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub keys: Vec<Tensor<B, 4>>,
    pub values: Vec<Tensor<B, 4>>,
}

impl<B: Backend> KvCache<B> {
    pub fn len(&self) -> usize {
        self.keys.first().map(|k| k.dims()[2]).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<B: Backend> DecoderBlock<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        let ln = || {
            LayerNormConfig::new(cfg.d_model)
                .with_epsilon(cfg.layer_norm_eps)
                .init(device)
        };
        Self {
            ln1: ln(),
            self_attn: Attention::new(cfg.d_model, cfg.n_heads, device),
            ln2: ln(),
            cross_attn: Attention::new(cfg.d_model, cfg.n_heads, device),
            ln3: ln(),
            mlp: Mlp::new(cfg.d_model, cfg.mlp_hidden(), device),
        }
    }

    /// One block; returns the new hidden state and this layer's full keys/values.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        image_tokens: Tensor<B, 3>,
        bias: Tensor<B, 4>,
        past: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> (Tensor<B, 3>, Tensor<B, 4>, Tensor<B, 4>) {
        let h = self.ln1.forward(x.clone());
        let (k, v) = self.self_attn.keys_values(h.clone());
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        let x = x + self.self_attn.attend(h, k.clone(), v.clone(), Some(bias));
        let h = self.ln2.forward(x.clone());
        let x = x + self.cross_attn.forward(h, image_tokens, None);
        let h = self.ln3.forward(x.clone());
        (x + self.mlp.forward(h), k, v)
    }
}

#[derive(Module, Debug)]
pub struct CaptionDecoder<B: Backend> {
    pub tok_embed: Embedding<B>,
    pub pos_embed: Embedding<B>,
    pub blocks: Vec<DecoderBlock<B>>,
    pub ln_final: LayerNorm<B>,
    pub lm_head: Linear<B>,
}

/// Causal additive bias `[1, 1, S, past + S]`: query `i` sees key `j` iff `j <= past + i`.
pub fn causal_bias<B: Backend>(seq: usize, past: usize, device: &B::Device) -> Tensor<B, 4> {
    let total = past + seq;
    let mut data = vec![0.0f32; seq * total];
    for i in 0..seq {
        for j in 0..total {
            if j > past + i {
                data[i * total + j] = MASKED;
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [1, 1, seq, total]), device)
}

impl<B: Backend> CaptionDecoder<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        Self {
            tok_embed: EmbeddingConfig::new(cfg.vocab_size, cfg.d_model).init(device),
            pos_embed: EmbeddingConfig::new(cfg.max_len, cfg.d_model).init(device),
            blocks: (0..cfg.decoder_layers)
                .map(|_| DecoderBlock::new(cfg, device))
                .collect(),
            ln_final: LayerNormConfig::new(cfg.d_model)
                .with_epsilon(cfg.layer_norm_eps)
                .init(device),
            lm_head: LinearConfig::new(cfg.d_model, cfg.vocab_size).init(device),
        }
    }

    /// One decoding call, exactly the exported graph's contract: `input_ids`/`position_ids`
    /// `[B, S]`, `attn_bias` broadcastable to `[B, 1, S, past + S]`. Returns logits `[B, S, V]`
    /// and the cache extended by these `S` positions.
    pub fn forward_step(
        &self,
        input_ids: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
        attn_bias: Tensor<B, 4>,
        image_tokens: Tensor<B, 3>,
        past: Option<&KvCache<B>>,
    ) -> (Tensor<B, 3>, KvCache<B>) {
        let x = self.embed(input_ids, position_ids);
        let (hidden, cache) = self.forward_hidden(x, attn_bias, image_tokens, past);
        (self.lm_head.forward(hidden), cache)
    }

    /// Token + position embeddings `[B, S, D]` of `input_ids` at `position_ids`.
    pub fn embed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        self.tok_embed.forward(input_ids) + self.pos_embed.forward(position_ids)
    }

    /// The blocks and the final LayerNorm over input embeddings `x` `[B, S, D]` (token
    /// embeddings, or the dream queries appended to them): last-layer states `[B, S, D]`
    /// before the language-model head, and the extended cache.
    pub fn forward_hidden(
        &self,
        mut x: Tensor<B, 3>,
        attn_bias: Tensor<B, 4>,
        image_tokens: Tensor<B, 3>,
        past: Option<&KvCache<B>>,
    ) -> (Tensor<B, 3>, KvCache<B>) {
        let mut keys = Vec::with_capacity(self.blocks.len());
        let mut values = Vec::with_capacity(self.blocks.len());
        for (l, block) in self.blocks.iter().enumerate() {
            let layer_past = past.map(|c| (c.keys[l].clone(), c.values[l].clone()));
            let (nx, k, v) = block.forward(x, image_tokens.clone(), attn_bias.clone(), layer_past);
            x = nx;
            keys.push(k);
            values.push(v);
        }
        (self.ln_final.forward(x), KvCache { keys, values })
    }

    /// Teacher-forced logits for a whole sequence `[B, S]` (training and full recomputation).
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        image_tokens: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        let bias = causal_bias::<B>(s, 0, &device);
        self.forward_step(input_ids, positions, bias, image_tokens, None)
            .0
    }
}

/// Vision encoder + caption decoder: the module the caption stage trains and checkpoints.
#[derive(Module, Debug)]
pub struct CaptionModel<B: Backend> {
    pub vision: VisionEncoder<B>,
    pub decoder: CaptionDecoder<B>,
}

impl<B: Backend> CaptionModel<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        Self {
            vision: VisionEncoder::new(cfg, device),
            decoder: CaptionDecoder::new(cfg, device),
        }
    }

    /// Greedy decoding with the KV cache; returns token ids per image without BOS, up to and
    /// excluding EOS, at most `max_len - 1` tokens.
    pub fn greedy(
        &self,
        pixels: Tensor<B, 4>,
        bos: u32,
        eos: u32,
        max_len: usize,
    ) -> Vec<Vec<u32>> {
        let b = pixels.dims()[0];
        self.greedy_after(pixels, &vec![Vec::new(); b], bos, eos, max_len)
    }

    /// Greedy decoding after a prompt per image (a question): each image's prompt tokens are
    /// fed one per step (forced) before its own tokens are chosen, so prompts of different
    /// lengths share the batch. Returns the tokens chosen after each prompt, up to and
    /// excluding EOS; BOS + prompt + tokens stay within `max_len`.
    pub fn greedy_after(
        &self,
        pixels: Tensor<B, 4>,
        prompts: &[Vec<u32>],
        bos: u32,
        eos: u32,
        max_len: usize,
    ) -> Vec<Vec<u32>> {
        let device = pixels.device();
        let image_tokens = self.vision.forward(pixels).patch_tokens;
        let b = image_tokens.dims()[0];
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done: Vec<bool> = (0..b)
            .map(|i| prompts.get(i).map_or(0, Vec::len) + 1 >= max_len)
            .collect();
        let mut next: Vec<i64> = vec![bos as i64; b];
        let mut cache: Option<KvCache<B>> = None;
        for step in 0..max_len.saturating_sub(1) {
            if done.iter().all(|d| *d) {
                break;
            }
            let ids =
                Tensor::<B, 2, Int>::from_data(TensorData::new(next.clone(), [b, 1]), &device);
            let pos = Tensor::<B, 2, Int>::from_data(
                TensorData::new(vec![step as i64; b], [b, 1]),
                &device,
            );
            let bias = Tensor::<B, 4>::zeros([b, 1, 1, step + 1], &device);
            let (logits, new_cache) =
                self.decoder
                    .forward_step(ids, pos, bias, image_tokens.clone(), cache.as_ref());
            cache = Some(new_cache);
            let arg = logits
                .argmax(2)
                .into_data()
                .convert::<i64>()
                .into_vec::<i64>()
                .unwrap_or_default();
            for i in 0..b {
                let prompt = prompts.get(i).map_or(&[][..], Vec::as_slice);
                // Still reading the prompt: the next input is its next token, whatever the
                // model predicted.
                if let Some(&forced) = prompt.get(step) {
                    next[i] = i64::from(forced);
                    continue;
                }
                let tok = arg.get(i).copied().unwrap_or(eos as i64);
                if !done[i] {
                    if tok as u32 == eos {
                        done[i] = true;
                    } else {
                        out[i].push(tok as u32);
                    }
                }
                next[i] = tok;
            }
        }
        out
    }
}

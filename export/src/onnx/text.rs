//! `text_encoder.onnx`: caption tokens → per-token features (the denoiser's cross-attention
//! memory) and the pooled, L2-normalised text embedding.

use tract_onnx::pb::ModelProto;

use duet_runtime::manifest::Graph;

use super::builder::{DType, Dim, GraphBuilder};
use super::vision::encoder_block;
use super::{ExportError, ModelSpec, Weights};

/// Builds the text encoder (`TextEncoder` in `duet-models`):
/// `input_ids [batch, max_len]` i64 and `attn_mask [batch, max_len]` f32 (1 token, 0 padding)
/// → `text_tokens [batch, max_len, D]`, `text_embedding [batch, E]`.
///
/// The sequence axis is fixed at `max_len` so the learnt position table is used whole (no
/// Shape/Slice arithmetic in the graph). Padding positions are masked out of every attention,
/// so the features of real tokens do not depend on how much padding follows them: the runtime
/// may cut `text_tokens` to the longest caption of a batch before the denoiser.
pub fn build_text_encoder(weights: &Weights, dims: &ModelSpec) -> Result<ModelProto, ExportError> {
    super::validate_dims(dims)?;
    let d = dims.d_model;
    let l = dims.max_len;
    let eps = dims.layer_norm_eps as f32;

    let mut g = GraphBuilder::new(weights);
    g.set_doc(format!(
        "duet text encoder (docs/ARCHITECTURE.md): {layers} pre-norm blocks with key-padding \
         mask, d_model {d}, {h} heads, max_len {l}; outputs token features and an \
         L2-normalised embedding (masked mean, projected).",
        layers = dims.text_layers,
        h = dims.n_heads,
    ));
    let batch = Dim::Sym("batch");
    let ids = g.input("input_ids", DType::I64, &[batch.clone(), Dim::Fixed(l)])?;
    let mask = g.input("attn_mask", DType::F32, &[batch.clone(), Dim::Fixed(l)])?;

    let tok = g.param("text.tok_embed.weight", &[dims.vocab_size, d])?;
    let pos = g.param("text.pos_embed", &[1, l, d])?;
    let mut x = g.scoped("text.embed", |g| {
        let t = g.gather(&tok, &ids);
        g.add(&t, &pos)
    });
    // (mask − 1) · 1e9 as [B, 1, 1, L]: 0 on tokens, −1e9 on padding (`padding_bias`).
    let bias = g.scoped("text.padding_bias", |g| g.padding_bias(&mask));
    for i in 0..dims.text_layers {
        x = encoder_block(&mut g, &x, &format!("text.blocks.{i}"), dims, Some(&bias))?;
    }
    let tokens = g.layer_norm(&x, "text.ln_final", d, eps)?;
    g.output(
        &tokens,
        "text_tokens",
        DType::F32,
        &[batch.clone(), Dim::Fixed(l), Dim::Fixed(d)],
    )?;

    // Masked mean over tokens: Σ tokens·mask / max(Σ mask, 1).
    let pooled = g.scoped("text.pool", |g| {
        let m = g.reshape(&mask, &[0, l as i64, 1]);
        let masked = g.mul(&tokens, &m);
        let sum = g.reduce_sum(&masked, &[1], false);
        let count = g.reduce_sum(&m, &[1], false);
        let one = g.scalar_f32("one", 1.0);
        let count = g.max(&count, &one);
        g.div(&sum, &count)
    });
    let y = g.linear(&pooled, "text.proj", d, dims.embed_dim)?;
    let emb = g.scoped("text.l2norm", |g| g.l2_normalize(&y));
    g.output(
        &emb,
        "text_embedding",
        DType::F32,
        &[batch, Dim::Fixed(dims.embed_dim)],
    )?;
    g.check_all_used("text.", Graph::TextEncoder.name())?;
    Ok(g.finish(Graph::TextEncoder.name()))
}

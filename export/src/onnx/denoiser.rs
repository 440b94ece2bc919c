//! `denoiser.onnx`: one evaluation of the DiT diffusion denoiser (`Denoiser` in
//! `duet-models`), the graph a sampler calls once per step.

use tract_onnx::pb::ModelProto;

use duet_runtime::manifest::Graph;

use super::builder::{DType, Dim, GraphBuilder, GraphValue};
use super::{ExportError, ModelSpec, Weights};

/// `x · (1 + scale) + shift` with `[B, D]` modulation broadcast over tokens.
fn modulate(
    g: &mut GraphBuilder<'_>,
    x: &GraphValue,
    shift: &GraphValue,
    scale: &GraphValue,
    d: usize,
) -> GraphValue {
    let one = g.scalar_f32("one", 1.0);
    let scale = g.reshape(scale, &[0, 1, d as i64]);
    let shift = g.reshape(shift, &[0, 1, d as i64]);
    let s1 = g.add(&scale, &one);
    let y = g.mul(x, &s1);
    g.add(&y, &shift)
}

/// Builds the denoiser: `x [batch, C, S, S]` (the noisy image), `timestep [batch]` f32 (integer
/// training timesteps), `text_tokens [batch, seq, D]` (the text encoder's features),
/// `text_mask [batch, seq]` f32 → `prediction [batch, C, S, S]` (ε or v, as the manifest's
/// `diffusion.prediction` says).
///
/// `batch` is symbolic so classifier-free guidance runs the conditional and unconditional
/// branch as one batch of 2N; `seq` is symbolic so the runtime can drop trailing padding.
pub fn build_denoiser(weights: &Weights, dims: &ModelSpec) -> Result<ModelProto, ExportError> {
    super::validate_dims(dims)?;
    let d = dims.d_model;
    let c = dims.channels;
    let s = dims.image_size;
    let p = dims.denoiser_patch_size;
    if p == 0 || !s.is_multiple_of(p) || dims.denoiser_layers == 0 {
        return Err(ExportError::InvalidDims(format!(
            "denoiser_patch_size {p} must divide image_size {s}, and denoiser_layers must be > 0"
        )));
    }
    let side = s / p;
    let n_tok = side * side;
    let eps = dims.layer_norm_eps as f32;

    let mut g = GraphBuilder::new(weights);
    g.set_doc(format!(
        "duet diffusion denoiser (docs/ARCHITECTURE.md): DiT with adaLN-zero, image {s}x{s}, \
         patch {p}, d_model {d}, {l} blocks (modulated self-attention, cross-attention to text \
         tokens, modulated MLP), {h} heads.",
        l = dims.denoiser_layers,
        h = dims.n_heads,
    ));
    let batch = Dim::Sym("batch");
    let img = [batch.clone(), Dim::Fixed(c), Dim::Fixed(s), Dim::Fixed(s)];
    let x = g.input("x", DType::F32, &img)?;
    let t = g.input("timestep", DType::F32, std::slice::from_ref(&batch))?;
    let text = g.input(
        "text_tokens",
        DType::F32,
        &[batch.clone(), Dim::Sym("seq"), Dim::Fixed(d)],
    )?;
    let mask = g.input("text_mask", DType::F32, &[batch, Dim::Sym("seq")])?;

    // Patch embedding → [B, T, D] + positions.
    let w = g.param("denoiser.patch_embed.weight", &[d, c, p, p])?;
    let b = g.param("denoiser.patch_embed.bias", &[d])?;
    let pos = g.param("denoiser.pos_embed", &[1, n_tok, d])?;
    let mut h = g.scoped("denoiser.patch_embed", |g| {
        let y = g.patch_embed(&x, &w, &b, [c, s, p, d]);
        g.add(&y, &pos)
    });

    // Timestep embedding: [cos(t f), sin(t f)] → fc1 → SiLU → fc2, then SiLU (the modulation
    // input of every block).
    let half = d / 2;
    let freqs = duet_models::timestep_frequencies(d);
    let freqs = g.const_f32("timestep_freqs", &[1, half], &freqs)?;
    let feats = g.scoped("denoiser.timestep", |g| {
        let tt = g.reshape(&t, &[-1, 1]);
        let args = g.mul(&tt, &freqs);
        let cos = g.cos(&args);
        let sin = g.sin(&args);
        g.concat(&[&cos, &sin], 1)
    });
    let temb = g.linear(&feats, "denoiser.time_fc1", d, d)?;
    let temb = g.silu(&temb);
    let mut temb = g.linear(&temb, "denoiser.time_fc2", d, d)?;
    if dims.denoiser_pooled_text {
        // Masked mean of the text tokens (the mask sum is at least 1: BOS is always there;
        // the Max keeps a hand-made all-zero mask finite, as Burn's clamp does).
        let pooled = g.scoped("denoiser.text_mean", |g| {
            let m = g.reshape(&mask, &[0, -1, 1]);
            let masked = g.mul(&text, &m);
            let sum = g.reduce_sum(&masked, &[1], false);
            let count = g.reduce_sum(&mask, &[1], true);
            let one = g.scalar_f32("one", 1.0);
            let count = g.max(&count, &one);
            g.div(&sum, &count)
        });
        let proj = g.linear(&pooled, "denoiser.text_pool", d, d)?;
        temb = g.add(&temb, &proj);
    }
    let cond = g.silu(&temb);

    let bias = g.scoped("denoiser.padding_bias", |g| g.padding_bias(&mask));

    let n = dims.denoiser_layers;
    let k = dims.denoiser_long_skip_count();
    let mut saved: Vec<GraphValue> = Vec::with_capacity(k);
    for i in 0..n {
        let pre = format!("denoiser.blocks.{i}");
        // U-ViT: blocks n-k.. read the outputs of blocks ..k, innermost pair first.
        if i >= n - k {
            let skip = saved.pop().ok_or_else(|| {
                ExportError::InvalidDims("long skip without a saved block output".into())
            })?;
            let joined = g.concat(&[&h, &skip], 2);
            h = g.linear(
                &joined,
                &format!("denoiser.skips.{}", i - (n - k)),
                2 * d,
                d,
            )?;
        }
        let ada = format!("{pre}.ada");
        let m: Vec<GraphValue> = (0..6)
            .map(|k| g.linear_chunk(&cond, &ada, d, d, k, 6))
            .collect::<Result<_, _>>()?;
        let gate = |g: &mut GraphBuilder<'_>, v: &GraphValue| g.reshape(v, &[0, 1, d as i64]);
        // Self-attention, modulated and gated.
        let hn = g.plain_layer_norm(&h, d, eps)?;
        let hn = modulate(&mut g, &hn, &m[0], &m[1], d);
        let a = g.mha(&hn, &hn, &format!("{pre}.attn"), dims.n_heads, None, None)?;
        let g2 = gate(&mut g, &m[2]);
        let a = g.mul(&a.out, &g2);
        h = g.add(&h, &a);
        // Cross-attention to the text tokens (plain pre-norm residual).
        h = g.residual(&h, |g, h| {
            let hn = g.layer_norm(h, &format!("{pre}.ln_cross"), d, eps)?;
            Ok(g.mha(
                &hn,
                &text,
                &format!("{pre}.cross_attn"),
                dims.n_heads,
                Some(&bias),
                None,
            )?
            .out)
        })?;
        // MLP, modulated and gated.
        let hn = g.plain_layer_norm(&h, d, eps)?;
        let hn = modulate(&mut g, &hn, &m[3], &m[4], d);
        let y = g.mlp(&hn, &format!("{pre}.mlp"), d, dims.denoiser_mlp_hidden())?;
        let g5 = gate(&mut g, &m[5]);
        let y = g.mul(&y, &g5);
        h = g.add(&h, &y);
        if i < k {
            saved.push(h.clone());
        }
    }
    let shift = g.linear_chunk(&cond, "denoiser.final_ada", d, d, 0, 2)?;
    let scale = g.linear_chunk(&cond, "denoiser.final_ada", d, d, 1, 2)?;
    let hn = g.plain_layer_norm(&h, d, eps)?;
    let hn = modulate(&mut g, &hn, &shift, &scale, d);
    // The head writes `hc` channels per pixel: the image's, or the conv head's hidden ones.
    let hc = dims.denoiser_conv_head.unwrap_or(c);
    let out = g.linear(&hn, "denoiser.head", d, p * p * hc)?;
    // [B, T, p·p·H] → [B, g, g, p, p, H] → [B, H, g, p, g, p] → [B, H, S, S]
    let out = g.scoped("denoiser.unpatchify", |g| {
        let (side, p, hc, s) = (side as i64, p as i64, hc as i64, s as i64);
        let y = g.reshape(&out, &[0, side, side, p, p, hc]);
        let y = g.transpose(&y, &[0, 5, 1, 3, 2, 4]);
        g.reshape(&y, &[0, hc, s, s])
    });
    let out = match dims.denoiser_conv_head {
        None => out,
        Some(h) => {
            let w = g.param("denoiser.out_conv.weight", &[c, h, 3, 3])?;
            let b = g.param("denoiser.out_conv.bias", &[c])?;
            g.scoped("denoiser.out_conv", |g| {
                let a = g.silu(&out);
                g.conv(&a, &w, &b, [3, 3], [1, 1], Some([1, 1, 1, 1]))
            })
        }
    };
    g.output(&out, "prediction", DType::F32, &img)?;
    g.check_all_used("denoiser.", Graph::Denoiser.name())?;
    Ok(g.finish(Graph::Denoiser.name()))
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use duet_models::params::{load_named_tensors, named_tensors, NamedTensor};
    use duet_models::{Denoiser, ModelSpec, Preset};
    use ndarray::ArrayD;
    use rand::Rng;
    use tract_onnx::prelude::Tensor as TractTensor;

    use super::*;
    use crate::onnx::model_to_bytes;
    use crate::onnx::test_util::{burn_tensor, random_array, rng, tract_plan, tract_run};
    use crate::parity::{max_abs_diff, to_array};

    type B = NdArray<f32>;

    /// Every architecture option of the denoiser, with every parameter random (the zero
    /// initialisations would otherwise make the output 0 whatever the graph does), against
    /// Burn's forward pass on tract.
    #[test]
    fn denoiser_variants_match_burn_on_tract() {
        let dev = Default::default();
        let base = ModelSpec::preset(Preset::Tiny, 40, 32);
        let variants = [
            (2, false, None, None),
            (3, true, None, Some(2)),
            (4, true, Some(8), None),
            (2, false, Some(4), Some(6)),
        ];
        for (layers, long_skips, conv_head, mlp_ratio) in variants {
            let cfg = ModelSpec {
                denoiser_layers: layers,
                denoiser_long_skips: long_skips,
                denoiser_conv_head: conv_head,
                denoiser_mlp_ratio: mlp_ratio,
                ..base.clone()
            };
            let mut g = rng(7);
            let random: duet_models::params::NamedTensors =
                named_tensors(&Denoiser::<B>::new(&cfg, &dev))
                    .into_iter()
                    .map(|(k, t)| {
                        let data = (0..t.data.len())
                            .map(|_| g.random_range(-0.2f32..0.2))
                            .collect();
                        (
                            k,
                            NamedTensor {
                                shape: t.shape,
                                data,
                            },
                        )
                    })
                    .collect();
            let burn = load_named_tensors(Denoiser::<B>::new(&cfg, &dev), &random).unwrap();
            let mut w = Weights::new();
            for (name, t) in &random {
                w.insert(format!("denoiser.{name}"), t.shape.clone(), t.data.clone())
                    .unwrap();
            }
            let dims = cfg.clone();

            let (b, l, d) = (2, 5, cfg.d_model);
            let x = random_array(&mut g, &[b, 3, 32, 32], 1.0);
            let t = ArrayD::from_shape_vec(vec![b], vec![17.0f32, 640.0]).unwrap();
            let text = random_array(&mut g, &[b, l, d], 1.0);
            let mask = ArrayD::from_shape_vec(
                vec![b, l],
                vec![1.0f32, 1., 1., 0., 0., 1., 1., 1., 1., 1.],
            )
            .unwrap();
            let graph = build_denoiser(&w, &dims).unwrap();
            let plan = tract_plan(&model_to_bytes(&graph)).unwrap();
            let got = tract_run(
                &plan,
                vec![
                    TractTensor::from(x.clone()),
                    TractTensor::from(t.clone()),
                    TractTensor::from(text.clone()),
                    TractTensor::from(mask.clone()),
                ],
            )
            .unwrap();
            let want = to_array(burn.forward(
                &cfg,
                burn_tensor::<4>(&x),
                burn_tensor::<1>(&t),
                burn_tensor::<3>(&text),
                burn_tensor::<2>(&mask),
            ));
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&got[0], &want);
            assert!(
                scale > 1e-2,
                "the test's output is trivially small: {scale}"
            );
            assert!(
                diff < 1e-4,
                "{layers} layers, skips {long_skips}, conv {conv_head:?}, mlp {mlp_ratio:?}: {diff}"
            );
        }
    }
}

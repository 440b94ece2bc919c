//! `caption_decoder.onnx`: one decoding step of the caption decoder with a KV cache.

use tract_onnx::pb::ModelProto;

use duet_runtime::manifest::Graph;

use super::builder::{DType, Dim, GraphBuilder, PastKv};
use super::{ExportError, ModelSpec, Weights};

/// Builds the caption decoder step exactly as `docs/ARCHITECTURE.md` specifies.
///
/// Inputs, in order: `input_ids`, `position_ids` `[batch, seq]` i64, `attn_bias`
/// `[batch, 1, seq, total]`, `image_tokens` `[batch, P, D]`, then `past_key_{l}`,
/// `past_value_{l}` `[batch, H, past, Dh]` per layer (`past` may be 0). Outputs: `logits`
/// `[batch, seq, V]`, then `present_key_{l}`, `present_value_{l}` `[batch, H, total, Dh]`.
///
/// The cache makes decoding linear: the runtime feeds the new tokens only and the previous
/// step's `present_*` as `past_*`. Cross-attention keys/values are recomputed from
/// `image_tokens` every step (P is small), which keeps the I/O contract to one cache per layer.
pub fn build_caption_decoder(
    weights: &Weights,
    dims: &ModelSpec,
) -> Result<ModelProto, ExportError> {
    super::validate_dims(dims)?;
    let d = dims.d_model;
    let h = dims.n_heads;
    let dh = dims.head_dim();
    let eps = dims.layer_norm_eps as f32;
    let batch = Dim::Sym("batch");
    let seq = Dim::Sym("seq");

    let mut g = GraphBuilder::new(weights);
    g.set_doc(format!(
        "duet caption decoder step with KV cache (docs/ARCHITECTURE.md): d_model {d}, {l} \
         pre-norm blocks (causal self-attention over past+new tokens, cross-attention to image \
         tokens, MLP), {h} heads, vocab {v}, max_len {m}.",
        l = dims.decoder_layers,
        v = dims.vocab_size,
        m = dims.max_len,
    ));

    let input_ids = g.input("input_ids", DType::I64, &[batch.clone(), seq.clone()])?;
    let position_ids = g.input("position_ids", DType::I64, &[batch.clone(), seq.clone()])?;
    let attn_bias = g.input(
        "attn_bias",
        DType::F32,
        &[batch.clone(), Dim::Fixed(1), seq.clone(), Dim::Sym("total")],
    )?;
    let image_tokens = g.input(
        "image_tokens",
        DType::F32,
        &[batch.clone(), Dim::Fixed(dims.num_patches()), Dim::Fixed(d)],
    )?;
    let past_shape = [
        batch.clone(),
        Dim::Fixed(h),
        Dim::Sym("past"),
        Dim::Fixed(dh),
    ];
    let mut pasts = Vec::with_capacity(dims.decoder_layers);
    for l in 0..dims.decoder_layers {
        let key = g.input(&format!("past_key_{l}"), DType::F32, &past_shape)?;
        let value = g.input(&format!("past_value_{l}"), DType::F32, &past_shape)?;
        pasts.push(PastKv { key, value });
    }

    let tok = g.param("decoder.tok_embed.weight", &[dims.vocab_size, d])?;
    let pos = g.param("decoder.pos_embed.weight", &[dims.max_len, d])?;
    let mut x = g.scoped("decoder.embed", |g| {
        let t = g.gather(&tok, &input_ids);
        let p = g.gather(&pos, &position_ids);
        g.add(&t, &p)
    });

    let mut presents = Vec::with_capacity(dims.decoder_layers);
    for (l, past) in pasts.iter().enumerate() {
        let pre = format!("decoder.blocks.{l}");
        // Self-attention is written out rather than via `residual` because its keys/values
        // are also graph outputs (the new cache).
        let hn = g.layer_norm(&x, &format!("{pre}.ln1"), d, eps)?;
        let a = g.mha(
            &hn,
            &hn,
            &format!("{pre}.self_attn"),
            h,
            Some(&attn_bias),
            Some(past),
        )?;
        x = g.add(&x, &a.out);
        presents.push((a.k_all, a.v_all));
        x = g.residual(&x, |g, x| {
            let hn = g.layer_norm(x, &format!("{pre}.ln2"), d, eps)?;
            let a = g.mha(
                &hn,
                &image_tokens,
                &format!("{pre}.cross_attn"),
                h,
                None,
                None,
            )?;
            Ok(a.out)
        })?;
        x = g.residual(&x, |g, x| {
            let hn = g.layer_norm(x, &format!("{pre}.ln3"), d, eps)?;
            g.mlp(&hn, &format!("{pre}.mlp"), d, dims.mlp_hidden())
        })?;
    }
    let x = g.layer_norm(&x, "decoder.ln_final", d, eps)?;
    let logits = g.linear(&x, "decoder.lm_head", d, dims.vocab_size)?;

    g.output(
        &logits,
        "logits",
        DType::F32,
        &[batch.clone(), seq, Dim::Fixed(dims.vocab_size)],
    )?;
    let present_shape = [batch, Dim::Fixed(h), Dim::Sym("total"), Dim::Fixed(dh)];
    for (l, (k, v)) in presents.iter().enumerate() {
        g.output(k, &format!("present_key_{l}"), DType::F32, &present_shape)?;
        g.output(v, &format!("present_value_{l}"), DType::F32, &present_shape)?;
    }

    g.check_all_used("decoder.", Graph::CaptionDecoder.name())?;
    Ok(g.finish(Graph::CaptionDecoder.name()))
}

#[cfg(test)]
mod tests {
    use ndarray::{s, Array2, ArrayD, IxDyn};
    use rand::Rng;
    use tract_onnx::prelude::*;

    use super::*;
    use crate::onnx::model_to_bytes;
    use crate::onnx::test_util::*;

    const B: usize = 2;

    /// Per-layer (key, value) cache tensors.
    type Cache = Vec<(ArrayD<f32>, ArrayD<f32>)>;

    struct Case {
        dims: ModelSpec,
        w: Weights,
        plan: Plan,
        ids: Vec<[i64; 5]>,
        image: ArrayD<f32>,
    }

    fn setup() -> Case {
        let dims = tiny_dims();
        let w = random_weights(
            &module_parameters(
                &duet_models::CaptionDecoder::new(&dims, &Default::default()),
                "decoder",
            ),
            5,
        );
        let model = build_caption_decoder(&w, &dims).expect("build decoder graph");
        let plan = tract_plan(&model_to_bytes(&model)).expect("tract loads the decoder");
        let mut r = rng(21);
        let ids = (0..B)
            .map(|_| std::array::from_fn(|_| r.random_range(4..dims.vocab_size as i64)))
            .collect();
        let image = random_array(&mut r, &[B, dims.num_patches(), dims.d_model], 1.0);
        Case {
            dims,
            w,
            plan,
            ids,
            image,
        }
    }

    /// Runs one step on tokens `start..end` given `past` (per layer key, value), returning
    /// logits and the presents.
    fn step(
        c: &Case,
        start: usize,
        end: usize,
        past: &[(ArrayD<f32>, ArrayD<f32>)],
    ) -> TractResult<(ArrayD<f32>, Cache)> {
        let seq = end - start;
        let past_len = past[0].0.shape()[2];
        assert_eq!(past_len, start);
        let total = past_len + seq;
        let ids = ArrayD::from_shape_fn(IxDyn(&[B, seq]), |ix| c.ids[ix[0]][start + ix[1]]);
        let pos = ArrayD::from_shape_fn(IxDyn(&[B, seq]), |ix| (past_len + ix[1]) as i64);
        let bias = ArrayD::from_shape_fn(IxDyn(&[B, 1, seq, total]), |ix| {
            if ix[3] <= past_len + ix[2] {
                0.0f32
            } else {
                -1e9
            }
        });
        let mut inputs: Vec<Tensor> =
            vec![ids.into(), pos.into(), bias.into(), c.image.clone().into()];
        for (k, v) in past {
            inputs.push(k.clone().into());
            inputs.push(v.clone().into());
        }
        let out = c
            .plan
            .run(inputs.into_iter().map(IntoTValue::into_tvalue).collect())?;
        let f = |t: &TValue| -> TractResult<ArrayD<f32>> {
            Ok(t.to_plain_array_view::<f32>()?.to_owned())
        };
        let logits = f(&out[0])?;
        assert_eq!(logits.shape(), &[B, seq, c.dims.vocab_size]);
        let mut presents = Vec::new();
        for l in 0..c.dims.decoder_layers {
            let k = f(&out[1 + 2 * l])?;
            let v = f(&out[2 + 2 * l])?;
            let want = [B, c.dims.n_heads, total, c.dims.head_dim()];
            assert_eq!(k.shape(), &want);
            assert_eq!(v.shape(), &want);
            presents.push((k, v));
        }
        Ok((logits, presents))
    }

    fn empty_past(d: &ModelSpec) -> Cache {
        let shape = [B, d.n_heads, 0, d.head_dim()];
        (0..d.decoder_layers)
            .map(|_| (ArrayD::zeros(IxDyn(&shape)), ArrayD::zeros(IxDyn(&shape))))
            .collect()
    }

    fn max_diff(a: ndarray::ArrayViewD<f32>, b: ndarray::ArrayViewD<f32>) -> f32 {
        assert_eq!(a.shape(), b.shape());
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Plain-Rust decoder over the whole sequence, causal, no cache.
    fn reference(c: &Case, n: usize) -> ArrayD<f64> {
        let r = Reference {
            w: &c.w,
            dims: &c.dims,
        };
        let d = c.dims.d_model;
        let tok = r.mat("decoder.tok_embed.weight");
        let pos = r.mat("decoder.pos_embed.weight");
        let mut logits = ArrayD::<f64>::zeros(IxDyn(&[B, n, c.dims.vocab_size]));
        for b in 0..B {
            let mut x = Array2::<f64>::zeros((n, d));
            for i in 0..n {
                let id = c.ids[b][i] as usize;
                for j in 0..d {
                    x[[i, j]] = tok[[id, j]] + pos[[i, j]];
                }
            }
            let img = c.image.slice(s![b, .., ..]).mapv(|v| v as f64);
            for l in 0..c.dims.decoder_layers {
                let pre = format!("decoder.blocks.{l}");
                let h = r.layer_norm(&x, &format!("{pre}.ln1"));
                x = &x + &r.attention(&h, &h, &format!("{pre}.self_attn"), |i, j| j <= i);
                let h = r.layer_norm(&x, &format!("{pre}.ln2"));
                x = &x + &r.attention(&h, &img, &format!("{pre}.cross_attn"), |_, _| true);
                let h = r.layer_norm(&x, &format!("{pre}.ln3"));
                x = &x + &r.mlp(&h, &format!("{pre}.mlp"));
            }
            let x = r.layer_norm(&x, "decoder.ln_final");
            let y = r.linear(&x, "decoder.lm_head");
            logits.slice_mut(s![b, .., ..]).assign(&y);
        }
        logits
    }

    #[test]
    fn decoder_kv_cache_matches_full_sequence() -> TractResult<()> {
        let c = setup();
        // 5 tokens at once with an empty (zero-length) cache.
        let (full, full_presents) = step(&c, 0, 5, &empty_past(&c.dims))?;

        let want = reference(&c, 5);
        let dr = max_abs_diff(&full, &want);
        eprintln!("decoder: max |tract - reference| logits {dr:.2e}");
        assert!(dr <= 1e-4, "logits differ from the plain reference by {dr}");

        // 4 tokens, then the 5th with the 4-token cache.
        let (_, p4) = step(&c, 0, 4, &empty_past(&c.dims))?;
        let (last, p5) = step(&c, 4, 5, &p4)?;
        let d = max_diff(
            last.slice(s![.., 0, ..]).into_dyn(),
            full.slice(s![.., 4, ..]).into_dyn(),
        );
        eprintln!("decoder: 4+1 cached vs full, last logits max diff {d:.2e}");
        assert!(d <= 1e-4, "cached last-position logits differ by {d}");

        // 3 tokens, then 2 with a past of length 3.
        let (_, p3) = step(&c, 0, 3, &empty_past(&c.dims))?;
        let (tail, _) = step(&c, 3, 5, &p3)?;
        let d = max_diff(tail.view(), full.slice(s![.., 3..5, ..]).into_dyn());
        eprintln!("decoder: 3+2 cached vs full, logits max diff {d:.2e}");
        assert!(d <= 1e-4, "past-3 logits differ by {d}");

        // The cache itself: presents after 4+1 equal the presents of the full run.
        for ((k, v), (fk, fv)) in p5.iter().zip(&full_presents) {
            assert!(max_diff(k.view(), fk.view()) <= 1e-5);
            assert!(max_diff(v.view(), fv.view()) <= 1e-5);
        }
        Ok(())
    }

    #[test]
    fn decoder_graph_passes_onnx_checker() {
        let dims = tiny_dims();
        let w = random_weights(
            &module_parameters(
                &duet_models::CaptionDecoder::new(&dims, &Default::default()),
                "decoder",
            ),
            5,
        );
        let model = build_caption_decoder(&w, &dims).expect("build");
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write_model(dir.path(), "caption_decoder.onnx", &model);
        onnx_check(&p);
    }

    #[test]
    fn decoder_io_contract() {
        let dims = tiny_dims();
        let w = random_weights(
            &module_parameters(
                &duet_models::CaptionDecoder::new(&dims, &Default::default()),
                "decoder",
            ),
            5,
        );
        let model = build_caption_decoder(&w, &dims).expect("build");
        let g = model.graph.as_ref().expect("graph");
        let names = |v: &[tract_onnx::pb::ValueInfoProto]| {
            v.iter().map(|i| i.name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(
            names(&g.input),
            [
                "input_ids",
                "position_ids",
                "attn_bias",
                "image_tokens",
                "past_key_0",
                "past_value_0",
                "past_key_1",
                "past_value_1"
            ]
        );
        assert_eq!(
            names(&g.output),
            [
                "logits",
                "present_key_0",
                "present_value_0",
                "present_key_1",
                "present_value_1"
            ]
        );
        let e = build_caption_decoder(&Weights::new(), &dims).expect_err("empty");
        assert!(e.to_string().contains("decoder.tok_embed.weight"), "{e}");
    }
}

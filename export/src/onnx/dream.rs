//! `dream_encoder.onnx`: the caption decoder over `[BOS] prompt` and the dream queries, read
//! out as the denoiser's conditioning (DreamLLM; `duet_models::dream`).

use tract_onnx::pb::ModelProto;

use duet_runtime::manifest::Graph;

use super::builder::{DType, Dim, GraphBuilder};
use super::{ExportError, ModelSpec, Weights};

/// Builds the dream encoder: inputs `input_ids` `[batch, max_len]` i64 (`[BOS]` + the prompt,
/// PAD after), `attn_mask` `[batch, max_len]` f32 (1 token, 0 padding) and `image_tokens`
/// `[batch, P, D]` (the vision encoder's, of the source image or of the black image); output
/// `dream_tokens` `[batch, max_len + K, D]`: the prompt's positions then the queries', whose
/// key mask for the denoiser is `attn_mask` followed by K ones.
///
/// The prompt axis is fixed at `max_len`, as in the text encoder, so the positions and the
/// causal mask are constants (padding is masked out of every attention, so a fixed length
/// changes no valid value). The decoder's blocks are those of `caption_decoder.onnx`
/// with the same parameter names; the queries take no position embedding.
pub fn build_dream_encoder(weights: &Weights, dims: &ModelSpec) -> Result<ModelProto, ExportError> {
    super::validate_dims(dims)?;
    let d = dims.d_model;
    let h = dims.n_heads;
    let k = dims.dream_queries;
    let l = dims.max_len;
    let s = l + k;
    let eps = dims.layer_norm_eps as f32;
    if k == 0 {
        return Err(ExportError::InvalidDims(
            "dream_encoder needs dream_queries > 0".into(),
        ));
    }
    let batch = Dim::Sym("batch");

    let mut g = GraphBuilder::new(weights);
    g.set_doc(format!(
        "duet dream encoder (docs/ARCHITECTURE.md): the caption decoder (d_model {d}, {n} \
         blocks, {h} heads) over [BOS] + prompt (max_len {l}) and {k} learnt dream queries, \
         causal, cross-attending to the image tokens; the last-layer states of the prompt and \
         the queries, projected, condition the denoiser.",
        n = dims.decoder_layers,
    ));
    let input_ids = g.input("input_ids", DType::I64, &[batch.clone(), Dim::Fixed(l)])?;
    let mask = g.input("attn_mask", DType::F32, &[batch.clone(), Dim::Fixed(l)])?;
    let image_tokens = g.input(
        "image_tokens",
        DType::F32,
        &[batch.clone(), Dim::Fixed(dims.num_patches()), Dim::Fixed(d)],
    )?;

    let tok = g.param("decoder.tok_embed.weight", &[dims.vocab_size, d])?;
    let pos = g.param("decoder.pos_embed.weight", &[l, d])?;
    let queries = g.param("dream.queries", &[1, k, d])?;
    let (x, bias) = g.scoped("dream.prefix", |g| {
        let positions: Vec<i64> = (0..l as i64).collect();
        let positions = g.const_i64("positions", &positions);
        let t = g.gather(&tok, &input_ids);
        let p = g.gather(&pos, &positions);
        let prompt = g.add(&t, &p);
        // The batch size as a 1-D shape prefix, for the Expands below.
        let shape = g.node("Shape", &[&input_ids], vec![]);
        let first = g.const_i64("first", &[0]);
        let b = g.node("Gather", &[&shape, &first], vec![]);
        let tail = g.const_i64("queries_tail", &[k as i64, d as i64]);
        let q_shape = g.concat(&[&b, &tail], 0);
        let q = g.node("Expand", &[&queries, &q_shape], vec![]);
        let x = g.concat(&[&prompt, &q], 1);
        // Keys: the prompt's padding masked, the queries always visible; plus the causal mask.
        let pad = g.padding_bias(&mask);
        let zeros = g.const_f32("query_keys", &[1, 1, 1, k], &vec![0.0; k])?;
        let z_tail = g.const_i64("query_keys_tail", &[1, 1, k as i64]);
        let z_shape = g.concat(&[&b, &z_tail], 0);
        let zeros = g.node("Expand", &[&zeros, &z_shape], vec![]);
        let keys = g.concat(&[&pad, &zeros], 3);
        let causal: Vec<f32> = (0..s * s)
            .map(|ij| {
                if ij % s > ij / s {
                    duet_models::caption::MASKED
                } else {
                    0.0
                }
            })
            .collect();
        let causal = g.const_f32("causal", &[1, 1, s, s], &causal)?;
        Ok::<_, ExportError>((x, g.add(&causal, &keys)))
    })?;

    let mut x = x;
    for l_ in 0..dims.decoder_layers {
        let pre = format!("decoder.blocks.{l_}");
        x = g.residual(&x, |g, x| {
            let hn = g.layer_norm(x, &format!("{pre}.ln1"), d, eps)?;
            Ok(
                g.mha(&hn, &hn, &format!("{pre}.self_attn"), h, Some(&bias), None)?
                    .out,
            )
        })?;
        x = g.residual(&x, |g, x| {
            let hn = g.layer_norm(x, &format!("{pre}.ln2"), d, eps)?;
            Ok(g.mha(
                &hn,
                &image_tokens,
                &format!("{pre}.cross_attn"),
                h,
                None,
                None,
            )?
            .out)
        })?;
        x = g.residual(&x, |g, x| {
            let hn = g.layer_norm(x, &format!("{pre}.ln3"), d, eps)?;
            g.mlp(&hn, &format!("{pre}.mlp"), d, dims.mlp_hidden())
        })?;
    }
    let x = g.layer_norm(&x, "decoder.ln_final", d, eps)?;
    let y = g.linear(&x, "dream.proj", d, d)?;
    g.output(
        &y,
        "dream_tokens",
        DType::F32,
        &[batch, Dim::Fixed(s), Dim::Fixed(d)],
    )?;
    g.check_all_used("dream.", Graph::DreamEncoder.name())?;
    Ok(g.finish(Graph::DreamEncoder.name()))
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use duet_models::params::{load_named_tensors, named_tensors, NamedTensor, NamedTensors};
    use duet_models::{DreamModel, ModelSpec, Preset};
    use ndarray::ArrayD;
    use rand::Rng;
    use tract_onnx::prelude::Tensor as TractTensor;

    use super::*;
    use crate::onnx::model_to_bytes;
    use crate::onnx::test_util::{burn_tensor, random_array, rng, tract_plan, tract_run};
    use crate::parity::{max_abs_diff, to_array};

    type B = NdArray<f32>;

    /// Random weights everywhere, prompts of different lengths padded to `max_len`: the graph
    /// on tract equals Burn's `DreamQueries::forward` over the unpadded prompts.
    #[test]
    fn dream_encoder_matches_burn_on_tract() {
        let dev = Default::default();
        let cfg = ModelSpec {
            dream_queries: 5,
            max_len: 12,
            ..ModelSpec::preset(Preset::Tiny, 40, 32)
        };
        let mut r = rng(3);
        let random: NamedTensors = named_tensors(&DreamModel::<B>::new(&cfg, &dev))
            .into_iter()
            .map(|(k, t)| {
                let data = (0..t.data.len())
                    .map(|_| r.random_range(-0.3f32..0.3))
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
        let burn = load_named_tensors(DreamModel::<B>::new(&cfg, &dev), &random).unwrap();
        let mut w = Weights::new();
        for (name, t) in &random {
            w.insert(name.clone(), t.shape.clone(), t.data.clone())
                .unwrap();
        }
        let graph = build_dream_encoder(&w, &cfg).unwrap();
        let plan = tract_plan(&model_to_bytes(&graph)).unwrap();
        let (b, l, d) = (2, cfg.max_len, cfg.d_model);
        let prompts: [&[i64]; 2] = [&[1, 7, 9, 12], &[1, 30, 5, 6, 8, 11, 4]];
        let ids = ArrayD::from_shape_fn(vec![b, l], |ix| {
            prompts[ix[0]].get(ix[1]).copied().unwrap_or(0)
        });
        let mask = ArrayD::from_shape_fn(vec![b, l], |ix| {
            if ix[1] < prompts[ix[0]].len() {
                1.0f32
            } else {
                0.0
            }
        });
        let image = random_array(&mut r, &[b, cfg.num_patches(), d], 1.0);
        let got = tract_run(
            &plan,
            vec![
                TractTensor::from(ids),
                TractTensor::from(mask),
                TractTensor::from(image.clone()),
            ],
        )
        .unwrap();
        for (row, prompt) in prompts.iter().enumerate() {
            let p = prompt.len();
            let want = to_array(
                burn.condition(
                    burn_tensor::<2>(
                        &ArrayD::from_shape_vec(
                            vec![1, p],
                            prompt.iter().map(|&t| t as f32).collect(),
                        )
                        .unwrap(),
                    )
                    .int(),
                    burn::tensor::Tensor::ones([1, p], &dev),
                    burn_tensor::<3>(
                        &image
                            .slice(ndarray::s![row..row + 1, .., ..])
                            .to_owned()
                            .into_dyn(),
                    ),
                ),
            );
            // The prompt's positions, then the queries' (after the graph's padding).
            let k = cfg.dream_queries;
            let got_row = ndarray::concatenate(
                ndarray::Axis(1),
                &[
                    got[0].slice(ndarray::s![row..row + 1, ..p, ..]),
                    got[0].slice(ndarray::s![row..row + 1, l..l + k, ..]),
                ],
            )
            .unwrap()
            .into_dyn();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.1, "trivially small output: {scale}");
            let diff = max_abs_diff(&got_row, &want);
            assert!(diff < 1e-4, "row {row}: {diff}");
        }
    }
}

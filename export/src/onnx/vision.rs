//! `vision_encoder.onnx`: ViT patch tokens and the pooled, L2-normalised image embedding.

use tract_onnx::pb::ModelProto;

use duet_runtime::manifest::Graph;

use super::builder::{DType, Dim, GraphBuilder};
use super::{ExportError, ModelSpec, Weights};

/// One pre-norm encoder block (`EncoderBlock` in `duet-models`): `x + attn(ln1(x))`, then
/// `x + mlp(ln2(x))`, with an optional additive key-padding `bias` `[B, 1, 1, N]`. Shared by
/// the vision and the text encoder.
pub fn encoder_block(
    g: &mut GraphBuilder<'_>,
    x: &super::GraphValue,
    pre: &str,
    dims: &ModelSpec,
    bias: Option<&super::GraphValue>,
) -> Result<super::GraphValue, ExportError> {
    let d = dims.d_model;
    let eps = dims.layer_norm_eps as f32;
    let x = g.residual(x, |g, x| {
        let h = g.layer_norm(x, &format!("{pre}.ln1"), d, eps)?;
        Ok(
            g.mha(&h, &h, &format!("{pre}.attn"), dims.n_heads, bias, None)?
                .out,
        )
    })?;
    g.residual(&x, |g, x| {
        let h = g.layer_norm(x, &format!("{pre}.ln2"), d, eps)?;
        g.mlp(&h, &format!("{pre}.mlp"), d, dims.mlp_hidden())
    })
}

/// Builds the vision encoder exactly as `docs/ARCHITECTURE.md` specifies:
/// `pixels [batch, C, S, S]` → `patch_tokens [batch, P, D]`, `embedding [batch, E]`.
///
/// Every `vision.*` parameter in `weights` must be consumed; a leftover one means the Burn model
/// has state this graph would silently drop.
pub fn build_vision_encoder(
    weights: &Weights,
    dims: &ModelSpec,
) -> Result<ModelProto, ExportError> {
    super::validate_dims(dims)?;
    let d = dims.d_model;
    let p = dims.patch_size;
    let n_patches = dims.num_patches();
    let eps = dims.layer_norm_eps as f32;

    let mut g = GraphBuilder::new(weights);
    g.set_doc(format!(
        "duet vision encoder (docs/ARCHITECTURE.md): ViT, image {s}x{s}, patch {p}, d_model {d}, \
         {l} pre-norm blocks, {h} heads; outputs patch tokens and an L2-normalised embedding.",
        s = dims.image_size,
        l = dims.vision_layers,
        h = dims.n_heads,
    ));

    let pixels = g.input(
        "pixels",
        DType::F32,
        &[
            Dim::Sym("batch"),
            Dim::Fixed(dims.channels),
            Dim::Fixed(dims.image_size),
            Dim::Fixed(dims.image_size),
        ],
    )?;

    // Patch embedding (a convolution with kernel = stride = patch) → [B, P, D].
    let w = g.param("vision.patch_embed.weight", &[d, dims.channels, p, p])?;
    let b = g.param("vision.patch_embed.bias", &[d])?;
    let pos = g.param("vision.pos_embed", &[1, n_patches, d])?;
    let mut x = g.scoped("vision.patch_embed", |g| {
        let y = g.patch_embed(&pixels, &w, &b, [dims.channels, dims.image_size, p, d]);
        g.add(&y, &pos)
    });

    for i in 0..dims.vision_layers {
        x = encoder_block(&mut g, &x, &format!("vision.blocks.{i}"), dims, None)?;
    }
    let tokens = g.layer_norm(&x, "vision.ln_final", d, eps)?;
    g.output(
        &tokens,
        "patch_tokens",
        DType::F32,
        &[Dim::Sym("batch"), Dim::Fixed(n_patches), Dim::Fixed(d)],
    )?;

    // Pooled embedding: mean over patches → proj → y / sqrt(sum(y²) + 1e-12).
    let pooled = g.scoped("vision.pool", |g| g.reduce_mean(&tokens, &[1], false));
    let y = g.linear(&pooled, "vision.proj", d, dims.embed_dim)?;
    let emb = g.scoped("vision.l2norm", |g| g.l2_normalize(&y));
    g.output(
        &emb,
        "embedding",
        DType::F32,
        &[Dim::Sym("batch"), Dim::Fixed(dims.embed_dim)],
    )?;

    g.check_all_used("vision.", Graph::VisionEncoder.name())?;
    Ok(g.finish(Graph::VisionEncoder.name()))
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, ArrayD, IxDyn};
    use tract_onnx::prelude::*;

    use super::*;
    use crate::onnx::model_to_bytes;
    use crate::onnx::test_util::*;

    /// Plain-Rust vision encoder: conv as a per-patch dot product, then the blocks.
    fn reference(
        w: &Weights,
        dims: &ModelSpec,
        pixels: &ArrayD<f32>,
    ) -> (ArrayD<f64>, ArrayD<f64>) {
        let r = Reference { w, dims };
        let (b, c, s) = (pixels.shape()[0], dims.channels, dims.image_size);
        let (p, d) = (dims.patch_size, dims.d_model);
        let side = s / p;
        let np = dims.num_patches();
        let (_, kw) = w.get("vision.patch_embed.weight").expect("param");
        let kb = r.vec("vision.patch_embed.bias");
        let (_, pos) = w.get("vision.pos_embed").expect("param");
        let mut tokens = ArrayD::<f64>::zeros(IxDyn(&[b, np, d]));
        let mut emb = ArrayD::<f64>::zeros(IxDyn(&[b, dims.embed_dim]));
        for bi in 0..b {
            let mut x = Array2::<f64>::zeros((np, d));
            for py in 0..side {
                for px in 0..side {
                    let pi = py * side + px;
                    for o in 0..d {
                        let mut acc = kb[o];
                        for ci in 0..c {
                            for ky in 0..p {
                                for kx in 0..p {
                                    let wv = kw[((o * c + ci) * p + ky) * p + kx] as f64;
                                    let xv = pixels[[bi, ci, py * p + ky, px * p + kx]] as f64;
                                    acc += wv * xv;
                                }
                            }
                        }
                        x[[pi, o]] = acc + pos[pi * d + o] as f64;
                    }
                }
            }
            for i in 0..dims.vision_layers {
                let pre = format!("vision.blocks.{i}");
                let h = r.layer_norm(&x, &format!("{pre}.ln1"));
                x = &x + &r.attention(&h, &h, &format!("{pre}.attn"), |_, _| true);
                let h = r.layer_norm(&x, &format!("{pre}.ln2"));
                x = &x + &r.mlp(&h, &format!("{pre}.mlp"));
            }
            let x = r.layer_norm(&x, "vision.ln_final");
            let pooled = x
                .mean_axis(ndarray::Axis(0))
                .expect("P > 0")
                .insert_axis(ndarray::Axis(0));
            let y = r.linear(&pooled, "vision.proj");
            let norm = (y.iter().map(|v| v * v).sum::<f64>() + 1e-12).sqrt();
            for (j, v) in y.iter().enumerate() {
                emb[[bi, j]] = v / norm;
            }
            for pi in 0..np {
                for o in 0..d {
                    tokens[[bi, pi, o]] = x[[pi, o]];
                }
            }
        }
        (tokens, emb)
    }

    fn setup() -> (ModelSpec, Weights, ModelProto) {
        let dims = tiny_dims();
        let w = random_weights(
            &module_parameters(
                &duet_models::VisionEncoder::new(&dims, &Default::default()),
                "vision",
            ),
            7,
        );
        let model = build_vision_encoder(&w, &dims).expect("build vision graph");
        (dims, w, model)
    }

    #[test]
    fn vision_runs_in_tract_and_matches_reference() -> TractResult<()> {
        let (dims, w, model) = setup();
        let plan = tract_plan(&model_to_bytes(&model))?;
        let mut r = rng(11);
        let s = dims.image_size;
        for batch in [2usize, 1, 3] {
            let pixels = random_array(&mut r, &[batch, 3, s, s], 1.0);
            let out = tract_run(&plan, vec![pixels.clone().into()])?;
            assert_eq!(out.len(), 2);
            assert_eq!(out[0].shape(), &[batch, dims.num_patches(), dims.d_model]);
            assert_eq!(out[1].shape(), &[batch, dims.embed_dim]);
            for row in out[1].rows() {
                let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                assert!((n - 1.0).abs() < 1e-5, "embedding norm {n}");
            }
            let (tokens, emb) = reference(&w, &dims, &pixels);
            let dt = max_abs_diff(&out[0], &tokens);
            let de = max_abs_diff(&out[1], &emb);
            eprintln!(
                "vision batch {batch}: max |tract - reference| tokens {dt:.2e}, embedding {de:.2e}"
            );
            assert!(dt <= 1e-4, "patch_tokens differ from reference by {dt}");
            assert!(de <= 1e-4, "embedding differs from reference by {de}");
        }
        Ok(())
    }

    #[test]
    fn vision_graph_passes_onnx_checker() {
        let (_, _, model) = setup();
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write_model(dir.path(), "vision_encoder.onnx", &model);
        onnx_check(&p);
    }

    #[test]
    fn vision_io_contract() {
        let (dims, _, model) = setup();
        assert_eq!(model.opset_import[0].version, 18);
        assert_eq!(model.producer_name, "duet-export");
        let g = model.graph.as_ref().expect("graph");
        let names = |v: &[tract_onnx::pb::ValueInfoProto]| {
            v.iter().map(|i| i.name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(names(&g.input), ["pixels"]);
        assert_eq!(names(&g.output), ["patch_tokens", "embedding"]);
        // Every parameter became an initializer named after its checkpoint key.
        for (name, shape) in module_parameters(
            &duet_models::VisionEncoder::new(&dims, &Default::default()),
            "vision",
        ) {
            let init = g
                .initializer
                .iter()
                .find(|t| t.name == name)
                .expect("initializer");
            assert_eq!(
                init.dims,
                shape.iter().map(|&d| d as i64).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn missing_wrong_and_unused_parameters_are_named() {
        let dims = tiny_dims();
        let params = module_parameters(
            &duet_models::VisionEncoder::new(&dims, &Default::default()),
            "vision",
        );
        let full = random_weights(&params, 1);

        let mut missing = Weights::new();
        for (n, s) in &params {
            if n != "vision.blocks.1.attn.k.weight" {
                let (_, d) = full.get(n).expect("param");
                missing
                    .insert(n.clone(), s.clone(), d.to_vec())
                    .expect("insert");
            }
        }
        let e = build_vision_encoder(&missing, &dims).expect_err("missing");
        assert!(
            e.to_string().contains("vision.blocks.1.attn.k.weight"),
            "{e}"
        );

        let mut wrong = full.clone();
        wrong
            .insert(
                "vision.proj.weight",
                vec![dims.embed_dim, dims.d_model + 1],
                vec![0.0; dims.embed_dim * (dims.d_model + 1)],
            )
            .expect("insert");
        let e = build_vision_encoder(&wrong, &dims).expect_err("wrong shape");
        assert!(
            matches!(e, ExportError::ShapeMismatch { ref name, .. } if name == "vision.proj.weight"),
            "{e}"
        );

        let mut extra = full.clone();
        extra
            .insert(
                "vision.cls_token",
                vec![1, 1, dims.d_model],
                vec![0.0; dims.d_model],
            )
            .expect("insert");
        extra
            .insert("decoder.unrelated", vec![1], vec![0.0])
            .expect("insert");
        let e = build_vision_encoder(&extra, &dims).expect_err("unused");
        match e {
            ExportError::UnusedParameters { names, .. } => assert_eq!(names, ["vision.cls_token"]),
            other => panic!("unexpected {other}"),
        }

        let e = Weights::new()
            .insert("x", vec![2, 2], vec![0.0; 3])
            .expect_err("length");
        assert!(matches!(e, ExportError::DataLength { .. }));
        let mut bad = dims.clone();
        bad.n_heads = 5;
        assert!(matches!(
            build_vision_encoder(&full, &bad),
            Err(ExportError::InvalidDims(_))
        ));
    }
}

//! `restorer_t2i.onnx`, `restorer_i2t.onnx`: one evaluation of a feature-space restorer
//! (`FeatureRestorer` in `duet-models`, with dynamic modality gating), and `fusion_head.onnx`:
//! the task head over `[image ‖ text]` embeddings (`FusionHead`).

use duet_models::{timestep_frequencies, RestoreConfig};
use tract_onnx::pb::ModelProto;

use duet_runtime::manifest::Graph;

use super::builder::{DType, Dim, GraphBuilder};
use super::{ExportError, Weights};

/// Epsilon of the restorer's LayerNorms: Burn's `LayerNormConfig` default, which the restorer
/// keeps (the parity gate would fail on any other value).
const RESTORER_LN_EPS: f32 = 1e-5;

/// Builds one restorer (the full model: step gate and trust gate both on):
/// `x [batch, E]` (the sample, standardised), `timestep [batch]` f32 (integer training
/// timesteps), `condition [batch, E]` (the present modality's raw embedding) →
/// - `prediction [batch, E]`: the `v` the sampler steps with;
/// - `trust [batch, 1]`: the trust gate `τ = σ(w · c_h)`;
/// - `restored [batch, E]`: what the head gets if `x` is the final sample,
///   `τ (μ + σ x) + (1 − τ) μ = μ + τ σ x`, with the data statistics baked in.
///
/// `graph_name` is the graph's name (`restorer_t2i`, `restorer_i2t`); `prefix` the tensor
/// prefix of the restorer in the run (`restorer.t2i`, `restorer.i2t`).
pub fn build_restorer(
    weights: &Weights,
    prefix: &str,
    graph_name: &str,
    d: &RestoreConfig,
) -> Result<ModelProto, ExportError> {
    let (e, h) = (d.embed_dim, d.hidden);
    if e == 0 || h == 0 || !h.is_multiple_of(2) {
        return Err(ExportError::InvalidDims(format!(
            "restorer embed_dim {e} must be > 0 and hidden {h} even and > 0"
        )));
    }
    let mut g = GraphBuilder::new(weights);
    g.set_doc(format!(
        "duet feature restorer `{graph_name}` (docs/RESTORE.md): residual-MLP v-prediction \
         denoiser on standardised pooled embeddings, embed_dim {e}, hidden {h}, {b} blocks, \
         step gate and trust gate; `restored` = mean + trust * std * x.",
        b = d.blocks
    ));
    let batch = Dim::Sym("batch");
    let row = [batch.clone(), Dim::Fixed(e)];
    let x = g.input("x", DType::F32, &row)?;
    let t = g.input("timestep", DType::F32, std::slice::from_ref(&batch))?;
    let cond = g.input("condition", DType::F32, &row)?;

    // Timestep features → time_proj.
    let freqs = timestep_frequencies(h);
    let freqs = g.const_f32("timestep_freqs", &[1, h / 2], &freqs)?;
    let feats = g.scoped(&format!("{prefix}.timestep"), |g| {
        let tt = g.reshape(&t, &[-1, 1]);
        let args = g.mul(&tt, &freqs);
        let cos = g.cos(&args);
        let sin = g.sin(&args);
        g.concat(&[&cos, &sin], 1)
    });
    let t_h = g.linear(&feats, &format!("{prefix}.time_proj"), h, h)?;

    // The condition, standardised with the training statistics, then projected.
    let cond_mean = g.param(&format!("{prefix}.cond_mean"), &[e])?;
    let cond_std = g.param(&format!("{prefix}.cond_std"), &[e])?;
    let c_std = g.scoped(&format!("{prefix}.condition"), |g| {
        let c = g.sub(&cond, &cond_mean);
        g.div(&c, &cond_std)
    });
    let c_h = g.linear(&c_std, &format!("{prefix}.cond_proj"), e, h)?;

    // Step gate: how strongly the condition steers this step.
    let both = g.concat(&[&c_h, &t_h], 1);
    let gate = g.linear(&both, &format!("{prefix}.step_gate"), 2 * h, h)?;
    let gate = g.sigmoid(&gate);
    let steer = g.mul(&c_h, &gate);
    let c = g.add(&steer, &t_h);

    let mut hid = g.linear(&x, &format!("{prefix}.in_proj"), e, h)?;
    for i in 0..d.blocks {
        let b = format!("{prefix}.blocks.{i}");
        let inp = g.add(&hid, &c);
        let y = g.layer_norm(&inp, &format!("{b}.ln"), h, RESTORER_LN_EPS)?;
        let y = g.linear(&y, &format!("{b}.fc1"), h, 2 * h)?;
        let y = g.gelu(&y);
        let y = g.linear(&y, &format!("{b}.fc2"), 2 * h, h)?;
        hid = g.add(&hid, &y);
    }
    let y = g.layer_norm(&hid, &format!("{prefix}.ln_out"), h, RESTORER_LN_EPS)?;
    let prediction = g.linear(&y, &format!("{prefix}.out"), h, e)?;
    g.output(&prediction, "prediction", DType::F32, &row)?;

    // Trust gate and the head's feature.
    let trust = g.linear(&c_h, &format!("{prefix}.trust_gate"), h, 1)?;
    let trust = g.sigmoid(&trust);
    g.output(&trust, "trust", DType::F32, &[batch.clone(), Dim::Fixed(1)])?;
    let mean = g.param(&format!("{prefix}.mean_fill"), &[e])?;
    let std = g.param(&format!("{prefix}.target_std"), &[e])?;
    let restored = g.scoped(&format!("{prefix}.restored"), |g| {
        let y = g.mul(&x, &std);
        let y = g.mul(&y, &trust);
        g.add(&y, &mean)
    });
    g.output(&restored, "restored", DType::F32, &row)?;
    g.check_all_used(&format!("{prefix}."), graph_name)?;
    Ok(g.finish(graph_name))
}

/// Builds the task head: `image_embedding [batch, E]`, `text_embedding [batch, E]` →
/// `logits [batch, classes]` (`out(gelu(fc2(gelu(fc1([image ‖ text])))))`).
pub fn build_fusion_head(
    weights: &Weights,
    prefix: &str,
    d: &RestoreConfig,
) -> Result<ModelProto, ExportError> {
    let (e, k) = (d.embed_dim, d.head_hidden);
    if e == 0 || k == 0 || d.classes < 2 {
        return Err(ExportError::InvalidDims(format!(
            "fusion head: embed_dim {e} and head_hidden {k} must be > 0, classes {} >= 2",
            d.classes
        )));
    }
    let mut g = GraphBuilder::new(weights);
    g.set_doc(format!(
        "duet fusion head (docs/RESTORE.md): MLP over [image embedding, text embedding], \
         embed_dim {e}, hidden {k}, {} classes.",
        d.classes
    ));
    let batch = Dim::Sym("batch");
    let row = [batch.clone(), Dim::Fixed(e)];
    let image = g.input("image_embedding", DType::F32, &row)?;
    let text = g.input("text_embedding", DType::F32, &row)?;
    let x = g.concat(&[&image, &text], 1);
    let y = g.linear(&x, &format!("{prefix}.fc1"), 2 * e, k)?;
    let y = g.gelu(&y);
    let y = g.linear(&y, &format!("{prefix}.fc2"), k, k)?;
    let y = g.gelu(&y);
    let logits = g.linear(&y, &format!("{prefix}.out"), k, d.classes)?;
    g.output(
        &logits,
        "logits",
        DType::F32,
        &[batch, Dim::Fixed(d.classes)],
    )?;
    g.check_all_used(&format!("{prefix}."), Graph::FusionHead.name())?;
    Ok(g.finish(Graph::FusionHead.name()))
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, Tensor};
    use duet_models::params::named_tensors;
    use duet_models::{FeatureRestorer, FusionHead, RestoreConfig};
    use ndarray::ArrayD;
    use tract_onnx::prelude::Tensor as TractTensor;

    use super::*;
    use crate::onnx::model_to_bytes;
    use crate::onnx::test_util::{burn_tensor, random_array, rng, tract_plan, tract_run};
    use crate::parity::{max_abs_diff, to_array};

    type B = NdArray<f32>;

    fn weights_of<M: burn::module::Module<B>>(m: &M, prefix: &str, w: &mut Weights) {
        for (name, t) in named_tensors(m) {
            w.insert(format!("{prefix}.{name}"), t.shape, t.data)
                .unwrap();
        }
    }

    #[test]
    fn restorer_and_head_graphs_match_burn_on_tract() {
        let dev = Default::default();
        let cfg = RestoreConfig::new(16, 5);
        let e = cfg.embed_dim;
        let stat =
            |lo: f64, hi: f64| Tensor::<B, 1>::random([e], Distribution::Uniform(lo, hi), &dev);
        // Non-trivial statistics, so a graph that ignored them would fail.
        let r = FeatureRestorer::<B>::new(&cfg, &dev).with_statistics(
            (stat(-1.0, 1.0), stat(0.5, 2.0)),
            (stat(-1.0, 1.0), stat(0.5, 2.0)),
        );
        let head = FusionHead::<B>::new(&cfg, &dev);
        let mut w = Weights::new();
        weights_of(&r, "restorer.t2i", &mut w);
        weights_of(&head, "head", &mut w);

        let mut g = rng(5);
        let x = random_array(&mut g, &[3, e], 2.0);
        let cond = random_array(&mut g, &[3, e], 1.0);
        let t = ArrayD::from_shape_vec(vec![3], vec![0.0f32, 250.0, 999.0]).unwrap();
        let graph = build_restorer(&w, "restorer.t2i", "restorer_t2i", &cfg).unwrap();
        let plan = tract_plan(&model_to_bytes(&graph)).unwrap();
        let got = tract_run(
            &plan,
            vec![
                TractTensor::from(x.clone()),
                TractTensor::from(t.clone()),
                TractTensor::from(cond.clone()),
            ],
        )
        .unwrap();
        let (xb, cb) = (burn_tensor::<2>(&x), burn_tensor::<2>(&cond));
        let want = [
            to_array(r.forward(xb.clone(), burn_tensor::<1>(&t), cb.clone(), true)),
            to_array(r.trust(cb.clone(), true)),
            to_array(r.blend(r.unstandardise(xb), cb, true)),
        ];
        for (name, (g, w)) in ["prediction", "trust", "restored"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            let d = max_abs_diff(g, w);
            assert!(d < 1e-4, "{name}: {d}");
        }

        let (i, tx) = (
            random_array(&mut g, &[4, e], 1.0),
            random_array(&mut g, &[4, e], 1.0),
        );
        let graph = build_fusion_head(&w, "head", &cfg).unwrap();
        let plan = tract_plan(&model_to_bytes(&graph)).unwrap();
        let got = tract_run(
            &plan,
            vec![TractTensor::from(i.clone()), TractTensor::from(tx.clone())],
        )
        .unwrap();
        let want = to_array(head.forward(burn_tensor::<2>(&i), burn_tensor::<2>(&tx)));
        assert!(max_abs_diff(&got[0], &want) < 1e-4);

        // A weight the graph does not read is refused, not silently dropped.
        w.insert("head.extra", vec![1], vec![0.0]).unwrap();
        assert!(matches!(
            build_fusion_head(&w, "head", &cfg),
            Err(ExportError::UnusedParameters { .. })
        ));
    }
}

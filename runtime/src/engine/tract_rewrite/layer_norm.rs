//! ONNX `LayerNormalization` as one op per call instead of tract's expansion.
//!
//! tract-onnx expands each `LayerNormalization` into primitives when it types the graph: a
//! sum, a multiplication by `1/n`, a subtraction, tract's `RmsNorm` of the difference and a
//! multiply-add of scale and bias — five plan nodes and four passes over the tensor, each
//! with its own output. In the shipped denoiser (13 norms over `[2, 64, 128]`) those took
//! 0.69 of a 7–8 ms call, about 3 ns per element, where onnxruntime's fused kernel took 0.30.
//! [`RowLayerNorm`] normalises each row in two passes (sum, then squared deviations) and
//! writes the scaled result in a third, in one node.
//!
//! It replaces tract-onnx's parser for `LayerNormalization` ([`onnx`]): every norm over the
//! trailing axes of an `f32` tensor with scale and bias of that size and no mean / inverse
//! deviation outputs is wired as [`RowLayerNorm`]; anything else is wired by tract's own
//! expansion, whose type inference serves both.

use std::sync::OnceLock;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::infer::{Solver, TensorProxy};
use tract_onnx::tract_hir::internal::{expand, Expansion, InferenceOp, InferenceResult};

use super::plain_f32;

type Builder = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract-onnx's own `LayerNormalization` parser, which [`layer_norm`] wraps.
static TRACTS: OnceLock<Builder> = OnceLock::new();

/// tract-onnx's ONNX parser with `LayerNormalization` read as [`RowLayerNorm`] where it can be.
pub(in crate::engine) fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    if let Some(&tracts) = onnx.op_register.0.get("LayerNormalization") {
        TRACTS.get_or_init(|| tracts);
        onnx.op_register.insert("LayerNormalization", layer_norm);
    }
    onnx
}

fn layer_norm(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let tracts = TRACTS
        .get()
        .context("tract's LayerNormalization parser was not recorded")?;
    let (op, extra) = tracts(ctx, node)?;
    let stash = node
        .get_attr_opt::<DatumType>("stash_type")?
        .unwrap_or(DatumType::F32);
    let one_output = node.output.iter().skip(1).all(|o| o.is_empty());
    let Some(expansion) = op.as_op().downcast_ref::<Box<dyn Expansion>>() else {
        return Ok((op, extra));
    };
    if stash != DatumType::F32 || !one_output {
        return Ok((op, extra));
    }
    let fused = FusedLayerNorm {
        tracts: expansion.clone(),
        axis: node.get_attr_opt::<i64>("axis")?.unwrap_or(-1),
        epsilon: node.get_attr_opt::<f32>("epsilon")?.unwrap_or(1e-5),
    };
    Ok((expand(fused), extra))
}

/// The parsed `LayerNormalization`: typed by tract's expansion's rules, wired as
/// [`RowLayerNorm`] when the typed inputs fit it.
#[derive(Debug, Clone)]
struct FusedLayerNorm {
    tracts: Box<dyn Expansion>,
    axis: i64,
    epsilon: f32,
}

impl Expansion for FusedLayerNorm {
    fn name(&self) -> StaticName {
        "LayerNorm".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        self.tracts.nboutputs()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        self.tracts.rules(s, inputs, outputs)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = model.outlet_fact(inputs[0])?.clone();
        let rank = x.rank() as i64;
        let axis = if self.axis < 0 {
            self.axis + rank
        } else {
            self.axis
        };
        let plain_f32_fact = |f: &TypedFact| f.datum_type == f32::datum_type() && f.is_plain();
        // Scale and bias must line up with the normalised axes element for element (ONNX
        // broadcasts them from the right; leading 1s change nothing).
        let without_leading_ones = |dims: &[TDim]| -> Vec<TDim> {
            dims.iter().skip_while(|d| d.is_one()).cloned().collect()
        };
        let fits = (0..rank).contains(&axis)
            && plain_f32_fact(&x)
            && inputs[1..].iter().all(|&i| {
                model.outlet_fact(i).is_ok_and(|f| {
                    plain_f32_fact(f)
                        && f.rank() <= x.rank()
                        && without_leading_ones(&f.shape)
                            == without_leading_ones(&x.shape[axis as usize..])
                })
            });
        if !fits {
            return self.tracts.wire(prefix, model, inputs);
        }
        let op = RowLayerNorm {
            axis: axis as usize,
            epsilon: self.epsilon,
        };
        model.wire_node(prefix, op, inputs)
    }
}

/// Layer normalisation over the axes from `axis` on of a contiguous `f32` tensor:
/// `(x - mean) / sqrt(var + epsilon) · scale + bias` per row, scale and bias (optional) one
/// value per row element.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RowLayerNorm {
    axis: usize,
    epsilon: f32,
}
impl Eq for RowLayerNorm {}

impl Op for RowLayerNorm {
    fn name(&self) -> StaticName {
        "RowLayerNorm".into()
    }
    op_as_typed_op!();
}

/// `Σ f(v)` over `row`, in eight running sums (so the loop becomes vector operations).
#[inline(always)]
fn sum_by(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    let mut acc = [0f32; 8];
    for c in chunks {
        let c: &[f32; 8] = c.try_into().unwrap();
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl EvalOp for RowLayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.iter().all(|t| plain_f32(t)) && self.axis < inputs[0].rank(),
            "RowLayerNorm expects plain f32 tensors normalised from axis {}, got {inputs:?}",
            self.axis
        );
        let n: usize = inputs[0].shape()[self.axis..].iter().product();
        ensure!(
            inputs[1..].iter().all(|t| t.len() == n),
            "RowLayerNorm: scale and bias must have the {n} values of a row"
        );
        // Normalised in place: tract hands over its buffer when nothing else reads it.
        let mut x = inputs.remove(0).into_tensor();
        if x.len() == 0 || n == 0 {
            return Ok(tvec!(x.into_tvalue()));
        }
        let scale_plain = inputs[0].try_as_plain_ram()?;
        let scale = scale_plain.as_slice::<f32>()?;
        let bias_plain = inputs.get(1).map(|b| b.try_as_plain_ram()).transpose()?;
        let bias = bias_plain
            .as_ref()
            .map(|b| b.as_slice::<f32>())
            .transpose()?;
        {
            let mut x_plain = x.try_as_plain_ram_mut()?;
            for row in x_plain.as_slice_mut::<f32>()?.chunks_exact_mut(n) {
                let mean = sum_by(row, |v| v) / n as f32;
                let variance = sum_by(row, |v| (v - mean) * (v - mean)) / n as f32;
                let inv = 1.0 / (variance + self.epsilon).sqrt();
                match bias {
                    Some(bias) => {
                        for ((v, &s), &b) in row.iter_mut().zip(scale).zip(bias) {
                            *v = (*v - mean) * inv * s + b;
                        }
                    }
                    None => {
                        for (v, &s) in row.iter_mut().zip(scale) {
                            *v = (*v - mean) * inv * s;
                        }
                    }
                }
            }
        }
        Ok(tvec!(x.into_tvalue()))
    }
}

impl TypedOp for RowLayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::datum_type().fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use duet_testkit::{attr_int, GraphBuilder, Lcg, D, FLOAT};

    use super::super::test_support::worst_difference_of_runs;

    use super::*;

    /// Layer norms as ONNX writes them, through duet's parser and tract's: the same values
    /// within rounding at three batch sizes of the symbolic plan, and [`RowLayerNorm`] used
    /// exactly where it fits — over the last axis or the last two (scale of their shape, with
    /// or without a bias), not when the mean is asked for too, the scale broadcasts, or it has
    /// a row's size in another shape.
    #[test]
    fn layer_norms_match_tracts() {
        let mut rng = Lcg::new(11);
        // (normalised from axis, scale shape, a bias, the mean as a second output, fused)
        // (x's two fixed axes, normalised from axis, scale shape, a bias, the mean as a second
        // output, fused)
        type Case = ([usize; 2], i64, &'static [usize], bool, bool, bool);
        let cases: [Case; 7] = [
            ([5, 24], -1, &[24], true, false, true),
            ([5, 24], 2, &[1, 24], false, false, true),
            ([5, 24], 1, &[5, 24], true, false, true),
            ([5, 24], -1, &[24], true, true, false),
            ([5, 24], -1, &[1], true, false, false),
            // A row's size, but one value per row rather than per element.
            ([4, 4], -1, &[4, 1], true, false, false),
            ([4, 4], -1, &[4], true, false, true),
        ];
        for ([r, c], axis, scale_shape, with_bias, with_mean, fused) in cases {
            let mut g = GraphBuilder::default();
            let dims = [D::S("batch"), D::N(r as i64), D::N(c as i64)];
            let x = g.input("x", FLOAT, &dims);
            let n: usize = scale_shape.iter().product();
            let scale = g.f32("scale", scale_shape, rng.vec(n, 1.0));
            let bias = g.f32("bias", scale_shape, rng.vec(n, 1.0));
            let mut ins = vec![x.as_str(), scale.as_str()];
            if with_bias {
                ins.push(&bias);
            }
            let mut node_outputs = vec!["y".to_string()];
            if with_mean {
                node_outputs.push("mean".into());
            }
            let y = g.node(
                "LayerNormalization",
                &ins,
                vec![attr_int("axis", axis)],
                Some("y"),
            );
            g.output(&y, FLOAT, &dims);
            let mut bytes = g.finish(18);
            if with_mean {
                // The builder makes one output per node: name the mean output by hand.
                use tract_onnx::pb::ModelProto;
                let mut model = <ModelProto as prost::Message>::decode(&bytes[..]).unwrap();
                let graph = model.graph.as_mut().unwrap();
                graph.node.last_mut().unwrap().output = node_outputs.clone();
                bytes = prost::Message::encode_to_vec(&model);
            }
            let plan = |onnx: tract_onnx::Onnx| {
                onnx.model_for_read(&mut &bytes[..])
                    .unwrap()
                    .into_optimized()
                    .unwrap()
                    .into_runnable()
                    .unwrap()
            };
            let (theirs, ours) = (plan(tract_onnx::onnx()), plan(onnx()));
            let uses_ours = ours
                .model()
                .nodes()
                .iter()
                .any(|n| n.op_is::<RowLayerNorm>());
            assert_eq!(uses_ours, fused, "axis {axis}, scale {scale_shape:?}");
            for batch in [1usize, 3, 0] {
                let x = Tensor::from_shape(&[batch, r, c], &rng.vec(batch * r * c, 4.0)).unwrap();
                let worst = worst_difference_of_runs(&ours, &theirs, tvec!(x.into_tvalue()));
                assert!(worst < 1e-5, "axis {axis}, batch {batch}: {worst}");
            }
        }
    }
}

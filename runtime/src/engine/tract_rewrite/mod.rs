//! Rewrites of tract's model for the ops its own optimiser leaves slow in duet's graphs.
//!
//! **Broadcasting element-wise ops.** tract runs `a ⊙ b` fast when `b` is a per-row scalar
//! (`[B, T, D] - [B, T, 1]`, "by scalar") or repeats whole (`[B, T, D] + [1, 1, D]`,
//! "unicast"), and same-shape ops only when it can prove their size (a symbolic `batch`
//! defeats that). Everything else takes a generic broadcasting loop over dynamic-rank indices
//! at about 4 ns per element. In duet's denoiser that is the adaLN modulation and gates of
//! every block (`x · (1 + scale) + shift`, `x + gate · y`: `[B, T, D] ⊙ [B, 1, D]`), the
//! residual sums, and — in bundles exported with the patch embedding as a convolution, whose
//! layout tract turns channels-first — every bias add (`[B, D, T] + [1, D, 1]`): 1.5–2.5 ms
//! of a 10 ms call. No form of the ONNX graph avoids it: an explicit `Expand` or a transpose
//! around the op is folded back by tract's optimiser (both measured). So after tract
//! optimises, each remaining generic `f32` add, subtract or multiply whose smaller operand
//! only has 1s where it differs is replaced by [`BroadcastArith`]: loops over contiguous
//! rows that the compiler vectorises. Its arithmetic is the same single `f32` operation per
//! element as tract's, so outputs are bit-identical (tested against the unrewritten plan).
//!
//! **Convolutions with few outputs**: [`PlaneConv`], below.
//!
//! **Matrix products** (attention and linear layers) without tract's per-call packing:
//! [`products::StridedProduct`], on the `gemm` crate's kernels.
//!
//! **Layer normalisation** as one op instead of tract's five-node expansion:
//! [`layer_norm::RowLayerNorm`], wired by duet's parser of the ONNX op ([`onnx`]).
//!
//! Written here because no crate provides these rewrites (the arithmetic is a crate's where
//! one does it well: `gemm`): the fixes belong in tract, and this module goes away when tract
//! gains them.

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;

mod layer_norm;
mod products;
pub(super) use layer_norm::onnx;
pub(super) use products::rewrite_products;

/// The element-wise operations the rewrite takes over. (tract turns a division into a
/// multiplication by the reciprocal before this runs.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Arith {
    Add,
    Sub,
    Mul,
}

impl Arith {
    fn from_name(name: &str) -> Option<Arith> {
        match name {
            "Add" => Some(Arith::Add),
            "Sub" => Some(Arith::Sub),
            "Mul" => Some(Arith::Mul),
            _ => None,
        }
    }

    /// `row[i] = row[i] ⊙ by[i]`: one pass the compiler vectorises (the match is outside the
    /// loop).
    fn apply(self, row: &mut [f32], by: &[f32]) {
        let pairs = row.iter_mut().zip(by);
        match self {
            Arith::Add => pairs.for_each(|(a, b)| *a += *b),
            Arith::Sub => pairs.for_each(|(a, b)| *a -= *b),
            Arith::Mul => pairs.for_each(|(a, b)| *a *= *b),
        }
    }

    /// `row[i] = row[i] ⊙ by`.
    fn apply_scalar(self, row: &mut [f32], by: f32) {
        match self {
            Arith::Add => row.iter_mut().for_each(|a| *a += by),
            Arith::Sub => row.iter_mut().for_each(|a| *a -= by),
            Arith::Mul => row.iter_mut().for_each(|a| *a *= by),
        }
    }
}

/// `a ⊙ b` where `b` has `a`'s rank and, on every axis, `a`'s size or 1. The sizes are read
/// from the tensors at run time (an axis may be symbolic, e.g. `batch`).
#[derive(Debug, Clone)]
pub(super) struct BroadcastArith {
    arith: Arith,
    /// The op this replaced, evaluated instead if the tensors at run time do not have the
    /// expected layout (never seen; a guard, not a path).
    fallback: TypedBinOp,
}

impl PartialEq for BroadcastArith {
    fn eq(&self, other: &Self) -> bool {
        self.arith == other.arith
    }
}
impl Eq for BroadcastArith {}

impl Op for BroadcastArith {
    fn name(&self) -> StaticName {
        format!("Broadcast{:?}", self.arith).into()
    }
    op_as_typed_op!();
}

/// Whether `t` is an `f32` tensor stored in row-major order: what the rewritten ops' loops
/// read.
fn plain_f32(t: &Tensor) -> bool {
    t.datum_type() == f32::datum_type() && natural(t)
}

/// Whether `t`'s storage is its elements in row-major order. (The stride of an axis of size 1
/// does not matter: tract leaves odd ones after inserting an axis.)
fn natural(t: &Tensor) -> bool {
    t.len() == t.shape().iter().product::<usize>()
        && t.shape()
            .iter()
            .zip(t.strides())
            .zip(Tensor::natural_strides(t.shape()).iter())
            .all(|((&n, &s), &want)| n == 1 || s == want)
}

/// `a`'s axes merged into runs where `b` varies with `a` (`true`) or is 1 (`false`), as
/// `(size, b varies)`, dropping axes of size 1 in `a`; `None` if `b` is not `a`'s shape with
/// some axes set to 1.
fn runs(a: &[usize], b: &[usize]) -> Option<Vec<(usize, bool)>> {
    if a.len() != b.len() {
        return None;
    }
    let mut runs: Vec<(usize, bool)> = Vec::new();
    for (&n, &m) in a.iter().zip(b) {
        let varies = match (n, m) {
            (1, 1) => continue,
            (n, m) if n == m => true,
            (_, 1) => false,
            _ => return None,
        };
        match runs.last_mut() {
            Some((size, v)) if *v == varies => *size *= n,
            _ => runs.push((n, varies)),
        }
    }
    Some(runs)
}

impl EvalOp for BroadcastArith {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        let layout = runs(a.shape(), b.shape()).filter(|_| plain_f32(a) && plain_f32(b));
        let Some(runs) = layout else {
            return self.fallback.eval(ctx, inputs);
        };
        let (a, b) = args_2!(inputs);
        if a.len() == 0 {
            return Ok(tvec!(a));
        }
        let mut a = a.into_tensor();
        {
            let mut plain = a.try_as_plain_ram_mut()?;
            let out = plain.as_slice_mut::<f32>()?;
            let b_plain = b.try_as_plain_ram()?;
            let by = b_plain.as_slice::<f32>()?;
            let Some(&(inner, inner_varies)) = runs.last() else {
                // Every axis of size 1: one element.
                if let (Some(x), Some(&y)) = (out.first_mut(), by.first()) {
                    self.arith.apply_scalar(std::slice::from_mut(x), y);
                }
                return Ok(tvec!(a.into_tvalue()));
            };
            let outer = &runs[..runs.len() - 1];
            // `b`'s stride for each outer run (0 where `b` is 1 along it).
            let mut b_strides = vec![0usize; outer.len()];
            let mut stride = if inner_varies { inner } else { 1 };
            for (ix, &(size, varies)) in outer.iter().enumerate().rev() {
                if varies {
                    b_strides[ix] = stride;
                    stride *= size;
                }
            }
            // Row by row of the innermost run, with an odometer over the outer runs.
            let mut index = vec![0usize; outer.len()];
            let mut b_at = 0usize;
            for row in out.chunks_exact_mut(inner) {
                if inner_varies {
                    self.arith.apply(row, &by[b_at..b_at + inner]);
                } else {
                    self.arith.apply_scalar(row, by[b_at]);
                }
                for ix in (0..outer.len()).rev() {
                    index[ix] += 1;
                    b_at += b_strides[ix];
                    if index[ix] < outer[ix].0 {
                        break;
                    }
                    b_at -= b_strides[ix] * index[ix];
                    index[ix] = 0;
                }
            }
        }
        Ok(tvec!(a.into_tvalue()))
    }
}

impl TypedOp for BroadcastArith {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::datum_type().fact(inputs[0].shape.clone())))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        self.fallback.cost(inputs)
    }

    as_op!();
}

/// Whether the op `a ⊙ b → out` is one [`BroadcastArith`] takes: all `f32`, `out` of `a`'s
/// shape, and `b` of `a`'s rank with each axis `a`'s or 1.
fn broadcasts_into(a: &TypedFact, b: &TypedFact, out: &TypedFact) -> bool {
    let f32_dt = f32::datum_type();
    let one = TDim::Val(1);
    a.datum_type == f32_dt
        && b.datum_type == f32_dt
        && out.datum_type == f32_dt
        && a.rank() > 0
        && a.rank() == b.rank()
        && out.shape == a.shape
        && a.shape
            .iter()
            .zip(b.shape.iter())
            .all(|(x, y)| x == y || *y == one)
}

/// The op that replaces `node`, and whether its operands swap (a commutative op with the
/// smaller operand first, which tract swaps only when it can prove the sizes), if `node` is a
/// generic `f32` binary op [`BroadcastArith`] takes.
fn replacement(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(BroadcastArith, bool)>> {
    let Some(op) = node.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    let Some(arith) = Arith::from_name(op.0.name()) else {
        return Ok(None);
    };
    if op.1.is_some_and(|dt| dt != f32::datum_type()) {
        return Ok(None);
    }
    let inputs = model.node_input_facts(node.id)?;
    let out = model.outlet_fact(OutletId::new(node.id, 0))?;
    let swap = if broadcasts_into(inputs[0], inputs[1], out) {
        false
    } else if arith != Arith::Sub && broadcasts_into(inputs[1], inputs[0], out) {
        true
    } else {
        return Ok(None);
    };
    let op = BroadcastArith {
        arith,
        fallback: op.clone(),
    };
    Ok(Some((op, swap)))
}

/// Replaces every generic binary op [`BroadcastArith`] takes in an optimised model. Returns
/// how many were replaced.
pub(super) fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    replace_each(model, |model, node| {
        Ok(replacement(model, node)?.map(|(op, swap)| {
            let mut inputs = node.inputs.to_vec();
            if swap {
                inputs.swap(0, 1);
            }
            (op, inputs)
        }))
    })
}

/// Replaces each node `find` gives an op for (with the outlets to wire it to), one patch at a
/// time against the model as it is; the replaced nodes are left without successors and dropped
/// by the compaction. Returns how many were replaced.
fn replace_each<O: TypedOp>(
    model: &mut TypedModel,
    find: impl Fn(&TypedModel, &TypedNode) -> TractResult<Option<(O, Vec<OutletId>)>>,
) -> TractResult<usize> {
    let mut targets = Vec::new();
    for node in model.nodes() {
        if find(model, node)?.is_some() {
            targets.push(node.id);
        }
    }
    for &id in &targets {
        let node = model.node(id);
        if let Some((op, inputs)) = find(model, node)? {
            TypedModelPatch::replace_single_op(model, node, &inputs, op)?.apply(model)?;
        }
    }
    if !targets.is_empty() {
        model.compact()?;
    }
    Ok(targets.len())
}

/// A 2-D convolution with few output channels as one multiply-add pass over each padded input
/// plane per kernel tap, instead of tract's im2col (which materialises `C·k·k` rows of the
/// whole image before a matrix product that, with 3 output rows, is mostly packing). The
/// denoiser's 3×3 output convolution (32 → 3 channels, 32 × 32, batch 2) took 1.0 ms in
/// im2col alone there. Taken over only in the shape it handles: NCHW, one group, stride and
/// dilation 1, odd kernels padded to keep the size, constant `f32` weights.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PlaneConv {
    /// `[out, in, kh, kw]`, as ONNX stores it.
    kernel: Vec<f32>,
    bias: Vec<f32>,
    out_channels: usize,
    in_channels: usize,
    kh: usize,
    kw: usize,
}
impl Eq for PlaneConv {}

/// The most output channels the plane convolution takes: above it the matrix product's reuse
/// of each im2col row pays for building them.
const PLANE_CONV_MAX_OUT: usize = 8;

/// Outputs of one plane-convolution block, accumulated in registers (eight 4-wide vectors).
const BLOCK: usize = 32;

/// Magnitudes below this (2^-63) are taken as zero in the plane convolution's inputs and
/// weights. Two values above it multiply to at least 2^-126, the smallest normal `f32`; below
/// it the products are subnormal, which x86 computes through a microcode assist about 30×
/// slower. SiLU outputs of large negative numbers (1e-20 … 1e-37) are exactly that: on the
/// shipped denoiser's activations the convolution took 1.25 ms per image with them and 0.3 ms
/// without. What is dropped changes an output by less than `C·kh·kw · 2^-63 · max|w|`
/// (about 4e-18 there), far below an `f32` output's rounding.
const FLUSH_BELOW: f32 = 1.0 / (1u64 << 63) as f32;

fn flushed(v: f32) -> f32 {
    if v.abs() < FLUSH_BELOW {
        0.0
    } else {
        v
    }
}

impl PlaneConv {
    /// `acc[o] = bias[o] + Σ_{c, ky, kx} w[o, c, ky, kx] · padded[c] shifted by (ky, kx)`, each
    /// output row `wp` wide.
    /// (The loop's form matters: iterator chains over the weights or an unsized tap slice
    /// measured 3–6× slower here, as the compiler then kept the block in memory.)
    #[allow(clippy::needless_range_loop)]
    fn accumulate(&self, padded: &[f32], acc: &mut [f32], wp: usize, plane: usize) {
        let taps = self.in_channels * self.kh * self.kw;
        let len = acc.len() / self.out_channels;
        // A block of BLOCK outputs stays in registers over all C·kh·kw taps: one load of the
        // input per multiply-add, none of the accumulator.
        for (o, acc_o) in acc.chunks_exact_mut(len).enumerate() {
            let kernel = &self.kernel[o * taps..][..taps];
            for (j, out) in acc_o.chunks_mut(BLOCK).enumerate() {
                let mut block = [self.bias[o]; BLOCK];
                for c in 0..self.in_channels {
                    let src = &padded[c * plane + j * BLOCK..];
                    let kc = &kernel[c * self.kh * self.kw..][..self.kh * self.kw];
                    for ky in 0..self.kh {
                        let row = &src[ky * wp..];
                        let kr = &kc[ky * self.kw..][..self.kw];
                        for (kx, &weight) in kr.iter().enumerate() {
                            // A fixed-size view, so the loop below unrolls into vector ops.
                            let tap: &[f32; BLOCK] =
                                row[kx..kx + BLOCK].try_into().expect("a BLOCK-long slice");
                            for q in 0..BLOCK {
                                block[q] += weight * tap[q];
                            }
                        }
                    }
                }
                out.copy_from_slice(&block[..out.len()]);
            }
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Plane convolutions this thread evaluated with the batch split among a pool.
    static PLANE_CONV_SPLITS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Op for PlaneConv {
    fn name(&self) -> StaticName {
        "PlaneConv".into()
    }
    op_as_typed_op!();
}

impl EvalOp for PlaneConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        ensure!(
            x.datum_type() == f32::datum_type()
                && x.rank() == 4
                && x.shape()[1] == self.in_channels
                && natural(x),
            "PlaneConv expects an f32 [batch, {}, h, w] tensor, got {:?}",
            self.in_channels,
            x
        );
        let (batch, h, w) = (x.shape()[0], x.shape()[2], x.shape()[3]);
        let (ph, pw) = (self.kh / 2, self.kw / 2);
        let wp = w + 2 * pw;
        let plane = (h + 2 * ph) * wp;
        let x_plain = x.try_as_plain_ram()?;
        let xs = x_plain.as_slice::<f32>()?;
        let mut out = Tensor::zero::<f32>(&[batch, self.out_channels, h, w])?;
        if out.len() == 0 {
            return Ok(tvec!(out.into_tvalue()));
        }
        {
            let mut out_plain = out.try_as_plain_ram_mut()?;
            let ys = out_plain.as_slice_mut::<f32>()?;
            let (per_in, per_out) = (self.in_channels * h * w, self.out_channels * h * w);
            // Output rows computed `wp` wide too: columns `w..wp` are wrap-around, dropped.
            let len = h * wp;
            // Scratch of one thread, reused across its images: each input plane zero-padded,
            // rows `wp` wide, with slack at the end so the last block of the last tap may read
            // past the last row (into columns that are dropped); only the interior is
            // rewritten per image, so the padding stays zero.
            let scratch = || {
                (
                    vec![0f32; self.in_channels * plane + self.kw + BLOCK],
                    vec![0f32; self.out_channels * len],
                )
            };
            let image =
                |(padded, acc): &mut (Vec<f32>, Vec<f32>), img: &[f32], out_b: &mut [f32]| {
                    for c in 0..self.in_channels {
                        for y in 0..h {
                            let dst = c * plane + (y + ph) * wp + pw;
                            let src = &img[(c * h + y) * w..][..w];
                            for (p, &v) in padded[dst..dst + w].iter_mut().zip(src) {
                                *p = flushed(v);
                            }
                        }
                    }
                    self.accumulate(padded, acc, wp, plane);
                    for o in 0..self.out_channels {
                        for y in 0..h {
                            out_b[(o * h + y) * w..][..w]
                                .copy_from_slice(&acc[o * len + y * wp..][..w]);
                        }
                    }
                };
            // The images of a batch (the guided pair of a sampler step) side by side on the
            // engine's threads when it has several; the executor is looked up only then.
            let executor = (batch > 1).then(tract_linalg::multithread::current_tract_executor);
            match &executor {
                Some(tract_linalg::multithread::Executor::MultiThread(pool)) => {
                    use rayon::prelude::*;
                    #[cfg(test)]
                    PLANE_CONV_SPLITS.with(|n| n.set(n.get() + 1));
                    pool.install(|| {
                        xs.par_chunks(per_in)
                            .zip(ys.par_chunks_mut(per_out))
                            .for_each_init(scratch, |s, (img, out_b)| image(s, img, out_b))
                    })
                }
                _ => {
                    let mut s = scratch();
                    for (img, out_b) in xs.chunks(per_in).zip(ys.chunks_mut(per_out)) {
                        image(&mut s, img, out_b);
                    }
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PlaneConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        ensure!(shape.len() == 4);
        shape[1] = self.out_channels.to_dim();
        Ok(tvec!(f32::datum_type().fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let s = &inputs[0].shape;
        let per_pixel = self.out_channels * self.in_channels * self.kh * self.kw;
        let pixels = s[0].clone() * s[2].clone() * s[3].clone();
        Ok(tvec!((Cost::FMA(f32::datum_type()), pixels * per_pixel)))
    }

    as_op!();
}

/// The plane convolution that replaces `node`, if `node` is a convolution it handles.
fn plane_conv(model: &TypedModel, node: &TypedNode) -> TractResult<Option<PlaneConv>> {
    use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
    use tract_onnx::tract_core::ops::nn::DataFormat;
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let spec = &conv.pool_spec;
    let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&d| d == 1));
    let [kh, kw] = spec.kernel_shape[..] else {
        return Ok(None);
    };
    let same = tvec![kh / 2, kw / 2];
    let padded_same =
        matches!(&spec.padding, PaddingSpec::Explicit(b, a) if *b == same && *a == same);
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || !ones(&spec.strides)
        || !ones(&spec.dilations)
        || kh % 2 == 0
        || kw % 2 == 0
        || !padded_same
        || spec.output_channels > PLANE_CONV_MAX_OUT
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    let f32_dt = f32::datum_type();
    if facts[0].datum_type != f32_dt || facts[0].rank() != 4 {
        return Ok(None);
    }
    let (Some(kernel), Some(bias)) = (&facts[1].konst, &facts[2].konst) else {
        return Ok(None);
    };
    if kernel.datum_type() != f32_dt || bias.datum_type() != f32_dt {
        return Ok(None);
    }
    let (o, i) = (spec.output_channels, spec.input_channels);
    if kernel.shape() != [o, i, kh, kw] {
        return Ok(None);
    }
    let kernel = kernel
        .to_plain_array_view::<f32>()?
        .iter()
        .map(|&v| flushed(v))
        .collect();
    let bias: Vec<f32> = bias.to_plain_array_view::<f32>()?.iter().copied().collect();
    let bias = match bias.len() {
        1 => vec![bias[0]; o],
        n if n == o => bias,
        _ => return Ok(None),
    };
    Ok(Some(PlaneConv {
        kernel,
        bias,
        out_channels: o,
        in_channels: i,
        kh,
        kw,
    }))
}

/// Replaces the convolutions [`PlaneConv`] handles in a decluttered model (before tract's
/// code generation turns them into im2col and a matrix product). Returns how many.
pub(super) fn rewrite_convolutions(model: &mut TypedModel) -> TractResult<usize> {
    replace_each(model, |model, node| {
        Ok(plane_conv(model, node)?.map(|op| (op, vec![node.inputs[0]])))
    })
}

/// Plumbing shared by the rewrites' tests.
#[cfg(test)]
mod test_support {
    use tract_onnx::prelude::*;

    /// tract's decluttered model of ONNX `bytes` (where the rewrites before code generation
    /// run).
    pub(super) fn decluttered(bytes: &[u8]) -> TypedModel {
        tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .unwrap()
            .into_typed()
            .unwrap()
            .into_decluttered()
            .unwrap()
    }

    /// tract's own plan of a model (what a rewritten copy of it is checked against).
    pub(super) fn tracts_plan(model: &TypedModel) -> Arc<TypedRunnableModel> {
        model
            .clone()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap()
    }

    /// The largest `|ours - theirs|` between the first outputs of two plans run on `feed`.
    pub(super) fn worst_difference_of_runs(
        ours: &Arc<TypedRunnableModel>,
        theirs: &Arc<TypedRunnableModel>,
        feed: TVec<TValue>,
    ) -> f32 {
        let want = theirs.run(feed.clone()).unwrap();
        let got = ours.run(feed).unwrap();
        worst_difference(&got[0], &want[0])
    }

    /// The largest `|got - want|` between two `f32` outputs of the same shape.
    pub(super) fn worst_difference(got: &TValue, want: &TValue) -> f32 {
        assert_eq!(got.shape(), want.shape());
        let (got, want) = (
            got.to_plain_array_view::<f32>().unwrap(),
            want.to_plain_array_view::<f32>().unwrap(),
        );
        // A NaN on either side is the worst difference (`f32::max` would skip it).
        got.iter().zip(want.iter()).fold(0f32, |m, (a, b)| {
            let d = (a - b).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                m.max(d)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(shape: &[TDim]) -> TypedFact {
        f32::datum_type().fact(shape)
    }

    use super::test_support::{decluttered, tracts_plan, worst_difference_of_runs};

    #[test]
    fn which_shapes_are_taken_over() {
        let b = TDim::Sym(SymbolScope::default().sym("batch"));
        let n = |v: i64| TDim::Val(v);
        let case = |a: &[TDim], s: &[TDim]| broadcasts_into(&fact(a), &fact(s), &fact(a));
        let (bt, t, d) = (b.clone(), n(5), n(16));
        let btd = [bt.clone(), t.clone(), d.clone()];
        // The adaLN modulation, same shapes, channels-first bias, two broadcast axes.
        assert!(case(&btd, &[bt.clone(), n(1), d.clone()]));
        assert!(case(&btd, &btd));
        assert!(case(
            &[bt.clone(), d.clone(), t.clone()],
            &[n(1), d.clone(), n(1)]
        ));
        assert!(case(
            &[bt.clone(), n(4), t.clone(), d.clone()],
            &[bt.clone(), n(1), n(1), d.clone()]
        ));
        // Another rank, another size, another type, or an output of the other operand's shape.
        assert!(!case(&btd, std::slice::from_ref(&d)));
        assert!(!case(&btd, &[bt.clone(), n(3), d.clone()]));
        assert!(!case(&[], &[]));
        let ints = i64::datum_type().fact([bt.clone(), t.clone()]);
        assert!(!broadcasts_into(&ints, &ints, &ints));
        let big = fact(&btd);
        let small = fact(&[bt, n(1), d]);
        assert!(!broadcasts_into(&small, &big, &big));
    }

    #[test]
    fn runs_merge_axes_by_kind() {
        assert_eq!(
            runs(&[2, 5, 16], &[2, 1, 16]),
            Some(vec![(2, true), (5, false), (16, true)])
        );
        assert_eq!(
            runs(&[2, 16, 5], &[1, 16, 1]),
            Some(vec![(2, false), (16, true), (5, false)])
        );
        assert_eq!(
            runs(&[2, 1, 5, 16], &[2, 1, 5, 16]),
            Some(vec![(160, true)])
        );
        assert_eq!(
            runs(&[2, 4, 5, 16], &[2, 1, 1, 16]),
            Some(vec![(2, true), (20, false), (16, true)])
        );
        assert_eq!(runs(&[1, 1], &[1, 1]), Some(vec![]));
        assert_eq!(runs(&[2, 5], &[2, 3]), None);
        assert_eq!(runs(&[2, 5], &[5]), None);
    }

    /// The rewritten plan gives bit-identical outputs to tract's own on a graph with every
    /// op kind, for two batch sizes of the same symbolic plan.
    #[test]
    fn rewritten_plan_is_bit_identical_to_tracts() {
        use duet_testkit::{GraphBuilder, Lcg, D, FLOAT};
        use tract_onnx::prelude::InferenceModelExt;
        let mut g = GraphBuilder::default();
        let x = g.input("x", FLOAT, &[D::S("batch"), D::N(7), D::N(24)]);
        let s = g.input("s", FLOAT, &[D::S("batch"), D::N(1), D::N(24)]);
        let a = g.op("Add", &[&x, &s]);
        let a = g.op("Mul", &[&a, &s]);
        let a = g.op("Sub", &[&a, &s]);
        let a = g.op("Div", &[&a, &s]);
        let a = g.op("Add", &[&a, &x]);
        let per_token = g.f32("c", &[1, 7, 1], (0..7).map(|j| j as f32 - 3.0).collect());
        let a = g.op("Add", &[&a, &per_token]);
        g.node("Mul", &[&s, &a], vec![], Some("out"));
        g.output("out", FLOAT, &[D::S("batch"), D::N(7), D::N(24)]);
        let bytes = g.finish(18);
        let typed = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .unwrap()
            .into_optimized()
            .unwrap();
        let mut ours = typed.clone();
        assert_eq!(rewrite(&mut ours).unwrap(), 7);
        let (theirs, ours) = (
            typed.into_runnable().unwrap(),
            ours.into_runnable().unwrap(),
        );
        let mut rng = Lcg::new(9);
        // An empty batch too: nothing to do, and no row loop over zero-length rows.
        for batch in [1usize, 4, 0] {
            let x = Tensor::from_shape(&[batch, 7, 24], &rng.vec(batch * 7 * 24, 3.0)).unwrap();
            let s: Vec<f32> = rng.vec(batch * 24, 3.0).iter().map(|v| v + 4.0).collect();
            let s = Tensor::from_shape(&[batch, 1, 24], &s).unwrap();
            let feed = || tvec!(x.clone().into_tvalue(), s.clone().into_tvalue());
            let want = theirs.run(feed()).unwrap();
            let got = ours.run(feed()).unwrap();
            assert_eq!(
                got[0].to_plain_array_view::<f32>().unwrap(),
                want[0].to_plain_array_view::<f32>().unwrap(),
                "batch {batch}"
            );
        }
    }

    /// Convolutions: the ones [`PlaneConv`] takes (3×3 and 5×3 kernels padded to keep the size,
    /// with and without a bias) give tract's values within rounding, at two batch sizes of
    /// the symbolic plan; a strided one and one with many output channels stay tract's.
    #[test]
    fn plane_convolutions_match_tracts() {
        use duet_testkit::{attr_ints, GraphBuilder, Lcg, D, FLOAT};
        let mut rng = Lcg::new(5);
        let (c, h, w) = (5usize, 9usize, 11usize);
        // (out channels, kernel, pads, strides, a bias input, taken over)
        let cases = [
            (3usize, [3usize, 3usize], [1i64, 1], [1i64, 1], true, true),
            (2, [5, 3], [2, 1], [1, 1], false, true),
            (3, [3, 3], [1, 1], [2, 2], true, false),
            (PLANE_CONV_MAX_OUT + 1, [3, 3], [1, 1], [1, 1], true, false),
        ];
        for (o, [kh, kw], [ph, pw], strides, with_bias, taken) in cases {
            let mut g = GraphBuilder::default();
            let x = g.input(
                "x",
                FLOAT,
                &[
                    D::S("batch"),
                    D::N(c as i64),
                    D::N(h as i64),
                    D::N(w as i64),
                ],
            );
            let k = g.f32("k", &[o, c, kh, kw], rng.vec(o * c * kh * kw, 0.5));
            let attrs = vec![
                attr_ints("kernel_shape", &[kh as i64, kw as i64]),
                attr_ints("pads", &[ph, pw, ph, pw]),
                attr_ints("strides", &strides),
            ];
            // Without a bias input tract holds a scalar zero bias.
            if with_bias {
                let b = g.f32("b", &[o], rng.vec(o, 0.5));
                g.node("Conv", &[&x, &k, &b], attrs, Some("y"));
            } else {
                g.node("Conv", &[&x, &k], attrs, Some("y"));
            }
            g.output(
                "y",
                FLOAT,
                &[D::S("batch"), D::N(o as i64), D::Unknown, D::Unknown],
            );
            let bytes = g.finish(18);
            let mut decluttered = decluttered(&bytes);
            let theirs = tracts_plan(&decluttered);
            let n = rewrite_convolutions(&mut decluttered).unwrap();
            assert_eq!(
                n,
                usize::from(taken),
                "{o} outputs, kernel {kh}x{kw}, strides {strides:?}"
            );
            let ours = decluttered
                .into_optimized()
                .unwrap()
                .into_runnable()
                .unwrap();
            for batch in [1usize, 3, 0] {
                let x = Tensor::from_shape(&[batch, c, h, w], &rng.vec(batch * c * h * w, 2.0))
                    .unwrap();
                let worst = worst_difference_of_runs(&ours, &theirs, tvec!(x.into_tvalue()));
                assert!(
                    worst < 1e-5,
                    "{o} outputs, kernel {kh}x{kw}, batch {batch}: {worst}"
                );
            }
            // The images of a batch split among a pool's threads: the same values, bit for bit.
            let pool = tract_linalg::multithread::Executor::multithread(2);
            let x = Tensor::from_shape(&[3, c, h, w], &rng.vec(3 * c * h * w, 2.0)).unwrap();
            let feed = tvec!(x.into_tvalue());
            let one = ours.run(feed.clone()).unwrap();
            let splits = PLANE_CONV_SPLITS.with(std::cell::Cell::get);
            let two = tract_linalg::multithread::multithread_tract_scope(pool, || ours.run(feed))
                .unwrap();
            let split = PLANE_CONV_SPLITS.with(std::cell::Cell::get) - splits;
            assert_eq!(
                split,
                usize::from(taken),
                "{o} outputs: batch split {split} times"
            );
            assert_eq!(
                super::test_support::worst_difference(&two[0], &one[0]),
                0.0,
                "{o} outputs, kernel {kh}x{kw}, on two threads"
            );
        }
    }
}

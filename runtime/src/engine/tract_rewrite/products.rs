//! Matrix products (`f32` einsums with one summed axis), computed from the operands' own
//! strides instead of tract's packed-kernel lowering.
//!
//! tract lowers every product to its packed matrix kernel: each operand is moved into the
//! kernel's layout (`MoveAxis`), packed (`OptMatMulPack`), multiplied, and the result reshaped
//! back — five to eight plan nodes per product. Weights are packed once, at load, but the
//! activations of every product are packed on every call, and both operands of attention's
//! `Q·Kᵀ` and `P·V`. In the shipped vision encoder (64 tokens) the packs took 0.18 of a
//! 1.86 ms run and tract's kernels ran its 64 × 64 attention products at about half their
//! speed on the linear layers. [`StridedProduct`] replaces such an einsum with one node:
//!
//! - **small products of two computed tensors** (a decoder step's attention: one query row
//!   per head against 64 image tokens; rows of `A` at most [`SMALL_ROWS`], multiply-adds per
//!   batch slice at most [`SMALL_WORK`]): each row of `A` and each column of `B` gathered
//!   contiguous along the summed axis, then dot products;
//! - **every other product whose row axes and column axes each merge into one strided axis**
//!   (attention of any length, and linear layers: `[batch, tokens, k] · [k, n]` against a
//!   constant weight): the `gemm` crate's kernels, which take both operands through their
//!   strides, one matrix per batch slice — no move or pack nodes in the plan (gemm packs a
//!   block internally where its kernel gains from it, a weight included: work tract did once,
//!   at load; measured, gemm is still faster). (A weight never takes the direct path: it
//!   would gather the weight's columns afresh on every call.)
//!
//! Anything else at run time (an operand broadcast along the summed axis, a layout that does
//! not merge) runs tract's own plan of the einsum, built on first need. With
//! `EngineOptions::threads` above 1, products of at least [`PARALLEL_ROWS`] rows and gemm's
//! own minimum of work are split among the threads of the engine's pool (tract's); smaller
//! ones run on the calling thread.

use std::sync::{Arc, OnceLock};

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::{plain_f32, replace_each};

/// The most rows of `A` (per batch slice) the direct path takes; above it the `gemm` kernels,
/// which reuse each loaded column across rows, are faster.
pub(super) const SMALL_ROWS: usize = 16;

/// The fewest rows of `A` a product needs to be split among the engine's threads (with gemm's
/// own minimum of work): splitting fewer rows (a decoder step's vocabulary projection, a short
/// prompt's text encoder) costs more in hand-off than it saves; measured at 8 rows, beam search
/// and captions were slower. (Splitting a batch of small products — attention's heads — among
/// the threads instead was slower too: denoiser 4.0 → 4.6 ms at two threads.)
const PARALLEL_ROWS: usize = 32;

/// The most multiply-adds per batch slice the direct path takes (a long symbolic axis among
/// the columns or the summed axis).
const SMALL_WORK: usize = 1 << 20;

/// Which path each evaluation took, counted per thread, so tests can tell the paths apart
/// (each agrees with tract's values, so the values alone cannot).
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Taken {
    direct: usize,
    gemm: usize,
    /// `gemm` calls split among the pool's threads.
    pooled: usize,
    fallback: usize,
}

#[cfg(test)]
thread_local! {
    static TAKEN: std::cell::Cell<Taken> = const {
        std::cell::Cell::new(Taken { direct: 0, gemm: 0, pooled: 0, fallback: 0 })
    };
}

/// Counts one evaluation's path (tests only).
#[cfg(test)]
fn took(count: impl FnOnce(&mut Taken)) {
    TAKEN.with(|t| {
        let mut taken = t.get();
        count(&mut taken);
        t.set(taken);
    });
}

/// Where each axis of an einsum `A, B -> C` sits, by role: `batch` in all three, rows `m` in
/// `A` and `C`, columns `n` in `B` and `C`, and the one summed axis `k` in `A` and `B`.
#[derive(Debug, Clone)]
struct Layout {
    /// `[position in A, in B, in C]`.
    batch: Vec<[usize; 3]>,
    /// `[position in A, in C]`.
    m: Vec<[usize; 2]>,
    /// `[position in B, in C]`.
    n: Vec<[usize; 2]>,
    /// `[position in A, in B]`.
    k: [usize; 2],
}

impl Layout {
    /// The roles of `axes`' axes, if it is a product this op computes: two inputs, each axis
    /// at most once per tensor, exactly one summed axis, no axis in one input only that is
    /// summed, none in the output only.
    fn of(axes: &AxesMapping) -> Option<Layout> {
        if axes.input_count() != 2 || axes.output_count() != 1 {
            return None;
        }
        let at_most_one = |v: &TVec<usize>| match v.len() {
            0 => Some(None),
            1 => Some(Some(v[0])),
            _ => None,
        };
        let (mut batch, mut m, mut n, mut k) = (vec![], vec![], vec![], None);
        for axis in axes.iter_all_axes() {
            let a = at_most_one(&axis.inputs[0])?;
            let b = at_most_one(&axis.inputs[1])?;
            let c = at_most_one(&axis.outputs[0])?;
            match (a, b, c) {
                (Some(a), Some(b), Some(c)) => batch.push([a, b, c]),
                (Some(a), None, Some(c)) => m.push([a, c]),
                (None, Some(b), Some(c)) => n.push([b, c]),
                (Some(a), Some(b), None) if k.is_none() => k = Some([a, b]),
                _ => return None,
            }
        }
        Some(Layout { batch, m, n, k: k? })
    }

    /// Whether the row axes lie next to each other in the same order in `A` and `C`, and so
    /// do the column axes in `B` and `C`: with the tensors' natural strides each group is
    /// then one strided axis, so each operand is one matrix per batch slice — the form the
    /// `gemm` kernels take. (A linear layer's `[batch, tokens, k] · [k, n]` has two row axes.)
    fn matrices(&self) -> bool {
        fn adjacent(axes: &[[usize; 2]]) -> bool {
            let mut sorted = axes.to_vec();
            sorted.sort();
            sorted
                .windows(2)
                .all(|w| w[1][0] == w[0][0] + 1 && w[1][1] == w[0][1] + 1)
        }
        adjacent(&self.m) && adjacent(&self.n)
    }
}

/// One group of axes (`[position in the operand, in the output]`) as a single axis: its size
/// and its strides in the operand and in the output, if the group is contiguous in both
/// (each axis's stride the next inner one's times its size); no axes is a size of 1.
fn merged(
    axes: &[[usize; 2]],
    shape: &[usize],
    strides: &[usize],
    out_strides: &[usize],
) -> Option<(usize, isize, isize)> {
    let mut sorted = axes.to_vec();
    sorted.sort();
    let Some(&[inner, inner_c]) = sorted.last() else {
        return Some((1, 0, 0));
    };
    for w in sorted.windows(2) {
        let ([outer, outer_c], [next, next_c]) = (w[0], w[1]);
        if strides[outer] != strides[next] * shape[next]
            || out_strides[outer_c] != out_strides[next_c] * shape[next]
        {
            return None;
        }
    }
    let size = sorted.iter().map(|&[p, _]| shape[p]).product();
    Some((size, strides[inner] as isize, out_strides[inner_c] as isize))
}

/// An `f32` einsum with one summed axis, evaluated from its operands' strides: directly when
/// small, on the `gemm` kernels otherwise (see the module documentation).
#[derive(Debug, Clone)]
pub(super) struct StridedProduct {
    einsum: EinSum,
    layout: Layout,
    /// The einsum's input facts in the model it came from (symbolic axes kept), for the
    /// fallback plan.
    facts: [TypedFact; 2],
    /// The symbol scope of those facts' axes (the fallback plan's model must share it).
    symbols: SymbolScope,
    /// Whether small calls may take the direct path: not when an operand is a constant (a
    /// weight matrix), whose columns it would gather afresh on every call.
    direct: bool,
    /// tract's plan of the einsum alone, for calls neither path takes; built the first time
    /// one comes.
    fallback: Arc<OnceLock<Arc<TypedRunnableModel>>>,
}

impl PartialEq for StridedProduct {
    fn eq(&self, other: &Self) -> bool {
        self.einsum == other.einsum
    }
}
impl Eq for StridedProduct {}

impl Op for StridedProduct {
    fn name(&self) -> StaticName {
        "StridedProduct".into()
    }
    op_as_typed_op!();
}

/// Offsets of every index of `axes` (`(size, strides)`, outermost first) into tensors with
/// those strides.
fn offsets<const N: usize>(axes: &[(usize, [usize; N])]) -> Vec<[usize; N]> {
    let mut all = vec![[0usize; N]];
    for &(size, strides) in axes {
        all = all
            .iter()
            .flat_map(|base| {
                (0..size).map(move |i| std::array::from_fn(|t| base[t] + i * strides[t]))
            })
            .collect();
    }
    all
}

/// `dst[i] = src[start + i·stride]`.
fn gather(src: &[f32], start: usize, stride: usize, dst: &mut [f32]) {
    if stride == 1 {
        dst.copy_from_slice(&src[start..start + dst.len()]);
    } else {
        for (i, d) in dst.iter_mut().enumerate() {
            *d = src[start + i * stride];
        }
    }
}

/// `Σ a[i]·b[i]` over eight running sums (fixed-size chunks, so the loop becomes vector
/// multiply-adds).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        let (x, y): (&[f32; 8], &[f32; 8]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl StridedProduct {
    fn fallback_plan(&self) -> TractResult<&Arc<TypedRunnableModel>> {
        if let Some(plan) = self.fallback.get() {
            return Ok(plan);
        }
        let mut model = TypedModel {
            symbols: self.symbols.clone(),
            ..TypedModel::default()
        };
        let mut wires = tvec!();
        for (ix, fact) in self.facts.iter().enumerate() {
            wires.push(model.add_source(format!("input.{ix}"), fact.clone())?);
        }
        let out = model.wire_node("einsum", self.einsum.clone(), &wires)?;
        model.select_output_outlets(&out)?;
        let plan = model.into_optimized()?.into_runnable()?;
        // Two threads racing here build the same plan; either one is kept.
        Ok(self.fallback.get_or_init(|| plan))
    }
}

impl EvalOp for StridedProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let l = &self.layout;
        let (a, b) = (&inputs[0], &inputs[1]);
        let (sa, sb) = (a.shape(), b.shape());
        // Anything but the expected layout and sizes (tract also accepts a summed axis of 1
        // against k, broadcast) goes to tract's own plan of the einsum.
        let expected = plain_f32(a)
            && plain_f32(b)
            && sa.len() == self.facts[0].rank()
            && sb.len() == self.facts[1].rank()
            && sa[l.k[0]] == sb[l.k[1]]
            && l.batch
                .iter()
                .all(|&[pa, pb, _]| sa[pa] == sb[pb] || sa[pa] == 1 || sb[pb] == 1);
        if !expected {
            #[cfg(test)]
            took(|t| t.fallback += 1);
            return self.fallback_plan()?.run(inputs);
        }
        let k = sa[l.k[0]];
        let rows: usize = l.m.iter().map(|&[pa, _]| sa[pa]).product();
        let cols: usize = l.n.iter().map(|&[pb, _]| sb[pb]).product();
        let small = self.direct
            && rows <= SMALL_ROWS
            && rows.saturating_mul(cols).saturating_mul(k) <= SMALL_WORK;
        let rank = l.batch.len() + l.m.len() + l.n.len();
        let mut shape = vec![0usize; rank];
        for &[pa, pb, pc] in &l.batch {
            shape[pc] = if sa[pa] == 1 { sb[pb] } else { sa[pa] };
        }
        for &[pa, pc] in &l.m {
            shape[pc] = sa[pa];
        }
        for &[pb, pc] in &l.n {
            shape[pc] = sb[pb];
        }
        let mut out = Tensor::zero::<f32>(&shape)?;
        if out.len() == 0 || k == 0 {
            return Ok(tvec!(out.into_tvalue()));
        }
        let strides = |s: &[usize]| -> Vec<usize> {
            Tensor::natural_strides(s)
                .iter()
                .map(|&v| v as usize)
                .collect()
        };
        let (ta, tb, tc) = (strides(sa), strides(sb), strides(&shape));
        // A batch axis of size 1 in one operand repeats it: stride 0.
        let batch = offsets(
            &l.batch
                .iter()
                .map(|&[pa, pb, pc]| {
                    let s = |size: usize, stride: usize| if size == 1 { 0 } else { stride };
                    (shape[pc], [s(sa[pa], ta[pa]), s(sb[pb], tb[pb]), tc[pc]])
                })
                .collect::<Vec<_>>(),
        );
        // Otherwise each operand as one strided matrix per batch slice, if its row and column
        // axes merge (always, for the layouts taken, with natural strides).
        let matrices = if small {
            None
        } else {
            match (merged(&l.m, sa, &ta, &tc), merged(&l.n, sb, &tb, &tc)) {
                (Some(rows), Some(columns)) => Some((rows, columns)),
                _ => {
                    #[cfg(test)]
                    took(|t| t.fallback += 1);
                    return self.fallback_plan()?.run(inputs);
                }
            }
        };
        let (ka, kb) = (ta[l.k[0]], tb[l.k[1]]);
        let a_plain = a.try_as_plain_ram()?;
        let b_plain = b.try_as_plain_ram()?;
        let (xs, ys) = (a_plain.as_slice::<f32>()?, b_plain.as_slice::<f32>()?);
        let mut out_plain = out.try_as_plain_ram_mut()?;
        let zs = out_plain.as_slice_mut::<f32>()?;
        if let Some(((m_size, a_row, c_row), (n_size, b_col, c_col))) = matrices {
            // On the engine's thread pool when it has one (`EngineOptions::threads`) and the
            // product is large enough to gain from it; the executor (a global lock when no
            // pool is set) is looked up only then.
            let large = m_size >= PARALLEL_ROWS
                && m_size.saturating_mul(n_size).saturating_mul(k)
                    >= gemm::get_threading_threshold();
            let executor = large.then(tract_linalg::multithread::current_tract_executor);
            let pool = match &executor {
                Some(tract_linalg::multithread::Executor::MultiThread(pool)) => Some(pool),
                _ => None,
            };
            #[cfg(test)]
            took(|t| {
                t.gemm += 1;
                t.pooled += usize::from(pool.is_some());
            });
            let parallelism = pool.map_or(gemm::Parallelism::None, |p| {
                gemm::Parallelism::Rayon(p.current_num_threads())
            });
            let products = |zs: &mut [f32]| {
                for &[oa, ob, oc] in &batch {
                    // SAFETY: every offset and stride comes from the operands' and the output's
                    // own shapes (checked above: plain f32 of the einsum's ranks, equal summed
                    // axes, batch axes equal or 1 with stride 0), so each element gemm reads or
                    // writes, `base + i·stride` for `i` below the axis size, lies inside
                    // `xs`, `ys` and `zs`; the output does not alias the inputs.
                    unsafe {
                        gemm::gemm(
                            m_size,
                            n_size,
                            k,
                            zs.as_mut_ptr().add(oc),
                            c_col,
                            c_row,
                            false,
                            xs.as_ptr().add(oa),
                            ka as isize,
                            a_row,
                            ys.as_ptr().add(ob),
                            b_col,
                            kb as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            parallelism,
                        );
                    }
                }
            };
            match pool {
                Some(pool) => pool.install(|| products(zs)),
                None => products(zs),
            }
        } else {
            #[cfg(test)]
            took(|t| t.direct += 1);
            let m = offsets(
                &l.m.iter()
                    .map(|&[pa, pc]| (sa[pa], [ta[pa], tc[pc]]))
                    .collect::<Vec<_>>(),
            );
            let n = offsets(
                &l.n.iter()
                    .map(|&[pb, pc]| (sb[pb], [tb[pb], tc[pc]]))
                    .collect::<Vec<_>>(),
            );
            // B's columns of one batch slice, each contiguous along the summed axis.
            let mut columns = vec![0f32; n.len() * k];
            let mut row = vec![0f32; k];
            for &[oa, ob, oc] in &batch {
                for (j, &[nb, _]) in n.iter().enumerate() {
                    gather(ys, ob + nb, kb, &mut columns[j * k..][..k]);
                }
                for &[ma, mc] in &m {
                    gather(xs, oa + ma, ka, &mut row);
                    for (j, &[_, nc]) in n.iter().enumerate() {
                        zs[oc + mc + nc] = dot(&row, &columns[j * k..][..k]);
                    }
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for StridedProduct {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.einsum.output_facts(inputs)
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        self.einsum.cost(inputs)
    }

    as_op!();
}

/// The product that replaces `node`, if `node` is an einsum it takes (see the module
/// documentation).
fn strided_product(model: &TypedModel, node: &TypedNode) -> TractResult<Option<StridedProduct>> {
    let Some(einsum) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if einsum.q_params.is_some()
        || einsum.operating_dt != f32::datum_type()
        || node.inputs.len() != 2
    {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    if facts
        .iter()
        .any(|f| f.datum_type != f32::datum_type() || !f.is_plain())
    {
        return Ok(None);
    }
    let Some(layout) = Layout::of(&einsum.axes) else {
        return Ok(None);
    };
    let direct = facts.iter().all(|f| f.konst.is_none());
    let op = |layout| StridedProduct {
        einsum: einsum.clone(),
        layout,
        // The fallback plan feeds both operands, constants included.
        facts: [facts[0].without_value(), facts[1].without_value()],
        symbols: model.symbols.clone(),
        direct,
        fallback: Arc::default(),
    };
    if layout.matrices() {
        // Any size runs on the `gemm` kernels.
        return Ok(Some(op(layout)));
    }
    if !direct {
        return Ok(None);
    }
    // Rows or columns that do not merge: only the direct path. The least each extent can be
    // (every symbol at 1): a product whose rows or work are already above the bounds there
    // would always run the fallback.
    let least = |dims: &mut dyn Iterator<Item = TDim>| -> Option<usize> {
        let d: TDim = dims.product();
        let mut ones = SymbolValues::default();
        for s in d.symbols() {
            ones = ones.with(&s, 1);
        }
        d.eval(&ones).to_usize().ok()
    };
    let rows = least(&mut layout.m.iter().map(|&[pa, _]| facts[0].shape[pa].clone()));
    let cols = least(&mut layout.n.iter().map(|&[pb, _]| facts[1].shape[pb].clone()));
    let k = least(&mut std::iter::once(facts[0].shape[layout.k[0]].clone()));
    match (rows, cols, k) {
        (Some(rows), Some(cols), Some(k))
            if rows <= SMALL_ROWS && rows.saturating_mul(cols).saturating_mul(k) <= SMALL_WORK =>
        {
            Ok(Some(op(layout)))
        }
        _ => Ok(None),
    }
}

/// Replaces the einsums [`StridedProduct`] takes, in a decluttered model (before tract
/// lowers them to its matrix kernels). Returns how many.
pub(in crate::engine) fn rewrite_products(model: &mut TypedModel) -> TractResult<usize> {
    replace_each(model, |model, node| {
        Ok(strided_product(model, node)?.map(|op| (op, node.inputs.to_vec())))
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{
        decluttered, tracts_plan, worst_difference, worst_difference_of_runs,
    };
    use super::*;

    /// The paths `f`'s product evaluations took on this thread.
    fn taken_by<R>(f: impl FnOnce() -> R) -> (R, Taken) {
        TAKEN.with(|t| t.set(Taken::default()));
        let r = f();
        (r, TAKEN.with(|t| t.get()))
    }

    fn layout(expr: &str) -> Option<Layout> {
        Layout::of(&expr.parse::<AxesMapping>().unwrap())
    }

    #[test]
    fn which_einsums_are_products() {
        // The decoder's attention: scores with the head axis in the middle, and P·V.
        let scores = layout("ambk,anbk->abmn").unwrap();
        assert_eq!(scores.batch, vec![[0, 0, 0], [2, 2, 1]]);
        assert_eq!(
            (scores.m, scores.n, scores.k),
            (vec![[1, 2]], vec![[1, 3]], [3, 3])
        );
        assert!(layout("abmk,akbn->ambn").is_some());
        assert!(layout("mk,kn->mn").is_some());
        // No summed axis, two of them, a diagonal, three inputs, an axis summed in one input.
        assert!(layout("mk,kn->mkn").is_none());
        assert!(layout("mkj,knj->mn").is_none());
        assert!(layout("kk,kn->n").is_none());
        assert!(layout("mk,kn,no->mo").is_none());
        assert!(layout("mkj,kn->mn").is_none());
    }

    /// Attention as the decoder writes it (keys transposed by `Transpose`, a symbolic query
    /// length, a head axis, a product against an operand broadcast over batch and heads) gives
    /// tract's values within rounding at several sizes of the one symbolic plan: short
    /// queries on the direct path, queries above `SMALL_ROWS` on the `gemm` kernels.
    #[test]
    fn products_match_tracts() {
        use duet_testkit::{attr_int, attr_ints, GraphBuilder, Lcg, D, FLOAT};
        let mut g = GraphBuilder::default();
        let (h, d, e) = (2usize, 8usize, 3usize);
        let q = g.input(
            "q",
            FLOAT,
            &[D::S("batch"), D::N(h as i64), D::S("seq"), D::N(d as i64)],
        );
        let kv = [D::S("batch"), D::S("keys"), D::N(h as i64), D::N(d as i64)];
        let k = g.input("k", FLOAT, &kv);
        let v = g.input("v", FLOAT, &kv);
        let r = g.input(
            "r",
            FLOAT,
            &[D::N(1), D::N(1), D::N(d as i64), D::N(e as i64)],
        );
        let kt = g.node(
            "Transpose",
            &[&k],
            vec![attr_ints("perm", &[0, 2, 3, 1])],
            None,
        );
        let s = g.op("MatMul", &[&q, &kt]);
        let p = g.node("Softmax", &[&s], vec![attr_int("axis", -1)], None);
        let vt = g.node(
            "Transpose",
            &[&v],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
            None,
        );
        let o = g.op("MatMul", &[&p, &vt]);
        g.node("MatMul", &[&o, &r], vec![], Some("out"));
        let out = [D::S("batch"), D::N(h as i64), D::S("seq"), D::N(e as i64)];
        g.output("out", FLOAT, &out);
        let bytes = g.finish(18);
        let mut decluttered = decluttered(&bytes);
        let theirs = tracts_plan(&decluttered);
        assert_eq!(rewrite_products(&mut decluttered).unwrap(), 3);
        let ours = decluttered
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let mut rng = Lcg::new(3);
        for (batch, seq, keys) in [
            (1, 1, 5),
            (2, 3, 11),
            (2, SMALL_ROWS + 4, 7),
            (1, 64, 64),
            (0, 1, 5),
        ] {
            let tensor = |shape: &[usize], rng: &mut Lcg| {
                let n = shape.iter().product();
                Tensor::from_shape(shape, &rng.vec(n, 1.5)).unwrap()
            };
            let feed = tvec!(
                tensor(&[batch, h, seq, d], &mut rng).into_tvalue(),
                tensor(&[batch, keys, h, d], &mut rng).into_tvalue(),
                tensor(&[batch, keys, h, d], &mut rng).into_tvalue(),
                tensor(&[1, 1, d, e], &mut rng).into_tvalue(),
            );
            let (worst, taken) = taken_by(|| worst_difference_of_runs(&ours, &theirs, feed));
            assert!(
                worst < 1e-5,
                "batch {batch}, seq {seq}, keys {keys}: {worst}"
            );
            // Three products per run, all on one path (none computed for an empty batch).
            let want = match (batch, seq) {
                (0, _) => Taken::default(),
                (_, seq) if seq <= SMALL_ROWS => Taken {
                    direct: 3,
                    ..Taken::default()
                },
                _ => Taken {
                    gemm: 3,
                    ..Taken::default()
                },
            };
            assert_eq!(taken, want, "batch {batch}, seq {seq}, keys {keys}");
        }
    }

    /// Einsums built directly (every role, several column axes, a batch axis broadcast on
    /// either side, a transposed output) against tract's evaluation of the same einsum: small
    /// ones on the direct path, the rest (rows above `SMALL_ROWS`) on the `gemm` kernels.
    #[test]
    fn einsums_match_tracts() {
        use duet_testkit::Lcg;
        let mut rng = Lcg::new(8);
        // The first six on the direct path, the next six on gemm, the last with nothing to sum.
        let cases: [(&str, &[usize], &[usize]); 13] = [
            ("ambk,anbk->abmn", &[2, 3, 4, 8], &[2, 5, 4, 8]),
            ("abmk,akbn->ambn", &[2, 4, 3, 5], &[2, 5, 4, 8]),
            ("mk,kab->mab", &[3, 6], &[6, 2, 5]),
            ("amk,akn->amn", &[1, 2, 7], &[3, 7, 4]),
            ("amk,akn->amn", &[3, 2, 7], &[1, 7, 4]),
            ("mk,kn->nm", &[3, 6], &[6, 9]),
            ("ambk,anbk->abmn", &[2, 20, 4, 8], &[2, 5, 4, 8]),
            ("abmk,akbn->ambn", &[2, 4, 24, 5], &[2, 5, 4, 8]),
            ("mk,kab->mab", &[20, 6], &[6, 2, 5]),
            ("amk,akn->amn", &[1, 30, 7], &[3, 7, 4]),
            ("amk,akn->amn", &[3, 30, 7], &[1, 7, 4]),
            ("mk,kn->nm", &[20, 6], &[6, 9]),
            ("amk,akn->amn", &[2, 20, 0], &[2, 0, 4]),
        ];
        for (i, (expr, sa, sb)) in cases.into_iter().enumerate() {
            let mut model = TypedModel::default();
            let a = model.add_source("a", f32::datum_type().fact(sa)).unwrap();
            let b = model.add_source("b", f32::datum_type().fact(sb)).unwrap();
            let einsum = EinSum::new(expr.parse().unwrap(), f32::datum_type());
            let out = model.wire_node("einsum", einsum, &[a, b]).unwrap();
            model.select_output_outlets(&out).unwrap();
            let theirs = model.clone().into_optimized().unwrap();
            assert_eq!(rewrite_products(&mut model).unwrap(), 1, "{expr}");
            let ours = model.into_optimized().unwrap();
            assert!(ours.nodes().iter().any(|n| n.op_is::<StridedProduct>()));
            let tensor = |shape: &[usize], rng: &mut Lcg| {
                let n = shape.iter().product();
                Tensor::from_shape(shape, &rng.vec(n, 1.0)).unwrap()
            };
            let feed = tvec!(
                tensor(sa, &mut rng).into_tvalue(),
                tensor(sb, &mut rng).into_tvalue()
            );
            let (ours, theirs) = (
                ours.into_runnable().unwrap(),
                theirs.into_runnable().unwrap(),
            );
            let (worst, taken) = taken_by(|| worst_difference_of_runs(&ours, &theirs, feed));
            assert!(worst < 1e-5, "{expr} {sa:?} {sb:?}: {worst}");
            let want = match i {
                0..6 => Taken {
                    direct: 1,
                    ..Taken::default()
                },
                6..12 => Taken {
                    gemm: 1,
                    ..Taken::default()
                },
                _ => Taken::default(),
            };
            assert_eq!(taken, want, "{expr} {sa:?} {sb:?}");
        }
    }

    /// A linear layer (`[batch, tokens, k] · W + b`, two row axes against a constant weight)
    /// runs on the `gemm` kernels at every size of its symbolic plan — one token (where a
    /// weight must not take the direct path) up to many, and an empty batch — within rounding
    /// of tract's own plan, on one thread and split among a pool's two.
    #[test]
    fn linear_layers_match_tracts() {
        use duet_testkit::{GraphBuilder, Lcg, D, FLOAT};
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        // 64 tokens of these are above gemm's minimum of work for threads.
        let (k, n) = (96usize, 128usize);
        assert!(64 * k * n >= gemm::get_threading_threshold());
        let mut rng = Lcg::new(5);
        let mut g = GraphBuilder::default();
        let x = g.input("x", FLOAT, &[D::S("batch"), D::S("tokens"), D::N(k as i64)]);
        let w = g.f32("w", &[k, n], rng.vec(k * n, 0.1));
        let bias = g.f32("b", &[n], rng.vec(n, 0.5));
        let y = g.op("MatMul", &[&x, &w]);
        g.node("Add", &[&y, &bias], vec![], Some("out"));
        g.output(
            "out",
            FLOAT,
            &[D::S("batch"), D::S("tokens"), D::N(n as i64)],
        );
        let bytes = g.finish(18);
        let mut decluttered = decluttered(&bytes);
        let theirs = tracts_plan(&decluttered);
        assert_eq!(rewrite_products(&mut decluttered).unwrap(), 1);
        let ours = decluttered.into_optimized().unwrap();
        let product = ours
            .nodes()
            .iter()
            .find_map(|n| n.op_as::<StridedProduct>())
            .expect("the product is rewritten");
        assert!(!product.direct, "a weight never takes the direct path");
        let ours = ours.into_runnable().unwrap();
        let pool = Executor::multithread(2);
        for (batch, tokens) in [(1, 1), (2, 3), (1, 64), (3, 17), (0, 4)] {
            let x =
                Tensor::from_shape(&[batch, tokens, k], &rng.vec(batch * tokens * k, 1.0)).unwrap();
            let feed = tvec!(x.into_tvalue());
            let want = theirs.run(feed.clone()).unwrap();
            let (got, taken) = taken_by(|| ours.run(feed.clone()).unwrap());
            let worst = worst_difference(&got[0], &want[0]);
            assert!(worst < 1e-5, "batch {batch}, tokens {tokens}: {worst}");
            let gemm = usize::from(batch > 0);
            assert_eq!(
                taken,
                Taken {
                    gemm,
                    ..Taken::default()
                },
                "batch {batch}, tokens {tokens}"
            );
            let (threaded, taken) =
                taken_by(|| multithread_tract_scope(pool.clone(), || ours.run(feed)).unwrap());
            // Split only with enough rows (64 and 3 × 17 tokens) for the pool to pay.
            let pooled = usize::from(batch * tokens >= PARALLEL_ROWS);
            assert_eq!(
                taken,
                Taken {
                    gemm,
                    pooled,
                    ..Taken::default()
                },
                "batch {batch}, tokens {tokens}"
            );
            let worst = worst_difference(&threaded[0], &want[0]);
            assert!(
                worst < 1e-5,
                "2 threads, batch {batch}, tokens {tokens}: {worst}"
            );
        }
    }

    /// Axis groups merge into one strided axis only when contiguous in the operand and the
    /// output alike.
    #[test]
    fn axis_groups_merge_when_contiguous() {
        // [batch 2, tokens 3, k 4] with rows (batch, tokens) into an output [2, 3, 5].
        let (shape, strides, out) = ([2, 3, 4], [12, 4, 1], [15, 5, 1]);
        assert_eq!(
            merged(&[[0, 0], [1, 1]], &shape, &strides, &out),
            Some((6, 4, 5))
        );
        assert_eq!(merged(&[], &shape, &strides, &out), Some((1, 0, 0)));
        // The output's axes in the other order ([3, 2, 5]): no single stride.
        assert_eq!(
            merged(&[[0, 1], [1, 0]], &shape, &strides, &[10, 5, 1]),
            None
        );
        // An axis between the two in the operand.
        assert_eq!(merged(&[[0, 0], [2, 1]], &shape, &strides, &out), None);
    }

    /// A product whose row axes do not merge (in the other order in the output) and are a
    /// known size above `SMALL_ROWS` is left to tract: neither path takes it.
    #[test]
    fn unmergeable_long_products_stay_tracts() {
        let mut model = TypedModel::default();
        let a = model
            .add_source("a", f32::datum_type().fact([SMALL_ROWS, 2, 6]))
            .unwrap();
        let b = model
            .add_source("b", f32::datum_type().fact([6, 3]))
            .unwrap();
        let einsum = EinSum::new("mak,kn->amn".parse().unwrap(), f32::datum_type());
        let out = model.wire_node("einsum", einsum, &[a, b]).unwrap();
        model.select_output_outlets(&out).unwrap();
        assert_eq!(rewrite_products(&mut model).unwrap(), 0);
    }

    /// A constant operand on the left, and one with no row axis at all (`k, kn -> n`), take the
    /// `gemm` path (never the direct one) and match tract.
    #[test]
    fn constant_operands_take_gemm() {
        use duet_testkit::Lcg;
        let mut rng = Lcg::new(11);
        let cases: [(&str, &[usize], &[usize]); 2] = [
            ("mk,kn->mn", &[20, 6], &[6, 9]),
            ("k,kn->n", &[6], &[6, 40]),
        ];
        for (expr, sa, sb) in cases {
            let tensor = |shape: &[usize], rng: &mut Lcg| {
                let n = shape.iter().product();
                Tensor::from_shape(shape, &rng.vec(n, 1.0)).unwrap()
            };
            let mut model = TypedModel::default();
            let a = model.add_const("a", tensor(sa, &mut rng)).unwrap();
            let b = model.add_source("b", f32::datum_type().fact(sb)).unwrap();
            let einsum = EinSum::new(expr.parse().unwrap(), f32::datum_type());
            let out = model.wire_node("einsum", einsum, &[a, b]).unwrap();
            model.select_output_outlets(&out).unwrap();
            let theirs = tracts_plan(&model);
            assert_eq!(rewrite_products(&mut model).unwrap(), 1, "{expr}");
            let ours = model.into_optimized().unwrap().into_runnable().unwrap();
            let feed = tvec!(tensor(sb, &mut rng).into_tvalue());
            let (worst, taken) = taken_by(|| worst_difference_of_runs(&ours, &theirs, feed));
            assert!(worst < 1e-5, "{expr}: {worst}");
            assert_eq!(
                taken,
                Taken {
                    gemm: 1,
                    ..Taken::default()
                },
                "{expr}"
            );
        }
    }

    /// A product taken for the direct path whose rows do not merge runs tract's own plan of
    /// the einsum (built in the model's symbol scope) when its symbolic rows turn out above
    /// `SMALL_ROWS` at run time, with tract's values.
    #[test]
    fn long_calls_of_unmergeable_products_run_tracts_plan() {
        use duet_testkit::Lcg;
        let mut rng = Lcg::new(12);
        let mut model = TypedModel::default();
        let rows = model.symbols.sym("rows");
        let a_fact = f32::datum_type().fact(&[TDim::Sym(rows), 2.into(), 6.into()]);
        let a = model.add_source("a", a_fact).unwrap();
        let b = model
            .add_source("b", f32::datum_type().fact([6, 3]))
            .unwrap();
        let einsum = EinSum::new("mak,kn->amn".parse().unwrap(), f32::datum_type());
        let out = model.wire_node("einsum", einsum, &[a, b]).unwrap();
        model.select_output_outlets(&out).unwrap();
        let theirs = tracts_plan(&model);
        assert_eq!(rewrite_products(&mut model).unwrap(), 1);
        let ours = model.into_optimized().unwrap().into_runnable().unwrap();
        for (m, want) in [
            (
                3,
                Taken {
                    direct: 1,
                    ..Taken::default()
                },
            ),
            (
                SMALL_ROWS,
                Taken {
                    fallback: 1,
                    ..Taken::default()
                },
            ),
        ] {
            let feed = tvec!(
                Tensor::from_shape(&[m, 2, 6], &rng.vec(m * 12, 1.0))
                    .unwrap()
                    .into_tvalue(),
                Tensor::from_shape(&[6, 3], &rng.vec(18, 1.0))
                    .unwrap()
                    .into_tvalue()
            );
            let (worst, taken) = taken_by(|| worst_difference_of_runs(&ours, &theirs, feed));
            assert!(worst < 1e-5, "{m} rows: {worst}");
            assert_eq!(taken, want, "{m} rows");
        }
    }
}
